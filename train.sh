#!/usr/bin/env bash
# Train with the settings of a run script:   bash train.sh runs/sft.sh [extra train.py arguments]
# The run script sets TRAIN_ARGS (and OUTPUT_DIR); the environment can override its variables, e.g.
#   NPROC=2 LR=1e-3 bash train.sh runs/sft.sh --num_train_epochs 2
# The log goes to <output_dir>/training.log; the exit status is train.py's.
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: bash train.sh RUN_SCRIPT [train.py arguments]   (e.g. runs/sft.sh)" >&2
  exit 2
fi
run_script=$1; shift
source utils/launch.sh
source "$run_script"
mkdir -p "$OUTPUT_DIR"
set +e
launch train.py "${TRAIN_ARGS[@]}" "$@" 2>&1 | tee "$OUTPUT_DIR/training.log"
exit "${PIPESTATUS[0]}"
