"""DeepSpeed configs: run-dependent values ("auto" in configs/*.json) are filled from train.py's arguments.

The module always holds fp32 weights (``--bf16`` is torch autocast, see train.py), so DeepSpeed's bf16 mode is
off. At ZeRO stage 0 DeepSpeed's fp32 gradient clipping builds host constants every step (a device
synchronisation on CUDA): train.py clips there itself (``torch.nn.utils.clip_grad_norm_``) and DeepSpeed's
``gradient_clipping`` is 0. DeepSpeed's throughput timer, which synchronises the device at every forward and
step, is off unless the config turns it on.
"""
import json

from utils.errors import UsageError


def deepspeed_config(path, train_args):
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from None
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UsageError(f"{path}: remove the '{section}' section: train.py builds it from its arguments "
                             "(--learning_rate, --lr_scheduler_type, ...)")
    if config.get("fp16", {}).get("enabled") not in (None, False):
        raise UsageError(f"{path}: fp16 is not supported; use --bf16")
    if config.get("bf16", {}).get("enabled") not in (None, False, "auto"):
        raise UsageError(f"{path}: set 'bf16.enabled' to \"auto\": --bf16 computes in bfloat16 (torch autocast) "
                         "over fp32 weights, which DeepSpeed's bf16 mode would store in bfloat16")
    run_values = {
        ("train_micro_batch_size_per_gpu",): 1,  # one packed row per micro-batch; its size is a token budget
        ("gradient_accumulation_steps",): train_args.h_accumulation_steps,
        ("gradient_clipping",): train_args.max_grad_norm,
        ("bf16", "enabled"): False,  # the module keeps fp32 weights: they are the master weights
    }
    for keys, value in run_values.items():
        node = config
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        current = node.get(keys[-1], "auto")
        if current != "auto" and current != value:
            raise UsageError(f"{path}: '{'.'.join(keys)}' is {current!r} but the run's arguments give {value!r}; "
                             "set it to \"auto\"")
        node[keys[-1]] = value
    if zero_stage(config) == 0:
        config["gradient_clipping"] = 0.0  # train.py clips (see the module docstring)
    # DeepSpeed's throughput timer synchronises the device at every forward and step unless told otherwise
    config.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    if train_args.optim == "sgd":  # ZeRO asks to confirm optimizers outside its tested list (SGD is fine)
        config.setdefault("zero_allow_untested_optimizer", True)
    if config.pop("train_batch_size", "auto") != "auto":
        raise UsageError(f"{path}: set 'train_batch_size' to \"auto\": it follows from the token budget, "
                         "--h_accumulation_steps and the number of processes")
    return config


def zero_stage(config):
    return int(config.get("zero_optimization", {}).get("stage", 0))
