"""Fine-tune a causal LM with SFT or a DPO-family loss on token-budget, padding-free micro-batches.

    bash train.sh runs/sft.sh            # the usual way: DeepSpeed launcher, settings from a run script
    python train.py --train_data_path cache/train.pt --output_dir out   # one process

Each optimizer step's gradient is exactly the gradient of its samples in one big batch: the summed loss of
every micro-batch is divided by the step's global normaliser (trained tokens for SFT, pairs for DPO, over all
micro-batches and ranks), whatever the micro-batch sizes, accumulation steps or number of processes.
"""
import math
import os
import sys
import time

import deepspeed
import torch
from tqdm import tqdm
from transformers import get_scheduler

from utils.arguments import parse_arguments
from utils.batching import eval_batches, loss_weights, sample_costs, token_budget_batches
from utils.checkpoints import load_checkpoint, resolve_checkpoint, save_checkpoint, save_hf_model
from utils.distributed import add_sums, all_reduce_sums, init_distributed
from utils.ds_config import deepspeed_config
from utils.errors import run_cli
from utils.hf_loading import load_tokenizer
from utils.modeling import ResponseLogProbs, load_causal_lm
from utils.objectives import DPOObjective, SFTObjective
from utils.record_io import atomic_write_json
from utils.reference_cache import attach_reference_logps
from utils.run_log import RunLog
from utils.token_data import load_test_sets, load_token_cache, read_meta


def evaluate(engine, objective, records, max_tokens, rank, world, device):
    """Metrics over a whole dataset; each rank evaluates its share and the sums are all-reduced."""
    engine.eval()
    sums = objective.zero_sums()  # every rank reduces the same keys, also one with nothing to evaluate
    with torch.no_grad():
        for indices in eval_batches(sample_costs(records, objective.training_type), max_tokens, world, rank):
            add_sums(sums, objective.micro_batch(engine, records, indices, device)[1])
    engine.train()
    return objective.finalize(all_reduce_sums(sums, device))


def reduced_grad_norm(engine):
    """Gradient norm before clipping, where DeepSpeed reports none (ZeRO stage 0 in fp32: the all-reduced
    gradients are in ``p.grad`` once the boundary backward has run); None elsewhere."""
    if engine.zero_optimization_stage() or engine.bfloat16_enabled():
        return None
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else None


