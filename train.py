"""Fine-tune a causal LM with SFT or a DPO-family loss on token-budget, padding-free micro-batches.

    bash train.sh runs/sft.sh            # the usual way: DeepSpeed launcher, settings from a run script
    python train.py --train_data_path cache/train.pt --output_dir out   # one process

Each optimizer step's gradient is exactly the gradient of its samples in one big batch: the summed loss of
every micro-batch is divided by the step's global normaliser (trained tokens for SFT, pairs for DPO, over all
micro-batches and ranks), whatever the micro-batch sizes, accumulation steps or number of processes.

A micro-batch flows collate (host) -> device -> forward + loss -> backward; every h micro-batches DeepSpeed
steps the optimizer. Nothing in a step reads device values on the host until metrics are logged, so on a GPU
the host packs the next micro-batch while the device computes.
"""
import math
import os
import sys
import time
from types import SimpleNamespace

from utils.arguments import parse_arguments
from utils.errors import run_cli

# torch, DeepSpeed and the modules built on them are imported in the functions that use them, after the arguments
# are parsed: --help and argument errors answer in about a second instead of five.

def main(argv):
    model_args, data_args, args = parse_arguments(argv)
    run = setup(model_args, data_args, args)
    before = evaluate(run, run.dev) if run.dev is not None and not run.resumed else None
    if before:
        run.say("dev before training: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
        run.log.log({"step": 0, "epoch": 0.0, **{f"eval_{k}": v for k, v in before.items()}})
    train(run, args)
    from utils.checkpoints import save_hf_model
    from utils.record_io import atomic_write_json
    if run.is_main:  # the model (or LoRA adapter) first: nothing after this point can lose it
        save_hf_model(run.saved_model, run.tokenizer, args.output_dir)
    after = evaluate(run, run.dev) if run.dev is not None else None
    if after:
        run.log.add_to_last({f"eval_{k}": v for k, v in after.items()})
    test_results = {name: {**evaluate(run, t.data), **t.counts} for name, t in run.test_sets.items()}
    if run.is_main:
        if test_results:
            atomic_write_json(os.path.join(args.output_dir, "test_results.json"), test_results)
        run.log.plot_loss(os.path.join(args.output_dir, "loss.png"))
        run.log.close()
        if model_args.merge_adapter:  # (last: merging changes the model in place)
            save_hf_model(run.peft_model.merge_and_unload(), run.tokenizer, os.path.join(args.output_dir, "merged"))
        print_summary(before, after, test_results, args.output_dir)
    return 0


def setup(model_args, data_args, args):
    """Data (every split validated before step 1), objective, step schedule, model + DeepSpeed engine, and the
    position to start from (a checkpoint of this same run, or step 0 in an output folder holding no other run)."""
    import deepspeed
    import torch
    from transformers import get_scheduler

    from utils.checkpoints import load_checkpoint, resume_note, start_checkpoint
    from utils.distributed import init_distributed
    from utils.ds_config import deepspeed_config, zero_stage
    from utils.modeling import build_model
    from utils.provenance import run_identity
    from utils.run_log import RunLog
    from utils.schedule import StepSchedule

    if not sys.stderr.isatty():  # a log file: no progress bars of transformers' (loading, saving) either
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()
    ds_config = deepspeed_config(args.deepspeed, args)
    rank, world, device = init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    kind = data_args.training_type
    tokenizer, train_data, dev_data, test_sets, objective = load_data(model_args, data_args, args, device, say)
    schedule = StepSchedule(
        objective.costs(train_data), train_data.loss_weights(),
        max_tokens=args.per_device_train_batch_max_tokens, batch_tokens_divider=args.batch_tokens_divider,
        h_accumulation_steps=args.h_accumulation_steps, world_size=world, seed=args.seed,
        num_train_epochs=args.num_train_epochs, max_steps=args.max_steps, group_by_length=args.group_by_length)
    identity = run_identity(model_args.model_name_or_path, data_args.train_data_path,
                            dict(vars(args), **vars(model_args), training_type=kind, world_size=world,
                                 total_steps=schedule.total_steps, share_prompt=objective.share_prompt))
    checkpoint = start_checkpoint(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir, identity)
    if note := resume_note(args.output_dir, args.resume_from_checkpoint, checkpoint):
        say(note)

    model, peft_model, wrapped = build_model(model_args, args, tokenizer, device, say, [
        (f"training set {data_args.train_data_path}", train_data),
        *([(f"dev set {data_args.dev_data_path}", dev_data)] if dev_data is not None else []),
        *[(f"test file {name}", t.data) for name, t in test_sets.items()]])
    decay = [p for p in wrapped.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in wrapped.parameters() if p.requires_grad and p.ndim < 2]  # biases and norms
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optim == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.learning_rate)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_epsilon, fused=args.optim == "adamw_torch_fused")
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * schedule.total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=wrapped, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=warmup,
                                               num_training_steps=schedule.total_steps))

    position = None
    if checkpoint:
        position = load_checkpoint(engine, checkpoint, rank, adapter=peft_model is not None)
        say(f"resumed from {checkpoint} at step {position['global_step']} (epoch {position['epoch']}, "
            f"step {position['step_in_epoch']})")
    run_log = RunLog(args.output_dir, args.report_to, args.run_name, vars(args),
                     resume_step=position["global_step"] if position else None, enabled=rank == 0)
    say(f"{kind}: {len(train_data)} training samples, {schedule.total_steps} optimizer steps, {world} process(es), "
        f"{args.per_device_train_batch_max_tokens} tokens per device per micro-batch, "
        f"{args.h_accumulation_steps} micro-batch(es) per device per step, attention {model.config._attn_implementation}"
        f"{', bf16 autocast' if args.bf16 else ''}")
    say(f"settings: model {model_args.model_name_or_path}, learning_rate {args.learning_rate} ({args.lr_scheduler_type}, "
        f"warmup {warmup} steps), optim {args.optim}, weight_decay {args.weight_decay}, max_grad_norm "
        f"{args.max_grad_norm}, {f'max_steps {args.max_steps}' if args.max_steps > 0 else f'num_train_epochs {args.num_train_epochs}'}, "
        f"seed {args.seed}, deepspeed {args.deepspeed}" + (f", loss_type {args.loss_type}, beta {args.beta}, "
                                                           f"share_prompt {objective.share_prompt}" if kind == "dpo" else ""))
    return SimpleNamespace(
        rank=rank, world=world, device=device, is_main=rank == 0, say=say, tokenizer=tokenizer, objective=objective,
        train=train_data, dev=dev_data, test_sets=test_sets, schedule=schedule, engine=engine,
        scheduler=scheduler, log=run_log, position=position, resumed=checkpoint is not None, identity=identity,
        saved_model=peft_model or model, peft_model=peft_model,
        trainer_clips=zero_stage(ds_config) == 0,
        autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16),
        eval_budget=args.per_device_eval_batch_max_tokens or args.per_device_train_batch_max_tokens)


