"""Datasets at real scale: a 100M-token DPO cache, opened, validated, planned and trained on by two processes.

    python bench/scale_bench.py                     # ~2-3 minutes on the 2-core machine; needs ~1 GB of /tmp
    python bench/scale_bench.py --tokens 20000000   # smaller

Reports, each in a fresh process:
* tokenize: ``get_tokenized_data.py`` on synthetic raw DPO records (~420 tokens a sequence) -> records/s, tokens/s;
* build: a synthetic DPO cache of ``--tokens`` token ids (log-normal lengths, demo vocabulary) written as .arrow;
* open + validate + plan: ``read_token_cache`` then the epoch's token-budget plan (16,384-token budget), timed;
* plan 10M samples: ``token_budget_plan`` on 10M log-normal costs;
* memory: two ``train.py`` processes (SimPO: no reference cache needed) on the same cache at once, and one on a
  200-pair cache (the "empty-cache" baseline); peak RSS and PSS from /proc/<pid>/smaps_rollup, sampled every
  50 ms. RSS counts the cache pages a process touched; PSS splits shared pages between the processes using them.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")


def synthetic_cache(path, tokens, seed=0):
    """A DPO TokenCache of about ``tokens`` ids (prompt once, chosen, rejected), written to ``path`` (.arrow)."""
    import numpy as np

    from utils.schema import KINDS
    from utils.token_cache import TokenCache, write_token_cache

    rng = np.random.default_rng(seed)
    mean = (180 + 2 * 240) * np.exp(0.6 ** 2 / 2)  # prompt + chosen + rejected: log-normal means of the medians below
    n = max(8, int(tokens / mean))
    columns = {}
    for field, median in (("prompt_ids", 180), ("chosen_ids", 240), ("rejected_ids", 240)):
        lengths = np.clip(np.rint(rng.lognormal(np.log(median), 0.6, n)), 2, 2000).astype(np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        columns[field] = (rng.integers(5, 301, int(offsets[-1]), dtype=np.uint16), offsets)
    cache = TokenCache(KINDS["dpo"], columns, [f"pair-{i}" for i in range(n)], str(path))
    write_token_cache(path, cache)
    # the meta file get_tokenized_data.py writes beside a cache (train.py checks the tokenizer by its fingerprint)
    from transformers import AutoTokenizer

    from utils.provenance import tokenizer_fingerprint
    from utils.record_io import atomic_write_json
    atomic_write_json(str(path) + ".meta.json", {"training_type": "dpo", "synthetic": True, "tokenizer": "demo/model",
                                                 "tokenizer_fingerprint": tokenizer_fingerprint(
                                                     AutoTokenizer.from_pretrained(os.path.join(ROOT, "demo/model")))})
    return n, sum(int(o[-1]) for _, o in columns.values())


def timed_python(code):
    """Run ``code`` in a fresh interpreter; it prints one JSON line, returned as a dict."""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def open_and_plan(path):
    return timed_python(f"""
import json, time
t0 = time.perf_counter()
from utils.token_cache import read_token_cache
from utils.batching import token_budget_plan
from utils.schema import KINDS, SampleLayout
t1 = time.perf_counter()
cache = read_token_cache({str(path)!r}, KINDS["dpo"])
t2 = time.perf_counter()
layout = SampleLayout(KINDS["dpo"])
plan = token_budget_plan(layout.costs(cache), 16384, seed=42, loss_weights=layout.loss_weights(cache))
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "open_validate_s": t2 - t1, "plan_s": t3 - t2, "pairs": len(cache),
                   "steps": int(plan.num_steps)}}))""")


def plan_10m(samples):
    return timed_python(f"""