def main(argv):
    model_args, data_args, args = parse_arguments(argv)
    ds_config = deepspeed_config(args.deepspeed, args)
    rank, world, device = init_distributed()
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)

    # ---- data -------------------------------------------------------------------------------------------
    kind = data_args.training_type
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    train_records = load_token_cache(data_args.train_data_path, kind)
    dev_records = load_token_cache(data_args.dev_data_path, kind) if data_args.dev_data_path else None
    test_sets = load_test_sets(data_args.test_dataset_dir, data_args.test_files, tokenizer,
                               read_meta(data_args.train_data_path), kind)
    if kind == "sft":
        objective = SFTObjective()
    else:
        objective = DPOObjective(args.loss_type, args.beta, args.label_smoothing, args.simpo_gamma, args.seed)
        if objective.uses_reference:
            splits = [("train", data_args.train_data_path, train_records), ("dev", data_args.dev_data_path, dev_records)]
            splits += [("test", name, records) for name, records in test_sets.items()]
            for split, label, records in splits:
                if records is not None:
                    provenance = attach_reference_logps(data_args.ref_logps_dir, label, split, records)
            say(f"reference log-probs of {provenance['reference_model']} from {data_args.ref_logps_dir}")

    # ---- the plan: every epoch's optimizer steps, from the token budget ---------------------------------
    costs, weights = sample_costs(train_records, kind), loss_weights(train_records, kind)
    plans = []  # plans[epoch]: that epoch's optimizer steps (composition and order depend on seed + epoch)

    def plan_next_epoch():
        plans.append(token_budget_batches(
            costs, args.per_device_train_batch_max_tokens, batch_tokens_divider=args.batch_tokens_divider,
            h_accumulation_steps=args.h_accumulation_steps, world_size=world, seed=args.seed, epoch=len(plans),
            loss_weights=weights))

    if args.max_steps > 0:
        total_steps = args.max_steps
    else:  # a fractional last epoch runs that fraction of its steps
        for _ in range(math.ceil(args.num_train_epochs)):
            plan_next_epoch()
        last_fraction = args.num_train_epochs - (len(plans) - 1)
        total_steps = sum(len(p) for p in plans[:-1]) + math.ceil(len(plans[-1]) * last_fraction)
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)

    # ---- model, optimizer, scheduler, engine ------------------------------------------------------------
    model = load_causal_lm(model_args.model_name_or_path, model_args.attn_implementation, torch.float32, device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = ResponseLogProbs(model)
    decay = [p for p in wrapped.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in wrapped.parameters() if p.requires_grad and p.ndim < 2]  # biases and norms
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optim == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.learning_rate)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_epsilon)
    engine, _, _, scheduler = deepspeed.initialize(
        model=wrapped, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=warmup,
                                               num_training_steps=total_steps))

    # ---- resume -----------------------------------------------------------------------------------------
    global_step, start_epoch, start_step_in_epoch = 0, 0, 0
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if checkpoint:
        state = load_checkpoint(engine, checkpoint, rank)
        global_step, start_epoch, start_step_in_epoch = state["global_step"], state["epoch"], state["step_in_epoch"]
        say(f"resumed from {checkpoint} at step {global_step} (epoch {start_epoch}, step {start_step_in_epoch})")
    run_log = RunLog(args.output_dir, args.report_to, args.run_name, vars(args),
                     resume_step=global_step if checkpoint else None, enabled=is_main)
    eval_budget = args.per_device_eval_batch_max_tokens or args.per_device_train_batch_max_tokens
    run_eval = lambda records: evaluate(engine, objective, records, eval_budget, rank, world, device)  # noqa: E731

    say(f"{kind}: {len(train_records)} training samples, {total_steps} optimizer steps, {world} process(es), "
        f"{args.per_device_train_batch_max_tokens} tokens per device per micro-batch, "
        f"{args.h_accumulation_steps} micro-batch(es) per device per step")
    before = run_eval(dev_records) if dev_records is not None and not checkpoint else None
    if before:
        say("dev before training: " + ", ".join(f"{k} {v:.4f}" for k, v in before.items()))
        run_log.log({"step": 0, "epoch": 0.0, **{f"eval_{k}": v for k, v in before.items()}})

    # ---- the loop ---------------------------------------------------------------------------------------
    scale = world * args.h_accumulation_steps  # undoes DeepSpeed's mean over accumulation steps and ranks
    bar = tqdm(total=total_steps, initial=global_step, desc="train", disable=not is_main, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 10)  # a log file gets a line every 10 s, not every step
    window_sums, window_start = objective.zero_sums(), time.time()
    epoch = start_epoch
    while global_step < total_steps:
        while epoch >= len(plans):
            plan_next_epoch()
        for step_in_epoch, step in enumerate(plans[epoch]):
            if global_step >= total_steps:
                break
            if step_in_epoch < start_step_in_epoch:  # done before the checkpoint we resumed from
                continue
            step_lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
            for micro in step.micro_batches[rank]:
                loss_sum, sums = objective.micro_batch(engine, train_records, micro.indices, device, epoch)
                engine.backward(loss_sum * scale / step.loss_weight_total)
                if engine.is_gradient_accumulation_boundary():
                    grad_norm = reduced_grad_norm(engine)
                engine.step()  # DeepSpeed updates only at the accumulation boundary (every h micro-batches)
                add_sums(window_sums, sums)
            global_step += 1
            position = {"global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch + 1}
            if step_in_epoch + 1 == len(plans[epoch]):
                position.update(epoch=epoch + 1, step_in_epoch=0)
            bar.update(1)

            row = {}
            if global_step % args.logging_steps == 0 or global_step == total_steps:
                totals = all_reduce_sums(window_sums, device)
                row.update(objective.finalize(totals), learning_rate=step_lr,
                           grad_norm=grad_norm if grad_norm is not None else engine.get_global_grad_norm(),
                           tokens_per_second=totals["processed_tokens"] / max(time.time() - window_start, 1e-9))
                shown = {"loss": row["loss"], "acc": row.get("rewards/accuracies"), "margin": row.get("rewards/margins")}
                bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items() if v is not None},
                                tok_s=f"{row['tokens_per_second']:.0f}")
            if args.eval_steps and global_step % args.eval_steps == 0 and global_step != total_steps:
                row.update({f"eval_{k}": v for k, v in run_eval(dev_records).items()})
            if row:
                epoch_progress = round(epoch + (step_in_epoch + 1) / len(plans[epoch]), 4)
                run_log.log({"step": global_step, "epoch": epoch_progress,
                             **{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in row.items()}})
            saving = (args.save_strategy == "steps" and global_step % args.save_steps == 0) or \
                     (args.save_strategy == "epoch" and position["step_in_epoch"] == 0)
            if saving and global_step != total_steps:
                save_checkpoint(engine, tokenizer, args.output_dir, global_step, position, rank, args.save_total_limit)
            if "tokens_per_second" in row:  # the next window's throughput counts training only
                window_sums, window_start = objective.zero_sums(), time.time()
        epoch += 1
        start_step_in_epoch = 0
    bar.close()

    # ---- final evaluation and outputs -------------------------------------------------------------------
    after = run_eval(dev_records) if dev_records is not None else None
    if after:
        run_log.add_to_last({f"eval_{k}": v for k, v in after.items()})
    test_results = {name: run_eval(records) for name, records in test_sets.items()}
    if is_main:
        save_hf_model(engine.module.model, tokenizer, args.output_dir)
        if test_results:
            atomic_write_json(os.path.join(args.output_dir, "test_results.json"), test_results)
        run_log.plot_loss(os.path.join(args.output_dir, "loss.png"))
        run_log.close()
        print_summary(before, after, test_results, args.output_dir)
    return 0


def print_summary(before, after, test_results, output_dir):
    if after:
        names = sorted(after)
        print("\ndev set          " + "  ".join(f"{n:>16}" for n in names))
        if before:
            print("  before training " + "  ".join(f"{before[n]:>16.4f}" for n in names))
        print("  after training  " + "  ".join(f"{after[n]:>16.4f}" for n in names))
    if test_results:
        names = sorted(next(iter(test_results.values())))
        print("\ntest file        " + "  ".join(f"{n:>16}" for n in names))
        for file_name, metrics in test_results.items():
            print(f"  {file_name:<15}" + "  ".join(f"{metrics[n]:>16.4f}" for n in names))
    print(f"\nmodel, metrics.jsonl, loss.png{', test_results.json' if test_results else ''} in {output_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
