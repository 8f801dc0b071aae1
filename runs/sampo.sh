# SamPO: DPO with the longer response's per-token log-ratios down-sampled to the shorter length (one seeded
# draw per pair, shared by policy and reference). Needs get_logits.sh like runs/dpo.sh.
LOSS_TYPE=sampo
OUTPUT_DIR=${OUTPUT_DIR:-output/sampo_demo}
source runs/dpo.sh
