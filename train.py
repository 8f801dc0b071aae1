"""Fine-tune a causal LM with SFT or a DPO-family loss on token-budget, padding-free micro-batches.

    bash train.sh runs/sft.sh            # the usual way: DeepSpeed launcher, settings from a run script
    python train.py --train_data_path cache/train.pt --output_dir out   # one process

Each optimizer step's gradient is exactly the gradient of its samples in one big batch: the summed loss of
every micro-batch is divided by the step's global normaliser (trained tokens for SFT, pairs for DPO, over all
micro-batches and ranks), whatever the micro-batch sizes, accumulation steps or number of processes.

A micro-batch flows collate (host) -> device -> forward -> loss -> backward; every h micro-batches DeepSpeed
steps the optimizer. Nothing in a step reads device values on the host until metrics are logged, so on a GPU
the host packs the next micro-batch while the device computes.
"""
import os
import sys
import time

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
    after = save_model(run, args)
    test_results = test(run, args)
    if run.is_main:
        finish(run, model_args, args, before, after, test_results)
    return 0


def setup(model_args, data_args, args):
    """Data (every split validated before step 1) and objective, step schedule, model + DeepSpeed engine, and the
    position to start from (a checkpoint of this same run, or step 0 in an output folder holding no other run)."""
    import torch

    from utils.checkpoints import load_checkpoint, resume_note, start_checkpoint
    from utils.distributed import init_distributed
    from utils.ds_config import deepspeed_config, zero_stage
    from utils.modeling import build_model
    from utils.optimization import build_engine
    from utils.provenance import run_identity
    from utils.run_log import RunLog, describe_run, quiet_when_logged
    from utils.run_state import Run
    from utils.schedule import Position, StepSchedule

    quiet_when_logged()
    ds_config = deepspeed_config(args.deepspeed, args)
    rank, world, device = init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    tokenizer, splits, objective = load_data(model_args, data_args, args, device, say)
    train_split = splits[0]
    schedule = StepSchedule(
        objective.costs(train_split), objective.layout.loss_weights(train_split.cache),
        max_tokens=args.per_device_train_batch_max_tokens, batch_tokens_divider=args.batch_tokens_divider,
        h_accumulation_steps=args.h_accumulation_steps, world_size=world, seed=args.seed,
        num_train_epochs=args.num_train_epochs, max_steps=args.max_steps, group_by_length=args.group_by_length)
    identity = run_identity(model_args.model_name_or_path, data_args.train_data_path, objective.layout,
                            dict(vars(args), **vars(model_args), world_size=world, total_steps=schedule.total_steps))
    checkpoint = start_checkpoint(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir, identity)
    if note := resume_note(args.output_dir, args.resume_from_checkpoint, checkpoint):
        say(note)

    model, peft_model, wrapped = build_model(model_args, args, tokenizer, device, say,
                                             [(split.label, split.cache) for split in splits])
    engine, scheduler, warmup = build_engine(wrapped, args, ds_config, schedule.total_steps)
    position = Position()
    if checkpoint:
        position = Position.of(load_checkpoint(engine, checkpoint, rank, adapter=peft_model is not None))
        say(f"resumed from {checkpoint} at step {position.global_step} (epoch {position.epoch}, "
            f"step {position.step_in_epoch})")
    run_log = RunLog(args.output_dir, args.report_to, args.run_name, vars(args),
                     resume_step=position.global_step if checkpoint else None, enabled=rank == 0)
    say(describe_run(objective, len(train_split.cache), schedule.total_steps, world, args, model_args, warmup,
                     model.config._attn_implementation))
    return Run(rank, world, device, say, tokenizer, splits, objective, schedule, engine, scheduler, run_log, position,
               checkpoint is not None, identity, peft_model or model, peft_model, zero_stage(ds_config) == 0, args.bf16,
               args.per_device_eval_batch_max_tokens or args.per_device_train_batch_max_tokens)


