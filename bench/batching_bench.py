"""Time the token-budget batcher on a large long-tailed synthetic dataset, and one auto_get_size answer.

    python bench/batching_bench.py            # 1M samples
    python bench/batching_bench.py --n 200000

Lengths are lognormal (median ~150 tokens, clipped to [1, max_length]), like real SFT data. Prints one
row per setting: time of ``token_budget_plan`` (arrays only), of ``token_budget_batches`` (the Step
objects the trainer iterates), the bin fill and the samples per step.
"""
import argparse
import time


import numpy as np

from auto_get_size import find_budget
from utils.batching import token_budget_batches, token_budget_plan


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--max_length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    costs = np.clip(rng.lognormal(5.0, 1.1, args.n).astype(np.int64) + 1, 1, args.max_length)
    print(f"{args.n} samples, cost mean {costs.mean():.0f} p50 {np.median(costs):.0f} "
          f"p99 {np.percentile(costs, 99):.0f} max {costs.max()}")
    print(f"{'T':>6} {'d':>2} {'h':>2} {'W':>3} | {'plan s':>7} {'steps s':>8} | {'bins':>8} {'steps':>7} "
          f"{'fill':>7} {'samples/step min-mean-max':>27}")
    for T, d, h, W in [(8192, 1, 1, 1), (8192, 1, 4, 8), (16384, 2, 2, 8), (4096, 1, 8, 64)]:
        plan, t_plan = timed(token_budget_plan, costs, T, batch_tokens_divider=d, h_accumulation_steps=h,
                             world_size=W)
        steps, t_steps = timed(token_budget_batches, costs, T, batch_tokens_divider=d, h_accumulation_steps=h,
                               world_size=W)
        fill = costs.sum() / (plan.num_bins * plan.bin_capacity)
        c = plan.step_num_samples
        print(f"{T:>6} {d:>2} {h:>2} {W:>3} | {t_plan:>7.2f} {t_steps:>8.2f} | {plan.num_bins:>8} "
              f"{plan.num_steps:>7} {fill:>7.4f} {c.min():>9} {c.mean():>8.1f} {c.max():>8}")
    print()
    for G, bs in [(8, 128), (32, 1024)]:
        (b, plan), t = timed(find_budget, costs, args.max_length, G, bs, 42)
        c = plan.step_num_samples
        print(f"auto_get_size answer group_size {G} batch_size {bs}: batch_max_tokens {b} "
              f"(samples/step {c.min()}-{c.max()}, mean {plan.mean_samples_per_step:.1f}) in {t:.2f}s")


if __name__ == "__main__":
    main()
