"""Where a training step's time goes: torch.profiler over our step and over TRL's, on the benchmark data.

    python bench/profile_step.py --task sft --data fixture          # ours: SFT micro-batches of the real plan
    python bench/profile_step.py --task dpo --data demo --steps 10
    python bench/profile_step.py --task sft --data fixture --trl packed   # TRL's SFTTrainer step (packed rows)
    python bench/profile_step.py --task dpo --data demo --sliced_attention   # the attention before de9a106

Ours: the trainer's own pieces (``utils.objectives`` collate -> ``ResponseLogProbs`` with ``segment_sdpa`` -> loss,
backward, ``torch.optim.AdamW``) on the steps ``token_budget_batches`` plans for the benchmark budget, without
DeepSpeed (its per-step overhead shows in py-spy of the real process, see bench/README.md). TRL: its trainer's
``training_step`` on the batches of its own dataloader. Prints wall time per phase and torch.profiler's top
operators by self CPU time (one thread unless --threads).
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from torch.profiler import ProfilerActivity, profile

from trl_compare import CACHE, DATASETS, MODEL, budget, load_cache


def profile_ours(task, dataset, steps, rows):
    from utils.batching import token_budget_batches
    from utils.modeling import ResponseLogProbs, load_causal_lm
    from utils.objectives import DPOObjective, SFTObjective
    from utils.reference_cache import read_reference
    from utils.schema import KINDS, sample_layout
    from utils.token_cache import TokenCache
    from utils.token_data import Split

    path = os.path.join(CACHE, DATASETS[dataset][task]["train"])
    split = Split("train", f"training set {path}", path,
                  TokenCache.from_records(load_cache(DATASETS[dataset][task]["train"]), KINDS[task], path))
    layout, _ = sample_layout(task, share_prompt=False)  # as trl_compare runs ours
    max_tokens = budget(dataset, task)
    if task == "dpo":  # cached reference log-probs of the initial model (as train.py reads them)
        import subprocess
        ref_dir = os.path.join(ROOT, "bench", "runs", f"profile_ref_{dataset}")
        if not os.path.exists(os.path.join(ref_dir, "train.pt")):
            subprocess.run([sys.executable, "get_logits.py", "--model_name_or_path", MODEL, "--train_data_path",
                            os.path.join(CACHE, DATASETS[dataset][task]["train"]), "--output_dir", ref_dir],
                           cwd=ROOT, check=True)
        from utils.hf_loading import load_tokenizer
        split.reference = read_reference(ref_dir, split, load_tokenizer(MODEL))
        objective = DPOObjective(layout, "sigmoid", 0.1, 0.0, 0.0, 42)
    else:
        objective = SFTObjective(layout)
    plan = token_budget_batches(objective.costs(split), max_tokens, seed=42, epoch=0,
                                loss_weights=layout.loss_weights(split.cache))
    model = ResponseLogProbs(load_causal_lm(MODEL))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    phases = {"forward+loss": 0.0, "backward": 0.0, "optimizer": 0.0}

    def step(s):
        for micro in s.micro_batches[0]:
            t = time.perf_counter()
            batch = objective.collate(split, micro.indices).to("cpu")
            loss_sum, _ = objective.loss(batch, *model(batch))
            t2 = time.perf_counter()
            (loss_sum / s.loss_weight_total).backward()
            t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        t4 = time.perf_counter()
        return t2 - t, t3 - t2, t4 - t3

    for s in plan[:2]:  # warm-up
        step(s)
    chosen = plan[2:2 + steps]
    tokens = sum(s.num_tokens for s in chosen)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for s in chosen:
            for k, v in zip(phases, step(s)):
                phases[k] += v
        wall = time.perf_counter() - t0
    return prof, wall, tokens, phases


def profile_trl(task, dataset, steps, mode):
    import trl_run

    s = DATASETS[dataset][task]
    args = trl_run.parse_args(["--mode", mode, "--model", MODEL, "--data", os.path.join(CACHE, s["train"]),
                               "--batch_size", str(s["batch"]), "--learning_rate", str(s["lr"]),
                               "--output_dir", os.path.join(ROOT, "bench", "runs", "profile_trl"),
                               "--pack_length", str(budget(dataset, task))])
    # build the trainer exactly as trl_run does, then drive training_step by hand
    captured = {}
    import transformers
    original = transformers.Trainer.train
    transformers.Trainer.train = lambda self, *a, **k: captured.setdefault("trainer", self)
    try:
        trl_run.main(["--mode", args.mode, "--model", args.model, "--data", args.data, "--batch_size",
                      str(args.batch_size), "--learning_rate", str(args.learning_rate), "--output_dir", args.output_dir,
                      "--pack_length", str(args.pack_length)])
    except Exception:
        pass
    finally:
        transformers.Trainer.train = original
    trainer = captured["trainer"]
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    loader = trainer.get_train_dataloader()
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) >= steps + 2:
            break
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer's training loop

    def step(b):
        t = time.perf_counter()
        trainer.training_step(trainer.model, b)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        return t2 - t, 0.0, time.perf_counter() - t2

    for b in batches[:2]:
        step(b)
    phases = {"forward+backward": 0.0, "-": 0.0, "optimizer": 0.0}
    real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches[2:])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for b in batches[2:]:
            for k, v in zip(phases, step(b)):
                phases[k] += v
        wall = time.perf_counter() - t0
    return prof, wall, real, phases


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["sft", "dpo"], required=True)
    p.add_argument("--data", choices=["fixture", "demo"], default="fixture")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--trl", choices=["padded", "packed", "default", "precompute"])
    p.add_argument("--sliced_attention", action="store_true",
                   help="ours with the per-sequence slicing attention of before de9a106 (registered at run time)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.sliced_attention:
        from transformers import AttentionInterface

        from segment_attention_bench import sliced_segment_sdpa
        from utils import attention
        AttentionInterface.register(attention.NAME, sliced_segment_sdpa)
    if args.trl:
        mode = {"padded": "sft_padded", "packed": "sft_packed", "default": "dpo_default",
                "precompute": "dpo_precompute"}[args.trl]
        prof, wall, tokens, phases = profile_trl(args.task, args.data, args.steps, mode)
        who = f"TRL {mode}"
    else:
        prof, wall, tokens, phases = profile_ours(args.task, args.data, args.steps, args.rows)
        who = "ours (sliced attention, before de9a106)" if args.sliced_attention else "ours"
    print(f"{who} {args.task} on {args.data}: {args.steps} steps, {tokens} real tokens, {wall:.2f} s, "
          f"{tokens / wall:.0f} real tokens/s (profiler on)")
    print("phases: " + ", ".join(f"{k} {v:.2f} s ({100 * v / wall:.0f}%)" for k, v in phases.items() if v))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=45))


if __name__ == "__main__":
    main()
