# SFT run settings (sourced by train.sh). Defaults train the embedded demo; override any variable from
# the environment, e.g.  MODEL=/models/llama TRAIN_DATA=cache/train.pt OUTPUT_DIR=out/sft bash train.sh runs/sft.sh
MODEL=${MODEL:-demo/model}
if [ "$MODEL" = demo/model ]; then   # the embedded demo: its data, settings tuned for its tiny model
  TRAIN_DATA=${TRAIN_DATA:-demo/cache/sft_train.arrow}
  DEV_DATA=${DEV_DATA-demo/cache/sft_dev.arrow}
  TEST_DIR=${TEST_DIR-demo/data/sft/test}
  MAX_TOKENS=${MAX_TOKENS:-512}     # tokens per device per micro-batch (~40 demo samples)
  LR=${LR:-3e-3}
  EPOCHS=${EPOCHS:-6}
else                                # your model: your data, the usual SFT settings (HF / TRL docs)
  require_train_data
  DEV_DATA=${DEV_DATA-}
  TEST_DIR=${TEST_DIR-}
  MAX_TOKENS=${MAX_TOKENS:-8192}
  LR=${LR:-2e-5}
  EPOCHS=${EPOCHS:-3}
fi
OUTPUT_DIR=${OUTPUT_DIR:-output/sft_demo}
DS_CONFIG=${DS_CONFIG:-configs/ds_config_stage0.json}
H_ACCUMULATION_STEPS=${H_ACCUMULATION_STEPS:-1}
SEED=${SEED:-42}

demo_data sft                       # (utils/launch.sh) demo weights and token-id caches, when missing

TRAIN_ARGS=(
  --training_type sft
  --model_name_or_path "$MODEL"
  --train_data_path "$TRAIN_DATA"
  ${DEV_DATA:+--dev_data_path "$DEV_DATA" --eval_steps 100}
  ${TEST_DIR:+--test_dataset_dir "$TEST_DIR"}
  --output_dir "$OUTPUT_DIR"
  --deepspeed "$DS_CONFIG"
  --per_device_train_batch_max_tokens "$MAX_TOKENS"
  --h_accumulation_steps "$H_ACCUMULATION_STEPS"
  --learning_rate "$LR"
  --lr_scheduler_type cosine
  --warmup_ratio 0.05
  --weight_decay 0.0
  --num_train_epochs "$EPOCHS"
  --logging_steps 10
  --save_steps 200
  --save_total_limit 2
  --seed "$SEED"
)