def load_data(model_args, data_args, args, device, say):
    """(tokenizer, splits, objective): the run's sample layout (a DPO pair's prompt once where the
    attention on ``device`` allows it), the splits (``utils.token_data.load_splits``: made with this model's
    tokenizer, alike; test files tokenized as the training cache was), each sample checked to fit its budget, and
    the reference log-probs of every split when the loss needs them: what could fail after training fails now."""
    from utils.attention import shares_prompts
    from utils.hf_loading import load_tokenizer
    from utils.objectives import build_objective
    from utils.reference_cache import read_references
    from utils.schema import sample_layout
    from utils.token_data import check_budget, load_splits

    attention = model_args.attn_implementation
    layout, note = sample_layout(data_args.training_type, args.share_prompt,
                                 shares_prompts(attention, device, args.bf16), attention)
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    splits = load_splits(layout.kind, tokenizer, model_args.model_name_or_path, data_args.train_data_path,
                         data_args.dev_data_path, data_args.test_dataset_dir, data_args.test_files, say)
    if note:
        say(note)
    objective = build_objective(layout, args)
    check_budget(splits[0], layout, args.per_device_train_batch_max_tokens, "--per_device_train_batch_max_tokens",
                 args.batch_tokens_divider, default="")
    for split in splits[1:]:
        check_budget(split, layout, args.per_device_eval_batch_max_tokens or args.per_device_train_batch_max_tokens)
    if objective.uses_reference:
        read_references(data_args.ref_logps_dir, splits, tokenizer, args.bf16, say)
    return tokenizer, splits, objective


def train(run, args):
    """The optimizer steps from the run's position to the end: collate -> device -> forward -> loss -> backward ->
    step, with logging, dev evaluation and checkpoints between steps."""
    from utils.distributed import add_sums
    from utils.optimization import clip_gradients
    from utils.run_log import Progress

    engine, objective, schedule = run.engine, run.objective, run.schedule
    engine.train()  # from_pretrained returns eval mode: dropout, LoRA dropout, gradient checkpointing need this
    scale = run.world * args.h_accumulation_steps  # undoes DeepSpeed's mean over accumulation steps and ranks
    progress = Progress(schedule.total_steps, run.position.global_step, run.is_main)
    tokens_seen = schedule.tokens_before(run.position)  # every rank's tokens, from the plan: no all-reduce
    window = objective.zero_sums(), time.time()
    for epoch, step_in_epoch, step, after in schedule.steps(run.position):
        step_lr = run.scheduler.get_last_lr()[0]  # the rate this step's update uses
        for micro in step.micro_batches[run.rank]:
            batch = objective.collate(run.train_split, micro.indices, epoch).to(run.device)
            with run.autocast():
                token_logps, correct = engine(batch)  # forward: per-token log-probs of the targets
                loss_sum, sums = objective.loss(batch, token_logps, correct)
            engine.backward(loss_sum * scale / step.loss_weight_total)
            if engine.is_gradient_accumulation_boundary():
                grad_norm = clip_gradients(engine.module, args.max_grad_norm) if run.trainer_clips else None
            engine.step()  # DeepSpeed updates only at the accumulation boundary (every h micro-batches)
            add_sums(window[0], sums)
        tokens_seen += step.num_tokens
        progress.step()
        if log_step(run, args, progress, after, schedule.epoch_progress(epoch, step_in_epoch), window,
                    step_lr, tokens_seen, grad_norm):
            window = objective.zero_sums(), time.time()  # the next window's throughput counts training only
        maybe_save_checkpoint(run, args, progress, after)
    progress.close()


