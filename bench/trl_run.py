"""One TRL training run on a token-id cache of this project, timed step by step (called by bench/trl_compare.py).

    python bench/trl_run.py --mode sft_padded|sft_packed|sft_padding_free|dpo_default|dpo_precompute \
        --model bench/fixture/model --data bench/fixture/cache/sft_train.pt --batch_size 16 \
        --learning_rate 1e-3 --output_dir bench/runs/x [--pack_length 1463] [--beta 0.1]

TRL gets exactly the token ids our trainer gets (no re-tokenization, so both see the same sequences):
SFT as a processed dataset (``input_ids`` = prompt + response, ``labels`` = -100 on the prompt), which
SFTTrainer takes as is; DPO as ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, the columns DPOTrainer's own
tokenization produces (its ``_prepare_dataset`` is skipped, nothing else is changed).

Settings: on CPU fp32 (``bf16=False``, ``use_cpu=True``); on a CUDA GPU ``bf16=True`` (HF Trainer's mixed
precision: fp32 weights, bf16 autocast, what our ``--bf16`` does) with a device synchronisation at every step end,
so the step clock is the GPU's. ``optim="adamw_torch_fused"`` (both trainers' default), linear decay without warm-up, weight decay 0,
``max_grad_norm=1.0``, one epoch (or ``--max_steps``), no gradient checkpointing (TRL's default turns it on; our
trainer does not use it, so both run without), sdpa attention, ``dataloader_num_workers=0``, TRL's default
logging every 10 steps, no saving until the end. Everything else is TRL's default.

Writes ``<output_dir>/result.json``: per optimizer step the wall and CPU time at its end, real and processed
(real + pad) positions of every collated batch, the logged losses, TRL's reference precompute time, and the
final model (``<output_dir>/model``) for the driver's held-out evaluation.
"""
import argparse
import json
import os
import sys
import time

T_START = time.perf_counter()

import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback

from utils.record_io import load_records  # (only to read the token-id cache)

MODES = ("sft_padded", "sft_packed", "sft_padding_free", "dpo_default", "dpo_precompute")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="token-id cache (get_tokenized_data.py)")
    p.add_argument("--batch_size", type=int, required=True, help="samples (pairs) per micro-batch")
    p.add_argument("--pack_length", type=int, help="sft_packed: tokens per packed row (max_length)")
    p.add_argument("--learning_rate", type=float, required=True)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--save_model", action="store_true")
    p.add_argument("--max_steps", type=int, default=-1, help="> 0: this many optimizer steps instead of one epoch")
    p.add_argument("--grad_accum", type=int, default=1, help="gradient_accumulation_steps")
    return p.parse_args(argv)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Wall and CPU time at the end of every optimizer step (and at the start of training), after the device
    has finished the step's work."""

    def __init__(self):
        self.train_begin = None
        self.step_end = []

    def on_train_begin(self, args, state, control, **kwargs):
        synchronize()
        self.train_begin = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        self.step_end.append((time.perf_counter(), time.process_time()))


