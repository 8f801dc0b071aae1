#!/usr/bin/env bash
# Reference log-probs for DPO, once:   bash get_logits.sh runs/get_ref.sh [extra get_logits.py arguments]
# The run script sets GET_LOGITS_ARGS and OUTPUT_DIR; devices and processes as for train.sh (NPROC, PORT,
# CUDA_VISIBLE_DEVICES, HOSTFILE). The log goes to <output_dir>/get_logits.log.
set -euo pipefail
cd "$(dirname "$0")"
source utils/launch.sh
run_with_settings get_logits.py GET_LOGITS_ARGS get_logits.log "$@"
