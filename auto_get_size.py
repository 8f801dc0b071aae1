"""Find the token budget per bin that gives a wanted number of samples per optimizer step.

    python auto_get_size.py <token-ids path[,path2,...]> <max_length> <sft|dpo> [--seed S]
    python auto_get_size.py cache/sft_train.arrow 1024 sft --group_size 8 --batch_size 128

Prints the dataset size and a summary of the sample costs (tokens a sample puts into a micro-batch:
SFT prompt+response, DPO prompt+chosen+rejected with the prompt shared as train.py does by default, or
2*prompt+chosen+rejected with ``--share_prompt false``), then asks ``group_size batch_size> `` in a loop
(``q``, ``0``, an empty line, Ctrl-D or Ctrl-C end it); with ``--group_size`` and ``--batch_size`` it
answers once and exits.

group_size = GPUs x h_accumulation_steps x batch_tokens_divider: the number of bins in one optimizer
step. batch_size = wanted samples (DPO: pairs) per optimizer step, on average over the epoch.

The answer ``batch_max_tokens`` is the smallest bin size b >= max(max_length, largest sample cost)
for which the training batcher (utils.batching.token_budget_plan, the code the trainer runs, here with
world_size=group_size, h=1, divider=1, so bins of b tokens) averages at least batch_size samples per
step (number of samples / number of steps). It is found by a binary search that keeps "b reaches it"
and "b-1 does not", so the printed b always satisfies the condition and b-1 does not (bin packing is
not perfectly monotone, so a smaller b far below could in rare cases reach it too). Also printed: the
smallest and largest samples per step over the epoch's steps for --seed (default 42), epoch 0; other
epochs shuffle differently and vary slightly.

The trainer flag is ``--per_device_train_batch_max_tokens b*d`` with d = --batch_tokens_divider
(default 1): with d > 1 each per-device micro-batch holds d bins of b tokens.
"""
import argparse
import math
import sys
import time

import numpy as np

from utils.batching import token_budget_plan
from utils.errors import UsageError, run_cli
from utils.schema import KINDS, sample_layout
from utils.token_cache import read_token_cache

BUDGET_FLAG = "--per_device_train_batch_max_tokens"