import json, time
import numpy as np
from utils.batching import token_budget_plan
costs = np.clip(np.rint(np.random.default_rng(0).lognormal(np.log(600), 0.8, {samples})), 2, 8192).astype(np.int64)
t = time.perf_counter()
plan = token_budget_plan(costs, 16384, h_accumulation_steps=4, world_size=8, seed=1)
print(json.dumps({{"plan_s": time.perf_counter() - t, "samples": {samples}, "steps": int(plan.num_steps)}}))""")


def tokenize_throughput(records, work, num_proc):
    import random

    from tokenize_bench import text
    rng = random.Random(0)
    raw = os.path.join(work, "raw.jsonl")
    with open(raw, "w") as f:
        for i in range(records):
            f.write(json.dumps({"prompt_id": i, "prompt": text(rng, rng.randint(20, 80)) + "\n",
                                "chosen": text(rng, rng.randint(30, 120)), "rejected": text(rng, rng.randint(30, 120))}) + "\n")
    out = os.path.join(work, "tok.arrow")
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "tokenized_inputs/get_tokenized_data.py", "--model", "demo/model",
                             "--train_dataset_path", raw, "--train_save_path", out, "--training_type", "dpo",
                             "--prompt_type", "completion", "--max_length", "4096", "--num_proc", str(num_proc)],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    anon = 0  # peak anonymous memory (RssAnon): RSS also counts the pages of files it maps, which are reclaimable
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                anon = max(anon, next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024)
        except (OSError, StopIteration):
            pass
        time.sleep(0.05)
    status = proc.returncode
    seconds = time.perf_counter() - t
    if status:
        raise SystemExit("get_tokenized_data.py failed")
    from utils.schema import KINDS
    from utils.token_cache import read_token_cache
    cache = read_token_cache(out, KINDS["dpo"])
    tokens = sum(int(o[-1]) for _, o in cache.columns.values())
    return {"records": records, "seconds": seconds, "records_per_s": records / seconds, "tokens_per_s": tokens / seconds,
            "peak_anon_mb": anon, "raw_mb": os.path.getsize(raw) / 1e6}


def memory_of_training(caches, work, name):
    """Start one train.py per cache at once; peak RSS / PSS (MB) of each, sampled from /proc."""
    procs = []
    for k, cache in enumerate(caches):
        args = ["--training_type", "dpo", "--loss_type", "simpo", "--model_name_or_path", "demo/model",
                "--train_data_path", cache, "--output_dir", os.path.join(work, f"{name}{k}"), "--max_steps", "3",
                "--per_device_train_batch_max_tokens", "16384", "--save_strategy", "no", "--learning_rate", "1e-4"]
        procs.append(subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    peaks = [{"rss_mb": 0.0, "pss_mb": 0.0} for _ in procs]
    while any(p.poll() is None for p in procs):
        for p, peak in zip(procs, peaks):
            try:
                with open(f"/proc/{p.pid}/smaps_rollup") as f:
                    fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1] == "kB"}
                peak["rss_mb"] = max(peak["rss_mb"], fields["Rss"] / 1024)
                peak["pss_mb"] = max(peak["pss_mb"], fields["Pss"] / 1024)
            except (OSError, KeyError, ValueError):
                pass
        time.sleep(0.05)
    for p in procs:
        if p.returncode != 0:
            raise SystemExit(f"train.py failed: {p.stderr.read()[-2000:]}")
    return peaks


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=100_000_000)
    p.add_argument("--plan_samples", type=int, default=10_000_000)
    p.add_argument("--tokenize_records", type=int, default=20_000)
    p.add_argument("--num_proc", type=int, default=1, help="get_tokenized_data.py worker processes")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        tok = tokenize_throughput(args.tokenize_records, work, args.num_proc)
        print(f"tokenize {tok['records']} records ({tok['raw_mb']:.0f} MB .jsonl; completion, --num_proc {args.num_proc}, "
              f"end to end): {tok['records_per_s']:.0f} records/s, {tok['tokens_per_s'] / 1e6:.2f}M tokens/s -> "
              f"{args.tokens / tok['tokens_per_s'] / 60:.1f} min for {args.tokens / 1e6:.0f}M tokens; peak anonymous "
              f"memory {tok['peak_anon_mb']:.0f} MB (the parent process)", flush=True)
        big, small = os.path.join(work, "big.arrow"), os.path.join(work, "small.arrow")
        t = time.perf_counter()
        pairs, tokens = synthetic_cache(big, args.tokens)
        synthetic_cache(small, 200 * 660, seed=1)
        print(f"build: {pairs} pairs, {tokens / 1e6:.1f}M token ids, {os.path.getsize(big) / 1e6:.0f} MB .arrow in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        o = open_and_plan(big)
        print(f"open + validate: {o['open_validate_s']:.2f} s, plan ({o['steps']} steps): {o['plan_s']:.2f} s, "
              f"total {o['open_validate_s'] + o['plan_s']:.2f} s (imports {o['import_s']:.1f} s)", flush=True)
        pl = plan_10m(args.plan_samples)
        print(f"plan {pl['samples'] / 1e6:.0f}M samples (8 ranks x 4 accumulation): {pl['plan_s']:.2f} s, "
              f"{pl['steps']} steps", flush=True)
        (base,) = memory_of_training([small], work, "baseline")
        two = memory_of_training([big, big], work, "two")
        print(f"memory, baseline (200 pairs): RSS {base['rss_mb']:.0f} MB, PSS {base['pss_mb']:.0f} MB")
        for k, m in enumerate(two):
            print(f"memory, process {k + 1} of 2 on the {tokens / 1e6:.0f}M-token cache: RSS {m['rss_mb']:.0f} MB "
                  f"(+{m['rss_mb'] - base['rss_mb']:.0f}), PSS {m['pss_mb']:.0f} MB (+{m['pss_mb'] - base['pss_mb']:.0f})")


if __name__ == "__main__":
    main()
