"""train.py's arguments as HfArgumentParser dataclasses, with TrainingArguments' names where they exist.

Settings that would silently do nothing are errors (see ``check_arguments``), and the legacy spellings of
older run scripts are mapped to the current names before parsing (``LEGACY_FLAGS``).
"""
import os
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from utils.errors import UsageError
from utils.loss_config import LOSS_TYPES, check_loss_settings, needs_reference, resolve_loss_type
from utils.schema import KIND_HELP, KINDS

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
DESCRIPTION = ("Fine-tune a causal LM with SFT or a DPO-family loss on token-budget, padding-free micro-batches; "
               "each step's gradient is that of its samples in one big batch. Usually launched by "
               "'bash train.sh runs/sft.sh' (or runs/dpo.sh), which sets these from a run script.")
EPILOG = ("example: python train.py --train_data_path cache/sft_train.arrow --dev_data_path cache/sft_dev.arrow "
          "--output_dir out/sft --per_device_train_batch_max_tokens 4096 --learning_rate 2e-5 --num_train_epochs 3 "
          "--bf16")
# train.sh and get_logits.sh pass a run script's settings, then this, then the user's own arguments
RUN_SCRIPT_END = "--end_of_run_script_settings"
# A user's setting that makes run-script settings moot: (option, test of its value or None for any, the run script's
# options it drops). Given by the user, those would be errors (check_arguments); as a run script's defaults they
# must never turn an ordinary override (bash train.sh runs/sft.sh --save_strategy no) into one.
SUPERSEDES = (("save_strategy", lambda v: v != "steps", ("save_steps",)),
              ("save_strategy", lambda v: v == "no", ("save_total_limit",)),
              ("warmup_steps", None, ("warmup_ratio",)), ("warmup_ratio", None, ("warmup_steps",)),
              ("lr_scheduler_type", lambda v: v == "constant", ("warmup_steps", "warmup_ratio")),
              ("optim", lambda v: v == "sgd", ("adam_beta1", "adam_beta2", "adam_epsilon")))
# old flag -> current flag (values unchanged)
LEGACY_FLAGS = {"--per_deivce_train_batch_max_tokens": "--per_device_train_batch_max_tokens",
                "--po_beta": "--beta", "--po_gamma": "--simpo_gamma"}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="demo/model", metadata={
        "help": "folder saved with save_pretrained (a LoRA adapter folder: its base model with the adapter merged)"})
    attn_implementation: str = field(default="auto", metadata={
        "help": "attention over packed rows (utils/attention.py): auto (CUDA with --bf16: segment_varlen, else "
                "flash_attention_2 when installed; CUDA otherwise: segment_flex; CPU: segment_sdpa), segment_sdpa, "
                "segment_varlen (--bf16 only), segment_flex, or any transformers attention name"})
    # LoRA through peft (TRL's ModelConfig names)
    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (the update is alpha/r * B A)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch's input"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "comma-separated module names to adapt, or all-linear (every linear layer but the output head)"})
    lora_modules_to_save: Optional[str] = field(default=None, metadata={
        "help": "comma-separated modules trained in full and saved with the adapter (e.g. embed_tokens,lm_head "
                "when tokens were added)"})
    merge_adapter: bool = field(default=False, metadata={
        "help": "with --use_peft: also save the base model with the adapter merged into it, in <output_dir>/merged"})
    resize_token_embeddings: bool = field(default=False, metadata={
        "help": "grow the input embedding and the LM head to the tokenizer's size when tokens were added to it (new "
                "rows mean-initialised, as transformers does; saved with the model); with --use_peft train them with "
                "--lora_modules_to_save embed_tokens,lm_head"})


@dataclass
class DataArguments:
    training_type: str = field(default="sft", metadata={"choices": list(KINDS), "help": KIND_HELP})
    train_data_path: Optional[str] = field(default=None, metadata={"help": "token-id cache (get_tokenized_data.py)"})
    dev_data_path: Optional[str] = field(default=None, metadata={"help": "token-id cache of the dev set"})
    test_dataset_dir: Optional[str] = field(default=None, metadata={"help": "folder of raw test files to evaluate"})
    test_files: Optional[str] = field(default=None, metadata={"help": "comma-separated file names in test_dataset_dir"})
    ref_logps_dir: Optional[str] = field(default=None, metadata={
        "help": "DPO: folder of reference log-prob caches written by get_logits.py"})


