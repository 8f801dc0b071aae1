# SimPO (reference-free: no get_logits.sh needed). Same variables as runs/dpo.sh, plus GAMMA.
LOSS_TYPE=simpo
REF_LOGPS_DIR=
BETA=${BETA:-2.0}
GAMMA=${GAMMA:-0.5}
OUTPUT_DIR=${OUTPUT_DIR:-output/simpo_demo}
source runs/dpo.sh
TRAIN_ARGS+=(--simpo_gamma "$GAMMA")
