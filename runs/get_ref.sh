# Reference log-prob settings (sourced by get_logits.sh). Defaults: the embedded DPO demo.
# Override from the environment, e.g.  REF_MODEL=output/sft_demo TRAIN_DATA=... bash get_logits.sh runs/get_ref.sh
MODEL=${REF_MODEL:-demo/model}      # the reference model (usually the SFT model the policy starts from)
if [ "$MODEL" = demo/model ]; then
  TRAIN_DATA=${TRAIN_DATA:-demo/cache/dpo_train.arrow}
  DEV_DATA=${DEV_DATA-demo/cache/dpo_dev.arrow}
  TEST_DIR=${TEST_DIR-demo/data/dpo/test}
else
  require_train_data
  DEV_DATA=${DEV_DATA-}
  TEST_DIR=${TEST_DIR-}
fi
OUTPUT_DIR=${REF_LOGPS_DIR:-demo/cache/ref_logps}
MAX_TOKENS=${MAX_TOKENS:-8192}

demo_data dpo                       # (utils/launch.sh) demo weights and token-id caches, when missing

GET_LOGITS_ARGS=(
  --model_name_or_path "$MODEL"
  --train_data_path "$TRAIN_DATA"
  ${DEV_DATA:+--dev_data_path "$DEV_DATA"}
  ${TEST_DIR:+--test_dataset_dir "$TEST_DIR"}
  --output_dir "$OUTPUT_DIR"
  --per_device_eval_batch_max_tokens "$MAX_TOKENS"
)