PROMPT = "group_size batch_size> "
HINT = "expected two positive integers 'group_size batch_size' (e.g. '8 128'); q, 0 or an empty line quits"
QUIT = {"q", "quit", "exit", "0"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 through run_cli
        raise UsageError(f"{message} (see --help)")


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", help="token-id cache(s), comma-separated")
    p.add_argument("max_length", type=int, help="the --max_length the cache was tokenized with")
    p.add_argument("training_type", choices=list(KINDS))
    p.add_argument("--group_size", type=int, help="GPUs x h_accumulation_steps x batch_tokens_divider")
    p.add_argument("--batch_size", type=int, help="wanted mean samples (DPO: pairs) per optimizer step")
    p.add_argument("--batch_tokens_divider", type=int, default=1,
                   help="only for the printed flag: it is b times this (default 1)")
    p.add_argument("--seed", type=int, default=42, help="shuffle seed for the reported min/max (default 42)")
    p.add_argument("--group_by_length", action="store_true", help="plan as train.py --group_by_length does")
    p.add_argument("--share_prompt", choices=["true", "false"], default="true",
                   help="DPO: plan pairs with their prompt once, as train.py --share_prompt (default true); false when "
                        "training with an attention that cannot share prompts (one not named segment_*: train.py "
                        "then says 'prompts not shared')")
    args = p.parse_args(argv)
    if (args.group_size is None) != (args.batch_size is None):
        raise UsageError("--group_size and --batch_size go together")
    if args.max_length < 1:
        raise UsageError("max_length must be a positive integer")
    if args.batch_tokens_divider < 1:
        raise UsageError("--batch_tokens_divider must be a positive integer")
    args.layout, _ = sample_layout(args.training_type, args.share_prompt == "true")
    return args


def load_costs(paths, layout):
    """Costs of all samples of the comma-separated cache paths, in order, as ``layout`` (a SampleLayout) packs them."""
    parts = [p for p in paths.split(",") if p.strip()]
    if not parts:
        raise UsageError("no token-id path given")
    return np.concatenate([layout.costs(read_token_cache(p.strip(), layout.kind)) for p in parts])


def histogram_lines(costs, width=40):
    """A text histogram of the costs over power-of-two buckets [2^k, 2^(k+1))."""
    lo = int(costs.min()).bit_length() - 1
    hi = int(costs.max()).bit_length()             # 2^hi > max: every cost falls in a bucket
    edges = [1 << k for k in range(lo, hi + 1)]
    counts = np.histogram(costs, bins=edges)[0]
    top = max(int(counts.max()), 1)
    lines = []
    for k, count in enumerate(counts.tolist()):
        bar = "#" * max(1 if count else 0, round(width * count / top))
        lines.append(f"  {edges[k]:>7}-{edges[k + 1] - 1:<7} {bar:<{width}} {count} ({100 * count / costs.size:.1f}%)")
    return lines


def summary(costs, layout, max_length, paths):
    kind = layout.kind
    p50, p90 = np.percentile(costs, [50, 90])
    lines = [f"{paths}: {costs.size} {kind.unit} ({kind.name})",
             f"sample cost in tokens ({layout.cost_formula()}): mean {costs.mean():.1f}  p50 {p50:.0f}  p90 {p90:.0f}  "
             f"max {int(costs.max())}  total {int(costs.sum())}"]
    lines += histogram_lines(costs)
    responses = len(kind.response_fields)  # a sample of max_length tokens per sequence costs at most this many times
    if costs.max() > responses * max_length:
        lines.append(f"note: the largest sample ({int(costs.max())} tokens) exceeds "
                     f"{f'{responses}*' if responses > 1 else ''}max_length ({responses * max_length}); budgets start "
                     "above it")
    return lines


def plan_for(costs, b, group_size, seed, group_by_length=False):
    """The batcher's plan for bins of b tokens and group_size bins per step, or None if impossible."""
    try:
        return token_budget_plan(costs, b, world_size=group_size, seed=seed, epoch=0, group_by_length=group_by_length)
    except UsageError:
        return None


def find_budget(costs, max_length, group_size, batch_size, seed=42, group_by_length=False):
    """Smallest bin size b (see the module docstring) and its plan.

    Returns ``(b, plan)``; raises UsageError when no budget can reach batch_size.
    """
    n = costs.size
    if group_size > n:
        raise UsageError(f"group_size {group_size} exceeds the {n} samples: a step needs one sample per bin")
    if batch_size > n:
        raise UsageError(f"batch_size {batch_size} exceeds the {n} samples (one step would hold them all)")

    def reaches(b):
        plan = plan_for(costs, b, group_size, seed, group_by_length)
        return plan is not None and plan.mean_samples_per_step >= batch_size, plan

    lo = max(int(max_length), int(costs.max()))
    ok, plan = reaches(lo)
    if ok:
        return lo, plan
    total = int(costs.sum())  # b = total: one bin, split into group_size bins: one step of all n samples
    # the packing is nearly perfect, so about total / (group_size * steps) tokens per bin are needed
    guess = max(lo + 1, math.ceil(total / (group_size * max(1, n // batch_size))))
    hi = min(guess, total)
    ok, hi_plan = reaches(hi)
    if ok:  # one probe below, to bracket tightly when the guess is already enough
        probe = max(lo + 1, int(hi * 0.98))
        if probe < hi:
            ok, plan = reaches(probe)
            if ok:
                hi, hi_plan = probe, plan
            else:
                lo = probe
    else:  # grow by 2% steps until it reaches
        while not ok:
            lo = hi
            hi = min(total, max(hi + 1, int(hi * 1.02)))
            ok, hi_plan = reaches(hi)
            if not ok and hi >= total:
                raise UsageError(f"no budget reaches {batch_size} samples per step with group_size {group_size}")
    while hi - lo > 1:  # invariant: lo does not reach batch_size, hi does
        mid = (lo + hi) // 2
        ok, plan = reaches(mid)
        if ok:
            hi, hi_plan = mid, plan
        else:
            lo = mid
    return hi, hi_plan


def answer_lines(costs, max_length, group_size, batch_size, seed, divider, group_by_length=False):
    t0 = time.perf_counter()
    if group_size % divider:
        raise UsageError(f"group_size {group_size} is not a multiple of --batch_tokens_divider {divider} "
                         f"(group_size = GPUs x h_accumulation_steps x batch_tokens_divider)")
    b, plan = find_budget(costs, max_length, group_size, batch_size, seed, group_by_length)
    counts = plan.step_num_samples
    smallest = max(int(max_length), int(costs.max()))
    too_many = b == smallest and plan.mean_samples_per_step > 1.25 * batch_size
    lines = [f"batch_max_tokens: {b}",
             f"samples per step: [{int(counts.min())}, {int(counts.max())}] (min, max over {plan.num_steps} steps; "
             f"mean {plan.mean_samples_per_step:.2f}; max/min {counts.max() / counts.min():.2f}; seed {seed}, epoch 0)",
             f"fill: {costs.sum() / (b * plan.num_bins):.1%} of the bins' tokens are real "
             f"({'grouped by length' if group_by_length else 'random steps'}; --group_by_length packs tighter, "
             "steps less random)" if not group_by_length else
             f"fill: {costs.sum() / (b * plan.num_bins):.1%} of the bins' tokens are real (grouped by length)",
             f"{BUDGET_FLAG} {b * divider}"]
    if divider > 1:
        lines.append(f"  (= {b} x batch_tokens_divider {divider}: each per-device micro-batch holds {divider} bins "
                     f"of {b} tokens)")
    else:
        lines.append(f"  (with --batch_tokens_divider d > 1 use {b}*d: each per-device micro-batch then holds "
                     f"d bins of {b} tokens)")
    if too_many:  # the smallest bin this tool may use already holds more than was asked
        hint = (f"pass the longest sample ({int(costs.max())} tokens) as max_length instead of {max_length}, "
                if max_length > costs.max() else "")
        lines.append(f"note: {batch_size} samples per step cannot be reached: bins of {smallest} tokens (a bin must "
                     f"hold max_length and the longest sample) already give {plan.mean_samples_per_step:.1f}; "
                     f"{hint}or lower group_size (fewer GPUs, accumulation steps or bins per micro-batch)")
    lines.append(f"  ({time.perf_counter() - t0:.1f}s)")
    return lines


def parse_answer(line):
    """(group_size, batch_size) from an input line, 'quit', or None if malformed."""
    text = line.strip().lower()
    if not text or text in QUIT:
        return "quit"
    parts = text.replace(",", " ").split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    g, bs = int(parts[0]), int(parts[1])
    return (g, bs) if g >= 1 and bs >= 1 else None


def interactive(costs, args):
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return 0
        got = parse_answer(line)
        if got == "quit":
            return 0
        if got is None:
            print(HINT)
            continue
        try:
            print("\n".join(answer_lines(costs, args.max_length, *got, args.seed, args.batch_tokens_divider,
                                          args.group_by_length)))
        except UsageError as err:
            print(f"error: {err}")
        sys.stdout.flush()


def main(argv=None):
    args = parse_args(argv)
    costs = load_costs(args.paths, args.layout)
    print("\n".join(summary(costs, args.layout, args.max_length, args.paths)), flush=True)
    if args.group_size is not None:
        if args.group_size < 1 or args.batch_size < 1:
            raise UsageError("--group_size and --batch_size must be positive integers")
        print("\n".join(answer_lines(costs, args.max_length, args.group_size, args.batch_size, args.seed,
                                     args.batch_tokens_divider, args.group_by_length)))
        return 0
    try:
        return interactive(costs, args)
    except KeyboardInterrupt:
        print()
        return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
