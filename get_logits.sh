#!/usr/bin/env bash
# Reference log-probs for DPO, once:   bash get_logits.sh runs/get_ref.sh [extra get_logits.py arguments]
# The run script sets GET_LOGITS_ARGS and OUTPUT_DIR; devices and processes as for train.sh (NPROC, PORT,
# CUDA_VISIBLE_DEVICES, HOSTFILE). The log goes to <output_dir>/get_logits.log.
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: bash get_logits.sh RUN_SCRIPT [get_logits.py arguments]   (e.g. runs/get_ref.sh)" >&2
  exit 2
fi
run_script=$1; shift
source utils/launch.sh
source "$run_script"
mkdir -p "$OUTPUT_DIR"
set +e
launch get_logits.py "${GET_LOGITS_ARGS[@]}" "$@" 2>&1 | tee "$OUTPUT_DIR/get_logits.log"
exit "${PIPESTATUS[0]}"
