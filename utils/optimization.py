"""The optimizer, the learning-rate schedule and the DeepSpeed engine of a run, and train.py's gradient clipping.

Weight decay skips biases and norms (every parameter with fewer than 2 dimensions), as transformers' Trainer does;
the schedule is transformers' ``get_scheduler`` over the run's optimizer steps, with ``--warmup_steps`` or
``--warmup_ratio`` of them warming up.
"""
import math

import torch


def build_engine(module, args, ds_config, total_steps):
    """(DeepSpeed engine, its LR scheduler, warmup steps) of ``module`` (the model train.py trains) for the parsed
    TrainArguments ``args`` and the filled DeepSpeed config ``ds_config`` (``utils.ds_config``)."""
    import deepspeed
    from transformers import get_scheduler

    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]  # biases and norms
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optim == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.learning_rate)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_epsilon, fused=args.optim == "adamw_torch_fused")
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=warmup,
                                               num_training_steps=total_steps))
    return engine, scheduler, warmup


def clip_gradients(module, max_norm):
    """The gradient norm before clipping (a device tensor, read when logged); clips to ``max_norm`` when > 0.
    For ZeRO stage 0, where the all-reduced gradients are in ``p.grad`` after the boundary backward."""
    params = [p for p in module.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])