def log_step(run, args, progress, after, epoch, window, learning_rate, tokens_seen, grad_norm):
    """Metrics of the logging window ending at this step, and a dev evaluation, when due; True when the window
    was logged (and a new one starts)."""
    import torch

    from utils.distributed import all_reduce_sums
    from utils.run_log import format_metrics

    step, row = after.global_step, {}
    if step % args.logging_steps == 0 or step == run.schedule.total_steps:
        totals = all_reduce_sums(window[0], run.device)  # the one host read of the logging window
        row.update(run.objective.finalize(totals), learning_rate=learning_rate, num_input_tokens_seen=tokens_seen,
                   grad_norm=grad_norm if grad_norm is not None else run.engine.get_global_grad_norm(),
                   tokens_per_second=totals["processed_tokens"] / max(time.time() - window[1], 1e-9))
        progress.logged(step, row)
    if args.eval_steps and step % args.eval_steps == 0 and step != run.schedule.total_steps:
        metrics = evaluate(run, run.dev)
        progress.note(f"step {step}: dev {format_metrics(metrics)}")
        row.update({f"eval_{k}": v for k, v in metrics.items()})
    if row:
        run.log.log({"step": step, "epoch": epoch,
                     **{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in row.items()}})
    return "tokens_per_second" in row


def maybe_save_checkpoint(run, args, progress, after):
    """A checkpoint after this step when --save_strategy asks for one (the last step's model is saved instead)."""
    from utils.checkpoints import save_checkpoint

    step = after.global_step
    saving = (args.save_strategy == "steps" and step % args.save_steps == 0) or \
             (args.save_strategy == "epoch" and after.step_in_epoch == 0)
    if saving and step != run.schedule.total_steps:
        path = save_checkpoint(run.engine, run.saved_model, run.tokenizer, args.output_dir, step,
                               {**after.as_dict(), "run": run.identity}, run.rank, args.save_total_limit,
                               adapter=run.peft_model is not None)
        progress.note(f"step {step}: saved {path}")


def evaluate(run, split):
    """Metrics over a whole split, through the training path (collate -> device -> forward -> loss, without
    gradients); each rank evaluates its share and the sums are all-reduced."""
    import torch

    from utils.batching import eval_batches
    from utils.distributed import add_sums, all_reduce_sums

    run.engine.eval()
    sums = run.objective.zero_sums()  # every rank reduces the same keys, also one with nothing to evaluate
    with torch.no_grad(), run.autocast():
        for indices in eval_batches(run.objective.costs(split), run.eval_budget, run.world, run.rank):
            batch = run.objective.collate(split, indices).to(run.device)
            add_sums(sums, run.objective.loss(batch, *run.engine(batch))[1])
    run.engine.train()
    return run.objective.finalize(all_reduce_sums(sums, run.device))


def save_model(run, args):
    """The trained model (or LoRA adapter) first, so that nothing after it can lose it; then the dev metrics."""
    from utils.checkpoints import save_hf_model

    if run.is_main:
        save_hf_model(run.saved_model, run.tokenizer, args.output_dir)
    after = evaluate(run, run.dev) if run.dev is not None else None
    if after:
        run.log.add_to_last({f"eval_{k}": v for k, v in after.items()})
    return after


def test(run, args):
    """{test file name: its metrics and record counts}, written to test_results.json."""
    from utils.record_io import atomic_write_json

    results = {split.name: {**evaluate(run, split), **split.counts} for split in run.tests}
    if run.is_main and results:
        atomic_write_json(os.path.join(args.output_dir, "test_results.json"), results)
    return results


def finish(run, model_args, args, before, after, test_results):
    """Rank 0: loss.png, the loggers closed, the merged model with --merge_adapter (last: merging changes the model
    in place), and the summary."""
    from utils.checkpoints import save_hf_model
    from utils.run_log import print_summary

    run.log.plot_loss(os.path.join(args.output_dir, "loss.png"))
    run.log.close()
    if model_args.merge_adapter:
        save_hf_model(run.peft_model.merge_and_unload(), run.tokenizer, os.path.join(args.output_dir, "merged"))
    print_summary(before, after, test_results, args.output_dir)


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
