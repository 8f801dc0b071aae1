# DPO run settings (sourced by train.sh). Defaults train the embedded demo against the reference
# log-probs of `bash get_logits.sh runs/get_ref.sh` (run that first). Override any variable from the
# environment; LOSS_TYPE picks the DPO-family loss (sigmoid, ipo, ln_dpo, sampo; simpo: runs/simpo.sh).
MODEL=${MODEL:-demo/model}          # the policy starts from the reference model
if [ "$MODEL" = demo/model ]; then   # the embedded demo: its data, settings tuned for its tiny model
  TRAIN_DATA=${TRAIN_DATA:-demo/cache/dpo_train.arrow}
  DEV_DATA=${DEV_DATA-demo/cache/dpo_dev.arrow}
  TEST_DIR=${TEST_DIR-demo/data/dpo/test}
  REF_LOGPS_DIR=${REF_LOGPS_DIR-demo/cache/ref_logps}
  MAX_TOKENS=${MAX_TOKENS:-2048}
  LR=${LR:-1e-3}
  EPOCHS=${EPOCHS:-2}
else                                # your model: your data and reference log-probs, the usual DPO settings
  require_train_data
  DEV_DATA=${DEV_DATA-}
  TEST_DIR=${TEST_DIR-}
  REF_LOGPS_DIR=${REF_LOGPS_DIR-}
  MAX_TOKENS=${MAX_TOKENS:-8192}
  LR=${LR:-5e-7}
  EPOCHS=${EPOCHS:-1}
fi
OUTPUT_DIR=${OUTPUT_DIR:-output/dpo_demo}
DS_CONFIG=${DS_CONFIG:-configs/ds_config_stage0.json}
H_ACCUMULATION_STEPS=${H_ACCUMULATION_STEPS:-1}
LOSS_TYPE=${LOSS_TYPE:-sigmoid}
BETA=${BETA:-0.1}
SEED=${SEED:-42}

demo_data dpo                       # (utils/launch.sh) demo weights and token-id caches, when missing

TRAIN_ARGS=(
  --training_type dpo
  --loss_type "$LOSS_TYPE"
  --beta "$BETA"
  ${REF_LOGPS_DIR:+--ref_logps_dir "$REF_LOGPS_DIR"}
  --model_name_or_path "$MODEL"
  --train_data_path "$TRAIN_DATA"
  ${DEV_DATA:+--dev_data_path "$DEV_DATA" --eval_steps 50}
  ${TEST_DIR:+--test_dataset_dir "$TEST_DIR"}
  --output_dir "$OUTPUT_DIR"
  --deepspeed "$DS_CONFIG"
  --per_device_train_batch_max_tokens "$MAX_TOKENS"
  --h_accumulation_steps "$H_ACCUMULATION_STEPS"
  --learning_rate "$LR"
  --lr_scheduler_type cosine
  --warmup_ratio 0.05
  --num_train_epochs "$EPOCHS"
  --logging_steps 5
  --save_steps 100
  --save_total_limit 2
  --seed "$SEED"
)
