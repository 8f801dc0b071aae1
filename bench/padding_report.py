"""Padding of our padding-free token-budget batches versus a fixed-batch-size padded loader.

    python bench/padding_report.py
    python bench/padding_report.py --cache cache/sft_train.pt sft --max_tokens 4096

For each dataset: our batches (``token_budget_batches``: samples concatenated, no pad tokens) against a
classic loader that shuffles, takes B samples per micro-batch and pads every sequence to the longest
one in the batch (DPO: 2B sequences, prompt+chosen and prompt+rejected, padded to the longest), with B
chosen to give the same mean samples per micro-batch. Columns: padding fraction (pad tokens / tokens
computed), the budget fill of our micro-batches (real tokens / max_tokens, unused room is not computed
at all), and the largest micro-batch in tokens computed (the padded loader's peak decides its memory;
ours never exceeds max_tokens).

Datasets: the demo data (``demo/data/{sft,dpo}/train.jsonl``; raw text, so lengths are approximated by
character counts + 2, which is what the demo's character-level tokenizer gives), a token-id cache given
with ``--cache``, and a synthetic long-tailed (lognormal) distribution.
"""
import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np

from utils.batching import token_budget_batches


def demo_lengths(kind):
    """Per-sample sequence lengths of the raw demo data: (prompt, response...) approximations."""
    path = os.path.join(ROOT, "demo", "data", kind, "train.jsonl")
    if not os.path.isfile(path):
        return None
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    p = np.array([len(r["prompt"]) + 1 for r in rows])  # + bos
    if kind == "sft":
        return p, np.array([len(r["response"]) + 1 for r in rows])  # + eos
    return p, np.array([len(r["chosen"]) + 1 for r in rows]), np.array([len(r["rejected"]) + 1 for r in rows])


def cache_lengths(path, kind):
    from utils.record_io import load_records
    recs = load_records(path).records
    p = np.array([len(r["prompt_ids"]) for r in recs])
    if kind == "sft":
        return p, np.array([len(r["response_ids"]) for r in recs])
    return p, np.array([len(r["chosen_ids"]) for r in recs]), np.array([len(r["rejected_ids"]) for r in recs])


def seqs_and_costs(parts):
    """(list of per-sample sequence-length tuples as an array (n, k), costs)."""
    if len(parts) == 2:  # sft: one sequence per sample
        seqs = (parts[0] + parts[1])[:, None]
    else:  # dpo: prompt+chosen, prompt+rejected
        seqs = np.stack([parts[0] + parts[1], parts[0] + parts[2]], axis=1)
    return seqs, seqs.sum(axis=1)


def padded_loader(seqs, batch, rng):
    """Fixed batch size, shuffled, pad to the longest sequence in the batch."""
    order = rng.permutation(len(seqs))
    real = computed = peak = 0
    for start in range(0, len(order), batch):
        s = seqs[order[start:start + batch]].reshape(-1)
        real += int(s.sum())
        size = int(s.max()) * s.size
        computed += size
        peak = max(peak, size)
    return 1 - real / computed, peak


def report(name, parts, max_tokens, seed=0):
    seqs, costs = seqs_and_costs(parts)
    max_tokens = max(max_tokens, int(costs.max()))
    steps = token_budget_batches(costs, max_tokens, seed=seed)
    mbs = [mb for s in steps for rank in s.micro_batches for mb in rank]
    mean_per_mb = len(costs) / len(mbs)
    batch = max(1, round(mean_per_mb))
    pad, peak = padded_loader(seqs, batch, np.random.default_rng(seed))
    fill = costs.sum() / (len(mbs) * max_tokens)
    ours_peak = max(mb.num_tokens for mb in mbs)
    print(f"{name:<28} {len(costs):>8} {np.mean(costs):>7.1f} {max_tokens:>7} {mean_per_mb:>7.1f} | "
          f"{0.0:>7.1%} {fill:>6.1%} {ours_peak:>7} | {batch:>5} {pad:>7.1%} {peak:>8}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", nargs=2, metavar=("PATH", "TYPE"), help="a token-id cache and sft|dpo")
    ap.add_argument("--max_tokens", type=int, default=0, help="budget for the cache (default 16 x its max cost)")
    args = ap.parse_args()
    print(f"{'dataset':<28} {'samples':>8} {'mean':>7} {'budget':>7} {'/mb':>7} | "
          f"{'ours pad':>7} {'fill':>6} {'peak':>7} | {'B':>5} {'padded':>7} {'peak':>8}")
    for kind in ("sft", "dpo"):
        parts = demo_lengths(kind)
        if parts is not None:
            report(f"demo {kind} (chars)", parts, 256)
    if args.cache:
        parts = cache_lengths(*args.cache)
        budget = args.max_tokens or 16 * int(seqs_and_costs(parts)[1].max())
        report(f"cache {os.path.basename(args.cache[0])}", parts, budget)
    rng = np.random.default_rng(0)
    n = 200_000
    for sigma in (0.6, 1.0):
        prompt = np.clip(rng.lognormal(4.5, sigma, n).astype(int), 1, 2048)
        resp = np.clip(rng.lognormal(5.0, sigma, n).astype(int), 1, 2048)
        report(f"lognormal sft sigma={sigma}", (prompt, resp), 8192)
    prompt = np.clip(rng.lognormal(4.5, 1.0, n // 2).astype(int), 1, 1024)
    ch = np.clip(rng.lognormal(5.0, 1.0, n // 2).astype(int), 1, 1024)
    rj = np.clip(rng.lognormal(5.0, 1.0, n // 2).astype(int), 1, 1024)
    report("lognormal dpo sigma=1.0", (prompt, ch, rj), 8192)


if __name__ == "__main__":
    main()