def load_data(model_args, data_args, args, device, say):
    """The tokenizer, the train and dev caches (checked to be made with this model's tokenizer), the test files
    (tokenized as the training cache was; what their max_length policy changed is reported), the objective with
    its reference log-probs (DPO pairs with their prompt once where the attention allows it on ``device``); every
    dev and test sample checked to fit the evaluation budget: what could fail after training fails now."""
    from utils.attention import prompt_sharing
    from utils.hf_loading import load_tokenizer
    from utils.objectives import DPOObjective, SFTObjective
    from utils.reference_cache import attach_reference_logps, check_references_agree
    from utils.token_data import (check_budget, check_caches_agree, describe_test_changes, load_test_sets,
                                  load_token_cache, read_meta)

    kind, model_path = data_args.training_type, model_args.model_name_or_path
    tokenizer = load_tokenizer(model_path)
    train_data = load_token_cache(data_args.train_data_path, kind, tokenizer, model_path)
    dev_data = load_token_cache(data_args.dev_data_path, kind, tokenizer, model_path) if data_args.dev_data_path else None
    if data_args.dev_data_path:
        check_caches_agree([(f"training set {data_args.train_data_path}", data_args.train_data_path),
                            (f"dev set {data_args.dev_data_path}", data_args.dev_data_path)])
    train_meta = read_meta(data_args.train_data_path)
    test_sets = {}
    for name, (data, counts) in load_test_sets(data_args.test_dataset_dir, data_args.test_files, tokenizer,
                                                  train_meta, kind).items():
        test_sets[name] = SimpleNamespace(data=data, counts=counts)
        if describe_test_changes(name, counts, train_meta):
            say("warning: " + describe_test_changes(name, counts, train_meta))
    if kind == "sft":
        objective = SFTObjective()
    else:
        share, note = prompt_sharing(args.share_prompt, model_args.attn_implementation, device, args.bf16)
        if note:
            say(note)
        objective = DPOObjective(args.loss_type, args.beta, args.label_smoothing, args.simpo_gamma, args.seed, share)
    check_budget(f"training set {data_args.train_data_path}", train_data, args.per_device_train_batch_max_tokens,
                 objective.share_prompt, "--per_device_train_batch_max_tokens", args.batch_tokens_divider, default="")
    budget = args.per_device_eval_batch_max_tokens or args.per_device_train_batch_max_tokens
    evaluated = [(f"dev set {data_args.dev_data_path}", dev_data)] if dev_data is not None else []
    evaluated += [(f"test file {name}", t.data) for name, t in test_sets.items()]
    for label, data in evaluated:
        check_budget(label, data, budget, objective.share_prompt)
    if kind == "sft" or not objective.uses_reference:
        return tokenizer, train_data, dev_data, test_sets, objective
    splits = [("train", data_args.train_data_path, train_data), ("dev", data_args.dev_data_path, dev_data)]
    splits += [("test", name, t.data) for name, t in test_sets.items()]
    references = [attach_reference_logps(data_args.ref_logps_dir, label, split, data, tokenizer)
                  for split, label, data in splits if data is not None]
    if warning := check_references_agree(references, args.bf16):
        say(warning)
    say(f"reference log-probs of {references[0][1]['reference_model']} from {data_args.ref_logps_dir}")
    return tokenizer, train_data, dev_data, test_sets, objective