@dataclass
class TrainArguments:
    output_dir: str = field(default="output/sft_demo", metadata={
        "help": "where the model, metrics.jsonl, loss.png, test_results.json and checkpoints go"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "train from step 0 into an output_dir that already holds another run's checkpoints or model"})
    deepspeed: str = field(default="configs/ds_config_stage0.json", metadata={"help": "DeepSpeed config (json)"})
    per_device_train_batch_max_tokens: int = field(default=4096, metadata={
        "help": "tokens per device per micro-batch (after merging batch_tokens_divider bins)"})
    per_device_eval_batch_max_tokens: Optional[int] = field(default=None, metadata={"help": "default: the train budget"})
    batch_tokens_divider: int = field(default=1, metadata={"help": "bins of budget/divider tokens per micro-batch"})
    h_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per device per optimizer step"})
    group_by_length: bool = field(default=False, metadata={
        "help": "pack samples of similar length together (best-fit decreasing: the fullest bins, but steps far from "
                "random batches); default: steps are random subsets of the epoch, bins filled from the shuffled "
                "stream"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    optim: str = field(default="adamw_torch_fused", metadata={
        "choices": ["adamw_torch_fused", "adamw_torch", "sgd"],
        "help": "torch's AdamW as one fused kernel (TrainingArguments' default), its foreach form, or SGD"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs; a fraction runs that part of the last"})
    max_steps: int = field(default=-1, metadata={"help": "if > 0, overrides num_train_epochs (as in transformers)"})
    lr_scheduler_type: str = field(default="linear", metadata={
        "choices": list(SCHEDULERS), "help": "learning-rate schedule after warmup (transformers' get_scheduler)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "warmup as a fraction of the optimizer steps"})
    warmup_steps: int = field(default=0, metadata={"help": "warmup in optimizer steps (instead of --warmup_ratio)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW / SGD weight decay (not on biases and norms)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the step's gradient to this norm (0: no clipping)"})
    disable_dropout: Optional[bool] = field(default=None, metadata={
        "help": "dropout off in the model (its config's rates, every dropout layer, LoRA's): default true for "
                "preference pairs (DPO; TRL's default: the policy then computes what the reference computed, so step 1 "
                "is ln 2), false for sft"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in backward: less memory, ~30%% more compute"})
    bf16: bool = field(default=False, metadata={
        "help": "compute in bfloat16 (torch autocast) over fp32 weights: the optimizer updates and the saved "
                "model are fp32"})
    torch_compile: bool = field(default=False, metadata={
        "help": "compile the model's layers with torch.compile (dynamic shapes: row lengths vary)"})
    seed: int = field(default=42, metadata={"help": "seeds the model's random init parts, the plan and the shuffles"})
    logging_steps: int = field(default=1, metadata={"help": "log metrics every N optimizer steps"})
    eval_steps: int = field(default=0, metadata={"help": "evaluate dev every N steps (0: only before and after)"})
    save_strategy: str = field(default="steps", metadata={
        "choices": ["no", "steps", "epoch"], "help": "when to write checkpoints (the final model is always saved)"})
    save_steps: int = field(default=500, metadata={"help": "with --save_strategy steps: every N optimizer steps"})
    save_total_limit: Optional[int] = field(default=None, metadata={
        "help": "keep this run's N newest checkpoints (default: all)"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "a checkpoint folder or 'latest'"})
    report_to: str = field(default="none", metadata={"help": "none, or a comma list of tensorboard, wandb"})
    run_name: Optional[str] = field(default=None, metadata={"help": "the run's name for wandb"})
    # DPO family (TRL DPOConfig names)
    loss_type: str = field(default="sigmoid", metadata={
        "choices": list(LOSS_TYPES), "help": "the DPO-family loss (README: DPO family)"})
    beta: float = field(default=0.1, metadata={"help": "the DPO temperature beta"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO label smoothing (sigmoid, ln_dpo, simpo, sampo)"})
    simpo_gamma: float = field(default=0.0, metadata={"help": "SimPO's target margin gamma"})
    share_prompt: bool = field(default=True, metadata={
        "help": "compute each pair's prompt once: [prompt][chosen][rejected] in one row sequence, the rejected tokens "
                "attending to the prompt and not to the chosen ones; a pair costs P + C + R tokens instead of "
                "2P + C + R, with the same log-probs and gradient. Needs a segment_* attention (the default); "
                "false: prompt + chosen and prompt + rejected as two sequences"})
    norm_by_len: bool = field(default=False, metadata={"help": "legacy: same as --loss_type ln_dpo"})
    use_sampo: bool = field(default=False, metadata={"help": "legacy: same as --loss_type sampo"})
    local_rank: int = field(default=-1, metadata={"help": "set by the DeepSpeed launcher"})


def _rename_legacy(argv):
    """Map old flag spellings to the current ones; the same setting given under both names is an error."""
    out, spelling = [], {}
    for arg in argv:
        flag, eq, value = arg.partition("=")
        current = LEGACY_FLAGS.get(flag, flag)
        if flag.startswith("--") and spelling.setdefault(current, flag) != flag:
            raise UsageError(f"{spelling[current]} and {flag} both given: they are the same setting")
        out.append(current + eq + value)
    return out


def _options(argv):
    """[(option name, [its value tokens], [its tokens])] of a command line, in order ("--x=1" and "--x 1" alike)."""
    out = []
    for token in argv:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            out.append((name, [value] if eq else [], [token]))
        elif out:
            out[-1][1].append(token)
            out[-1][2].append(token)
    return out


def split_run_script(argv):
    """(the run script's settings, the user's arguments) of a command line from train.sh / get_logits.sh (which put
    RUN_SCRIPT_END between them), legacy spellings renamed; the run script's settings that the user's make moot
    (SUPERSEDES) are left out. Without the marker everything is the user's."""
    if RUN_SCRIPT_END not in argv:
        return [], _rename_legacy(argv)
    end = argv.index(RUN_SCRIPT_END)
    script, user = _rename_legacy(argv[:end]), _rename_legacy(argv[end + 1:])
    given = {name: values[-1] if values else None for name, values, _ in _options(user)}
    moot = {option for name, test, options in SUPERSEDES if name in given and (test is None or test(given[name]))
            for option in options}
    return [t for name, _, tokens in _options(script) if name not in moot for t in tokens], user


def parse_arguments(argv):
    """(model_args, data_args, train_args) from a command line; errors are one line (UsageError). A run script's
    settings (before RUN_SCRIPT_END) are defaults that the user's arguments override (split_run_script)."""
    argv = sum(split_run_script(argv), [])
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments), description=DESCRIPTION,
                              epilog=EPILOG, allow_abbrev=False)  # --learning_rat is a typo, not --learning_rate
    model_args, data_args, train_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    if unknown:
        raise UsageError(f"unknown arguments: {' '.join(unknown)} (see python train.py --help)")
    explicit = {a.partition("=")[0][2:] for a in argv if a.startswith("--")}
    check_arguments(model_args, data_args, train_args, explicit)
    return model_args, data_args, train_args


def check_arguments(model_args, data_args, train_args, explicit=()):
    """Reject settings that are contradictory or would be silently ignored."""
    t = train_args
    if not data_args.train_data_path:
        raise UsageError("--train_data_path (a token-id cache from get_tokenized_data.py) is required")
    for name in ("per_device_train_batch_max_tokens", "batch_tokens_divider", "h_accumulation_steps", "logging_steps",
                 "save_steps"):
        if getattr(t, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    for name in ("eval_steps", "warmup_steps", "max_grad_norm", "weight_decay", "warmup_ratio"):
        if getattr(t, name) < 0:
            raise UsageError(f"--{name} must not be negative")
    if t.learning_rate <= 0:
        raise UsageError("--learning_rate must be positive")
    if t.warmup_ratio > 1:
        raise UsageError("--warmup_ratio is a fraction of the run: at most 1")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        raise UsageError("--save_total_limit must be at least 1 (leave it unset to keep every checkpoint)")
    if t.save_strategy == "no" and t.save_total_limit is not None:
        raise UsageError("--save_total_limit is ignored with --save_strategy no")
    if t.lr_scheduler_type == "constant" and (t.warmup_steps or t.warmup_ratio):
        raise UsageError("--lr_scheduler_type constant has no warmup: use constant_with_warmup")
    if t.optim == "sgd" and {"adam_beta1", "adam_beta2", "adam_epsilon"} & set(explicit):
        raise UsageError("--adam_* settings are ignored with --optim sgd")
    if t.per_device_eval_batch_max_tokens is not None and not (data_args.dev_data_path or data_args.test_dataset_dir):
        raise UsageError("--per_device_eval_batch_max_tokens is ignored without --dev_data_path or --test_dataset_dir")
    if t.per_device_train_batch_max_tokens % t.batch_tokens_divider:
        raise UsageError("--per_device_train_batch_max_tokens must be a multiple of --batch_tokens_divider")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        raise UsageError("set --num_train_epochs > 0 or --max_steps > 0")
    if t.warmup_steps and t.warmup_ratio:
        raise UsageError("--warmup_steps and --warmup_ratio both given: choose one")
    if t.eval_steps and not data_args.dev_data_path:
        raise UsageError("--eval_steps needs --dev_data_path")
    if data_args.test_files and not data_args.test_dataset_dir:
        raise UsageError("--test_files needs --test_dataset_dir")
    if t.save_strategy != "steps" and "save_steps" in explicit:
        raise UsageError(f"--save_steps is ignored with --save_strategy {t.save_strategy}")
    unknown = set(filter(None, t.report_to.split(","))) - {"none", "tensorboard", "wandb"}
    if unknown:
        raise UsageError(f"--report_to: unknown {sorted(unknown)} (expected none, tensorboard, wandb)")
    if not os.path.isfile(t.deepspeed):
        raise UsageError(f"--deepspeed config '{t.deepspeed}' does not exist")
    lora_options = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
                    "merge_adapter"}
    if not model_args.use_peft and lora_options & set(explicit):
        raise UsageError(f"{', '.join('--' + o for o in sorted(lora_options & set(explicit)))} only apply with --use_peft")
    if model_args.use_peft and (model_args.lora_r < 1 or model_args.lora_alpha <= 0
                                or not 0 <= model_args.lora_dropout < 1):
        raise UsageError("--lora_r and --lora_alpha must be positive and --lora_dropout in [0, 1)")
    kind = KINDS[data_args.training_type]
    if t.disable_dropout is None:
        t.disable_dropout = kind.paired
    if t.disable_dropout and model_args.use_peft:
        if "lora_dropout" in explicit and model_args.lora_dropout > 0:
            raise UsageError("--lora_dropout is ignored with --disable_dropout (the default for DPO): add "
                             "--disable_dropout false to keep it")
        model_args.lora_dropout = 0.0
    dpo_options = {"loss_type", "beta", "label_smoothing", "simpo_gamma", "norm_by_len", "use_sampo", "ref_logps_dir",
                   "share_prompt", "no_share_prompt"}
    if not kind.paired:
        given = sorted(dpo_options & set(explicit))
        if given:
            raise UsageError(f"{', '.join('--' + g for g in given)} only appl{'ies' if len(given) == 1 else 'y'} "
                             f"to --training_type {' or '.join(k.name for k in KINDS.values() if k.paired)}")
    else:
        t.loss_type = check_loss_settings(resolve_loss_type(t.loss_type, t.norm_by_len, t.use_sampo), t.beta,
                                          t.label_smoothing, t.simpo_gamma)
        if needs_reference(t.loss_type) and not data_args.ref_logps_dir:
            raise UsageError(f"--loss_type {t.loss_type} needs reference log-probs: run get_logits.sh and pass --ref_logps_dir")
        if not needs_reference(t.loss_type) and data_args.ref_logps_dir:
            raise UsageError(f"--loss_type {t.loss_type} uses no reference model: --ref_logps_dir would be ignored")
