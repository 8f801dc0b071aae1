#!/usr/bin/env bash
# Train with the settings of a run script:   bash train.sh runs/sft.sh [extra train.py arguments]
# The run script sets TRAIN_ARGS (and OUTPUT_DIR); the environment can override its variables, e.g.
#   NPROC=2 LR=1e-3 bash train.sh runs/sft.sh --num_train_epochs 2
# Devices: CUDA_VISIBLE_DEVICES (one process per listed GPU), or NPROC CPU processes; PORT, HOSTFILE.
# The log goes to <output_dir>/training.log; the exit status is train.py's.
set -euo pipefail
cd "$(dirname "$0")"
source utils/launch.sh
run_with_settings train.py TRAIN_ARGS training.log "$@"