def train(run, args):
    """The optimizer steps from the run's position to the end: collate -> device -> forward + loss ->
    backward -> step, with logging, dev evaluation and checkpoints between steps."""
    import torch

    from utils.checkpoints import save_checkpoint
    from utils.distributed import add_sums, all_reduce_sums
    from utils.run_log import Progress, format_metrics

    engine, objective, schedule = run.engine, run.objective, run.schedule
    engine.train()  # from_pretrained returns eval mode: dropout, LoRA dropout, gradient checkpointing need this
    scale = run.world * args.h_accumulation_steps  # undoes DeepSpeed's mean over accumulation steps and ranks
    global_step = run.position["global_step"] if run.position else 0
    progress = Progress(schedule.total_steps, global_step, run.is_main)
    tokens_seen = schedule.tokens_before(run.position)  # every rank's tokens, from the plan: no all-reduce
    window_sums, window_start = objective.zero_sums(), time.time()
    for epoch, step_in_epoch, step in schedule.steps(run.position):
        step_lr = run.scheduler.get_last_lr()[0]  # the rate this step's update uses
        for micro in step.micro_batches[run.rank]:
            batch = objective.collate(run.train, micro.indices, epoch).to(run.device)
            with run.autocast():
                loss_sum, sums = objective.loss(engine, batch)
            engine.backward(loss_sum * scale / step.loss_weight_total)
            if engine.is_gradient_accumulation_boundary():
                grad_norm = clip_gradients(engine.module, args.max_grad_norm) if run.trainer_clips else None
            engine.step()  # DeepSpeed updates only at the accumulation boundary (every h micro-batches)
            add_sums(window_sums, sums)
        global_step += 1
        tokens_seen += step.num_tokens
        progress.step()

        row = {}
        if global_step % args.logging_steps == 0 or global_step == schedule.total_steps:
            totals = all_reduce_sums(window_sums, run.device)  # the one host read of the logging window
            row.update(objective.finalize(totals), learning_rate=step_lr, num_input_tokens_seen=tokens_seen,
                       grad_norm=grad_norm if grad_norm is not None else engine.get_global_grad_norm(),
                       tokens_per_second=totals["processed_tokens"] / max(time.time() - window_start, 1e-9))
            progress.logged(global_step, row)
        if args.eval_steps and global_step % args.eval_steps == 0 and global_step != schedule.total_steps:
            metrics = evaluate(run, run.dev)
            progress.note(f"step {global_step}: dev {format_metrics(metrics)}")
            row.update({f"eval_{k}": v for k, v in metrics.items()})
        if row:
            run.log.log({"step": global_step, "epoch": schedule.epoch_progress(epoch, step_in_epoch),
                         **{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in row.items()}})
        position = schedule.position_after(global_step, epoch, step_in_epoch)
        saving = (args.save_strategy == "steps" and global_step % args.save_steps == 0) or \
                 (args.save_strategy == "epoch" and position["step_in_epoch"] == 0)
        if saving and global_step != schedule.total_steps:
            path = save_checkpoint(engine, run.saved_model, run.tokenizer, args.output_dir, global_step,
                                   {**position, "run": run.identity}, run.rank, args.save_total_limit,
                                   adapter=run.peft_model is not None)
            progress.note(f"step {global_step}: saved {path}")
        if "tokens_per_second" in row:  # the next window's throughput counts training only
            window_sums, window_start = objective.zero_sums(), time.time()
    progress.close()


