# Shared by train.sh and get_logits.sh.
#   run_with_settings ENTRY ARGS_ARRAY LOG_NAME RUN_SCRIPT [extra args]: source the run script, launch the
#     entry script with the array it sets (plus the extra args), append its output to <OUTPUT_DIR>/LOG_NAME after a
#     header line (an earlier run's log is never replaced), return its status. A launch refused (exit 2) before
#     writing anything into an output folder it created leaves no folder behind.
#   launch SCRIPT [ARGS...]: start a Python entry script through the DeepSpeed launcher.
# Devices: with a GPU, one process per GPU listed in CUDA_VISIBLE_DEVICES (all GPUs when unset); without
# one, NPROC CPU processes (default 1) on gloo. HOSTFILE (DeepSpeed's "host slots=N" format) runs on
# several nodes; PORT sets the rendezvous port (default: a free port on this machine, so that several runs
# can start at once; 29500 with HOSTFILE, where every node must agree on it).
launch() {
  local script=$1; shift
  local port=${PORT:-}
  # DeepSpeed's launcher logs at level error unless DS_LOG_LEVEL says otherwise (info: every launch detail)
  local log_level=${DS_LOG_LEVEL:-error}
  # DeepSpeed compiles its CPU communication op (g++) once per Python environment, in the environment's own folder
  # rather than in a cache that environments with other torch builds share and rebuild in turn
  local prefix
  prefix=$(python -c 'import sys; print(sys.prefix)')
  if [ -z "${TORCH_EXTENSIONS_DIR:-}" ] && [ -w "$prefix" ]; then
    export TORCH_EXTENSIONS_DIR=$prefix/torch_extensions
  fi
  if [ -z "$port" ]; then
    port=$([ -n "${HOSTFILE:-}" ] && echo 29500 || python -c 'from utils.distributed import free_port; print(free_port())')
  fi
  if [ -n "${HOSTFILE:-}" ]; then
    deepspeed --log_level "$log_level" --hostfile "$HOSTFILE" --master_port "$port" "$script" "$@"
  elif [ "${DS_ACCELERATOR:-cuda}" != cpu ] \
       && python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    # the launcher itself turns CUDA_VISIBLE_DEVICES into --include localhost:<ids>
    deepspeed --log_level "$log_level" --master_port "$port" "$script" "$@"
  else
    export DS_ACCELERATOR=cpu
    local nproc=${NPROC:-1}
    # share the cores between the processes unless the user chose
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nproc > 0 ? $(nproc) / nproc : 1 ))}
    deepspeed --log_level "$log_level" --num_gpus "$nproc" --master_port "$port" "$script" "$@"
  fi
}

# demo_data sft|dpo: when a run uses the embedded demo, make what is not committed: the demo model's
# weights (generated from a fixed seed) and the token-id caches of the demo data. No-op for other data.
demo_data() {
  local kind=$1
  if [ "$MODEL" = demo/model ]; then
    python demo/build_demo.py --weights-only
  fi
  local stale=0 f
  for f in "$TRAIN_DATA" "${DEV_DATA:-$TRAIN_DATA}"; do   # missing, or older than the demo data or tokenizer
    if [ ! -f "$f" ] || [ "demo/data/$kind/train.jsonl" -nt "$f" ] || [ demo/model/tokenizer.json -nt "$f" ]; then
      stale=1
    fi
  done
  if [[ "$TRAIN_DATA" == demo/cache/* ]] && [ "$stale" = 1 ]; then
    python tokenized_inputs/get_tokenized_data.py --model demo/model --training_type "$kind" \
      --prompt_type completion --max_length 256 --num_proc 1 \
      --train_dataset_path "demo/data/$kind/train.jsonl" --train_save_path "demo/cache/${kind}_train.arrow" \
      --dev_dataset_path "demo/data/$kind/dev.jsonl" --dev_save_path "demo/cache/${kind}_dev.arrow"
  fi
}

run_with_settings() {
  local entry=$1 args_array=$2 log_name=$3
  shift 3
  if [ $# -lt 1 ] || [ ! -f "$1" ]; then
    echo "usage: bash $(basename "$0") RUN_SCRIPT [${entry} arguments]   (see runs/)" >&2
    return 2
  fi
  local run_script=$1
  shift
  source "$run_script"
  local created=0
  [ -d "$OUTPUT_DIR" ] || created=1
  mkdir -p "$OUTPUT_DIR"
  local log="$OUTPUT_DIR/$log_name"
  echo "=== $(date -u '+%Y-%m-%d %H:%M:%S') UTC: bash $(basename "$0") $run_script $*" >> "$log"
  local -n settings=$args_array
  set +e
  # the entry script takes the run script's settings as defaults that the user's arguments override, even where an
  # override makes one of them moot (--save_strategy no drops the run script's --save_steps): the marker between them
  launch "$entry" "${settings[@]}" --end_of_run_script_settings "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  # exit 2: refused with one line before any work (a crash keeps its folder and log)
  if [ "$created" = 1 ] && [ "$status" = 2 ] && [ "$(ls -A "$OUTPUT_DIR")" = "$log_name" ]; then
    rm -rf "$OUTPUT_DIR"
  fi
  return "$status"
}

# require_train_data: a model other than the demo's needs the user's own token-id cache (the demo caches were made
# with the demo tokenizer; train.py would refuse them).
require_train_data() {
  if [ -z "${TRAIN_DATA:-}" ]; then
    echo "error: MODEL=$MODEL is not the demo model: set TRAIN_DATA to a token-id cache made with its tokenizer" \
         "(tokenized_inputs/get_tokenized_data.py --model $MODEL ...)" >&2
    exit 2
  fi
}