class CountingCollator:
    """Wraps the trainer's collator: real (attention) and processed (all) positions of every batch."""

    def __init__(self, inner):
        self.inner = inner
        self.batches = []

    def __call__(self, examples):
        out = self.inner(examples)
        processed = out["input_ids"].numel()
        real = int(out["attention_mask"].sum()) if "attention_mask" in out else int(
            (out["input_ids"] != self.pad_id).sum()) if self.pad_id is not None else processed
        if "chosen_ids" in examples[0]:  # every pair: prompt+chosen and prompt+rejected, the policy's sequences
            seqs = [len(e["prompt_ids"]) + len(e[k]) for k in ("chosen_ids", "rejected_ids") for e in examples]
        elif "seq_lengths" in examples[0]:  # packed rows: several samples per example
            seqs = [int(n) for e in examples for n in e["seq_lengths"]]
        else:
            seqs = [len(e["input_ids"]) for e in examples]
        samples = len(examples) if "chosen_ids" in examples[0] else len(seqs)
        self.batches.append({"samples": samples, "processed": processed, "real": real, "seq_lengths": seqs})
        return out

    pad_id = None


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    records = load_records(args.data).records
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    on_gpu = torch.cuda.is_available()
    common = dict(output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
                  max_steps=args.max_steps, gradient_accumulation_steps=args.grad_accum,
                  learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                  max_grad_norm=1.0, optim="adamw_torch_fused", bf16=on_gpu, fp16=False, use_cpu=not on_gpu,
                  gradient_checkpointing=False, save_strategy="no", report_to="none", seed=args.seed,
                  data_seed=args.seed, dataloader_num_workers=0, disable_tqdm=True)
    model_kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    clock = StepClock()
    precompute = {}

    if args.mode.startswith("sft"):
        from trl import SFTConfig, SFTTrainer

        rows = [{"input_ids": r["prompt_ids"] + r["response_ids"],
                 "labels": [-100] * len(r["prompt_ids"]) + list(r["response_ids"])} for r in records]
        extra = {}
        if args.mode == "sft_packed":  # best-fit-decreasing packing (padding-free rows), TRL's recommended mode
            extra = dict(packing=True, packing_strategy="bfd", max_length=args.pack_length,
                         per_device_train_batch_size=1)
        elif args.mode == "sft_padding_free":  # no packing, the batch flattened into one row
            extra = dict(padding_free=True, max_length=None)
        config = SFTConfig(**{**common, **extra}, model_init_kwargs=model_kwargs)
        trainer = SFTTrainer(model=args.model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[clock])
        real_tokens_total = sum(len(r["input_ids"]) for r in rows)
    else:
        from trl import DPOConfig, DPOTrainer

        class PretokenizedDPOTrainer(DPOTrainer):
            """DPOTrainer on our token ids: its own tokenization step (``_prepare_dataset``) is skipped."""

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset

            def _precompute_ref_logps(self, dataset, name, batch_size):
                t, c = time.perf_counter(), time.process_time()
                out = super()._precompute_ref_logps(dataset, name, batch_size)
                precompute[name] = {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
                return out

        rows = [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
                for r in records]
        config = DPOConfig(**common, beta=args.beta, loss_type=["sigmoid"], max_length=None,
                           precompute_ref_log_probs=args.mode == "dpo_precompute", model_init_kwargs=model_kwargs)
        trainer = PretokenizedDPOTrainer(model=args.model, args=config, train_dataset=Dataset.from_list(rows),
                                         processing_class=tokenizer, callbacks=[clock])
        real_tokens_total = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)

    counter = CountingCollator(trainer.data_collator)
    counter.pad_id = tokenizer.pad_token_id if args.mode in ("sft_packed", "sft_padding_free") else None
    trainer.data_collator = counter
    t_ready = time.perf_counter()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    error = None
    try:
        trainer.train()
    except torch.cuda.OutOfMemoryError as err:  # recorded: the driver may retry with a smaller micro-batch
        error = "OutOfMemoryError: " + str(err).splitlines()[0]
    t_trained = time.perf_counter()
    if args.save_model:
        trainer.save_model(os.path.join(args.output_dir, "model"))
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    result = {
        "mode": args.mode, "samples": len(records), "steps": len(clock.step_end),
        "real_tokens_dataset": real_tokens_total,
        "batches": counter.batches,
        "train_begin": clock.train_begin, "step_end": clock.step_end,
        "startup_s": t_ready - T_START, "train_s": t_trained - t_ready,
        "losses": losses, "precompute": precompute,
        "threads": torch.get_num_threads(), "error": error,
        "attn_implementation": trainer.model.config._attn_implementation,
        "max_allocated": torch.cuda.max_memory_allocated() if on_gpu else None,
    }
    with open(os.path.join(args.output_dir, "result.json"), "w") as f:
        json.dump(result, f)
    print(f"{args.mode}: {len(clock.step_end)} steps, final logged loss {losses[-1]['loss'] if losses else None}"
          + (f", {error}" if error else ""))
    return 3 if error else 0


if __name__ == "__main__":
    sys.exit(main())