def clip_gradients(module, max_norm):
    """The gradient norm before clipping (a device tensor, read when logged); clips to ``max_norm`` when > 0.
    For ZeRO stage 0, where the all-reduced gradients are in ``p.grad`` after the boundary backward."""
    import torch

    params = [p for p in module.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def evaluate(run, data):
    """Metrics over a whole dataset (a TokenCache); each rank evaluates its share and the sums are all-reduced."""
    import torch

    from utils.batching import eval_batches
    from utils.distributed import add_sums, all_reduce_sums

    run.engine.eval()
    sums = run.objective.zero_sums()  # every rank reduces the same keys, also one with nothing to evaluate
    with torch.no_grad(), run.autocast():
        for indices in eval_batches(run.objective.costs(data), run.eval_budget, run.world, run.rank):
            add_sums(sums, run.objective.micro_batch(run.engine, data, indices, run.device)[1])
    run.engine.train()
    return run.objective.finalize(all_reduce_sums(sums, run.device))


def print_summary(before, after, test_results, output_dir):
    if after:
        names = sorted(after)
        print("\ndev set          " + "  ".join(f"{n:>16}" for n in names))
        if before:
            print("  before training " + "  ".join(f"{before[n]:>16.4f}" for n in names))
        print("  after training  " + "  ".join(f"{after[n]:>16.4f}" for n in names))
    if test_results:  # the metrics, and how many records were evaluated (the other counts were warned about)
        first = next(iter(test_results.values()))
        names = [n for n in sorted(first) if isinstance(first[n], float)] + ["records_evaluated"]
        print("\ntest file        " + "  ".join(f"{n:>17}" for n in names))
        for file_name, metrics in test_results.items():
            print(f"  {file_name:<15}" + "  ".join(f"{metrics[n]:>17.4f}" if isinstance(metrics[n], float)
                                                 else f"{metrics[n]:>17}" for n in names))
    print(f"\nmodel, metrics.jsonl, loss.png{', test_results.json' if test_results else ''} in {output_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
