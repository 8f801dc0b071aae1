"""llmtrainer vs TRL on one CUDA GPU: real tokens/s, MFU, peak memory and GPU utilisation, bf16.

    python bench/gpu_bench.py              # on a GPU (< 4 min on an H100/H200): bench/gpu_results.{json,md}
    python bench/gpu_bench.py --dry-run    # tiny sizes on CPU, into a temporary folder (tests/test_gpu_bench.py)
    python bench/gpu_bench.py --only ours_sft,trl_sft_padding_free --deadline-s 120

Every configuration trains the same random-init Llama (SmolLM2-360M's shape: hidden 960, 32 layers, 15 heads / 5 KV
heads, vocabulary 49,152; ``--dry-run``: a 2-layer toy) from the same weights on the same token ids: long-tailed
synthetic SFT samples (log-normal prompt and response lengths, mean ~1k tokens, up to ~2.5k) and DPO pairs, with
the same samples per optimizer step: ours a 16,384-token budget per micro-batch (``train.py --bf16``, one process,
ZeRO 0), TRL 1.16 (``bench/trl_run.py``: bf16 autocast, sdpa) with ``per_device_train_batch_size`` = our plan's mean
samples per step. Runs: ours SFT (``--attn_implementation auto``, then the other attentions and
``--torch_compile``), TRL SFT ``padding_free`` and padded, our reference pass (``get_logits.py --bf16``) and DPO,
TRL DPO default and ``precompute_ref_log_probs``, and ours SFT again at the end (the two are interleaved with TRL's).

Measured: W warm-up optimizer steps, then M timed steps. real tok/s = real (non-pad) tokens of the timed steps /
their wall time (ours: from metrics.jsonl, logged every step after the step's metrics are read back from the
device; TRL: a device synchronisation at every step end). DPO counts the policy's tokens, 2*prompt + chosen +
rejected per pair: ours runs with ``--share_prompt false`` here, like TRL (``bench/shared_prompt_bench.py``
measures the shared layout). MFU = (6 N tokens + 6 layers (heads*head_dim) n^2 per sequence of n tokens) / time / peak, N the
weights of every matmul (LM head included), peak the bf16 matmul FLOP/s measured here first (8192^3). Peak memory:
``torch.cuda.max_memory_allocated`` of the run's process. GPU utilisation: NVML's, sampled every 50 ms, when
``pynvml`` is importable.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SIZES = {
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                 rope_theta=100000.0, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=2048,
                 rope_theta=10000.0, rms_norm_eps=1e-5),
}
DATA = {  # lengths: log-normal (median, sigma) clipped to [lo, hi]; steps: (warm-up, timed)
    "360m": dict(prompt=(180, 0.6, 20, 500), response=(600, 0.8, 30, 2000), sft_samples=1000, dpo_pairs=240,
                 budget=16384, steps=(3, 15)),
    "tiny": dict(prompt=(20, 0.6, 4, 50), response=(40, 0.8, 4, 200), sft_samples=96, dpo_pairs=48,
                 budget=1024, steps=(1, 2)),
}
LOW_ID = 512  # token ids above the tokenizer's special ids
LR = 1e-5


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------- fixture


def prepare(work, size, device):
    """Random-init model (saved bf16, loaded fp32 by every run) and SFT / DPO token-id caches; returns facts."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from utils.batching import token_budget_plan
    from utils.provenance import tokenizer_fingerprint
    from utils.record_io import atomic_write_json, save_records

    d, cfg = DATA[size], SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "demo", "model"))
    tokenizer.model_max_length = cfg["max_position_embeddings"]
    config = LlamaConfig(**cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(os.path.join(work, "model"))
    tokenizer.save_pretrained(os.path.join(work, "model"))
    del model

    rng = np.random.default_rng(0)

    def lengths(n, spec):
        median, sigma, lo, hi = spec
        return np.clip(np.rint(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)

    def ids(n):
        return rng.integers(LOW_ID, cfg["vocab_size"], int(n)).tolist()

    n, m = d["sft_samples"], d["dpo_pairs"]
    p, r = lengths(n, d["prompt"]), lengths(n, d["response"])
    sft = [{"prompt_id": i, "prompt_ids": ids(p[i]), "response_ids": ids(r[i])} for i in range(n)]
    p, c, r = lengths(m, d["prompt"]), lengths(m, d["response"]), lengths(m, d["response"])
    dpo = [{"prompt_id": i, "prompt_ids": ids(p[i]), "chosen_ids": ids(c[i]), "rejected_ids": ids(r[i])}
           for i in range(m)]
    facts = {"size": size, "budget": d["budget"], "warmup_steps": d["steps"][0], "timed_steps": d["steps"][1],
             "model": os.path.join(work, "model"), "layers": cfg["num_hidden_layers"],
             "attn_width": cfg["hidden_size"], "vocab": cfg["vocab_size"]}
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    q, kv, L, h, ff = (cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["num_hidden_layers"],
                       cfg["hidden_size"], cfg["intermediate_size"])
    facts["matmul_params"] = L * (h * q + 2 * h * kv + q * h + 3 * h * ff) + cfg["vocab_size"] * h
    for kind, records in (("sft", sft), ("dpo", dpo)):
        path = os.path.join(work, f"{kind}.pt")
        save_records(path, records)
        # random ids up to the model's vocabulary, declared as made for the saved tokenizer (train.py checks caches
        # against their tokenizer: without this, ids above the demo tokenizer's 301 tokens would be refused)
        atomic_write_json(path + ".meta.json", {"training_type": kind, "synthetic": True, "tokenizer": facts["model"],
                                                "vocab_size": cfg["vocab_size"],
                                                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer)})
        costs, weights = costs_and_weights(records, kind)
        plan = token_budget_plan(costs, d["budget"], seed=42, loss_weights=weights)
        facts[kind] = {"data": path, "records": len(records), "plan_steps": int(plan.num_steps),
                       "batch_size": max(1, round(plan.mean_samples_per_step))}
    return facts


def costs_and_weights(records, kind):
    """(costs, loss weights) of cache records as our runs plan them (DPO with ``--share_prompt false``)."""
    from utils.schema import KINDS, sample_layout
    from utils.token_cache import TokenCache

    layout, _ = sample_layout(kind, share_prompt=False)
    cache = TokenCache.from_records(records, KINDS[kind])
    return layout.costs(cache), layout.loss_weights(cache)


def sequences_per_step(records, kind, facts):
    """Our plan (seed 42, epoch 0): per optimizer step, the policy's sequence lengths and its real tokens."""
    from utils.batching import token_budget_batches

    steps = []
    costs, weights = costs_and_weights(records, kind)
    for step in token_budget_batches(costs, facts["budget"], seed=42, loss_weights=weights):
        idx = [i for mb in step.micro_batches[0] for i in mb.indices]
        fields = ("response_ids",) if kind == "sft" else ("chosen_ids", "rejected_ids")
        seqs = [len(records[i]["prompt_ids"]) + len(records[i][f]) for f in fields for i in idx]
        steps.append({"samples": step.num_samples, "real": sum(seqs), "seq_lengths": seqs})
    return steps


def matmul_peak(device):
    """Measured matmul FLOP/s: bf16 8192^3 on CUDA; fp32 1024^3 on CPU (dry runs)."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


# ------------------------------------------------------------------------------------------- running


class GpuMonitor(threading.Thread):
    """NVML utilisation every 50 ms (nothing without pynvml)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.stop = [], threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML: no utilisation column
            self.nvml = None

    def run(self):
        while self.nvml and not self.stop.is_set():
            self.samples.append((time.perf_counter(), self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))
            time.sleep(0.05)

    def mean(self, t0, t1):
        window = [u for t, u in self.samples if t0 <= t <= t1]
        return round(statistics.mean(window), 1) if window else None


def run_process(cmd, timeout, log_path, env=None):
    """(exit status or 'timeout', output tail, start, end)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", **(env or {}))
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    t1 = time.perf_counter()
    with open(log_path, errors="replace") as f:
        tail = "\n".join(line[-200:] for line in f.read().replace("\r", "\n").splitlines()[-12:])
    return rc, tail, t0, t1


def timed_window(res, steps, step_seconds, warm, facts, peak):
    """Throughput and MFU over the steps after ``warm``; ``step_seconds[k]`` is step k+1's time."""
    timed = steps[warm:len(step_seconds)]
    secs = sum(step_seconds[warm:])
    if not timed or secs <= 0:
        res["error"] = res.get("error") or f"{len(step_seconds)} step times for {warm} warm-up steps"
        return res
    real = sum(s["real"] for s in timed)
    flops = sum(6 * facts["matmul_params"] * n + 6 * facts["layers"] * facts["attn_width"] * n * n
                for s in timed for n in s["seq_lengths"])
    res.update(timed_steps=len(timed), real_tokens=real, real_tok_s=round(real / secs, 1),
               samples_per_s=round(sum(s["samples"] for s in timed) / secs, 2), mfu=round(flops / secs / peak, 4),
               step_s=round(statistics.median(step_seconds[warm:]), 4),
               samples_per_step=round(statistics.mean(s["samples"] for s in timed), 2))
    return res


def run_ours(name, kind, facts, work, timeout, device, peak, extra=(), ref_dir=None):
    out = os.path.join(work, name)
    warm, timed = facts["warmup_steps"], facts["timed_steps"]
    cmd = [sys.executable, os.path.join(HERE, "run_entry.py"), "train.py", "--training_type", kind,
           "--model_name_or_path", facts["model"], "--train_data_path", facts[kind]["data"], "--output_dir", out,
           "--deepspeed", "configs/ds_config_stage0.json", "--per_device_train_batch_max_tokens", str(facts["budget"]),
           "--learning_rate", str(LR), "--max_steps", str(warm + timed), "--logging_steps", "1",
           "--save_strategy", "no", "--seed", "42", *(["--bf16"] if device == "cuda" else []), *extra]
    if kind == "dpo":  # the prompt once per response, as TRL: the same tokens (shared prompts: shared_prompt_bench.py)
        cmd += ["--loss_type", "sigmoid", "--ref_logps_dir", ref_dir, "--share_prompt", "false"]
    env = {"RUN_ENTRY_OUT": out + ".peak.json"} if device == "cuda" else {"DS_ACCELERATOR": "cpu"}
    rc, tail, t0, t1 = run_process(cmd, timeout, out + ".log", env)
    res = {"config": name, "rc": rc, "wall_s": round(t1 - t0, 1), "tail": tail, "t0": t0, "t1": t1}
    with open(out + ".log", errors="replace") as f:  # train.py's first line names the attention it uses
        for line in f:
            if "optimizer steps" in line and "attention " in line:
                res["attention"] = line.split("attention ")[1].split(",")[0].strip()
    if os.path.isfile(out + ".peak.json"):
        with open(out + ".peak.json") as f:
            peak_info = json.load(f)
        if peak_info.get("max_allocated"):
            res["peak_gib"] = round(peak_info["max_allocated"] / 2 ** 30, 2)
    metrics = os.path.join(out, "metrics.jsonl")
    rows = [json.loads(line) for line in open(metrics)] if os.path.isfile(metrics) else []
    rows = [r for r in rows if "tokens_per_second" in r]
    seen = [0] + [r["num_input_tokens_seen"] for r in rows]
    step_seconds = [(b - a) / r["tokens_per_second"] for a, b, r in zip(seen, seen[1:], rows)]
    res["losses"] = [round(r["loss"], 4) for r in rows]
    if rows:
        from utils.record_io import load_records
        timed_window(res, sequences_per_step(load_records(facts[kind]["data"]).records, kind, facts), step_seconds,
                     warm, facts, peak)
    return res


def run_reference(name, facts, work, timeout, device):
    out = os.path.join(work, name)
    cmd = [sys.executable, os.path.join(HERE, "run_entry.py"), "get_logits.py", "--model_name_or_path", facts["model"],
           "--train_data_path", facts["dpo"]["data"], "--output_dir", out,
           "--per_device_eval_batch_max_tokens", str(facts["budget"]), "--share_prompt", "false",
           *(["--bf16"] if device == "cuda" else [])]
    env = {"RUN_ENTRY_OUT": out + ".peak.json"} if device == "cuda" else {"DS_ACCELERATOR": "cpu"}
    rc, tail, t0, t1 = run_process(cmd, timeout, out + ".log", env)
    return {"config": name, "rc": rc, "wall_s": round(t1 - t0, 1), "tail": tail, "ref_dir": out}


def run_trl(name, mode, facts, work, timeout, peak):
    kind = "dpo" if mode.startswith("dpo") else "sft"
    out = os.path.join(work, name)
    warm, timed = facts["warmup_steps"], facts["timed_steps"]
    cmd = [sys.executable, os.path.join(HERE, "trl_run.py"), "--mode", mode, "--model", facts["model"],
           "--data", facts[kind]["data"], "--batch_size", str(facts[kind]["batch_size"]),
           "--max_steps", str(warm + timed), "--learning_rate", str(LR), "--output_dir", out]
    rc, tail, t0, t1 = run_process(cmd, timeout, out + ".log")
    res = {"config": name, "rc": rc, "wall_s": round(t1 - t0, 1), "tail": tail, "t0": t0, "t1": t1}
    path = os.path.join(out, "result.json")
    if not os.path.isfile(path):
        return res
    with open(path) as f:
        r = json.load(f)
    res.update(attention=r.get("attn_implementation"), error=r.get("error"), losses=[round(x["loss"], 4)
               for x in r["losses"]], precompute_s=sum(v["wall_s"] for v in r["precompute"].values()) or None)
    if r.get("max_allocated"):
        res["peak_gib"] = round(r["max_allocated"] / 2 ** 30, 2)
    steps = [{"samples": b["samples"], "real": b["real"], "seq_lengths": b["seq_lengths"]} for b in r["batches"]]
    ends = [r["train_begin"][0]] + [e[0] for e in r["step_end"]]
    res["padding"] = round(1 - sum(b["real"] for b in r["batches"]) / max(1, sum(b["processed"] for b in r["batches"])), 4)
    return timed_window(res, steps, [b - a for a, b in zip(ends, ends[1:])], warm, facts, peak)


# ------------------------------------------------------------------------------------------- report


def table(results):
    runs, f = results["runs"], results["facts"]
    lines = [f"model {f['size']} ({f['matmul_params'] / 1e6:.0f} M matmul weights), budget {f['budget']} tokens, "
             f"SFT batch {f['sft']['batch_size']}, DPO batch {f['dpo']['batch_size']}, {f['warmup_steps']} warm-up + "
             f"{f['timed_steps']} timed steps, peak {results['peak_flops'] / 1e12:.0f} TFLOP/s ({results['device']})", "",
             "| config | rc | real tok/s | samples/s | ours ÷ this | MFU | padding | step s | peak GiB | GPU util | attention |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in runs.items():
        kind = "dpo" if "dpo" in name else "sft"
        key = "samples_per_s" if kind == "dpo" else "real_tok_s"  # the issue's measures: SFT tok/s, DPO pairs/s
        ours = runs.get(f"ours_{kind}", {}).get(key)
        ratio = f"{ours / r[key]:.2f}×" if ours and r.get(key) and name.startswith("trl") else ""

        def cell(key, fmt):
            return format(r[key], fmt) if isinstance(r.get(key), (int, float)) else "–"
        lines.append(f"| {name} | {r.get('rc')} | {cell('real_tok_s', ',.0f')} | {cell('samples_per_s', '.1f')} | {ratio} "
                     f"| {cell('mfu', '.1%')} | {cell('padding', '.1%')} | {cell('step_s', '.3f')} "
                     f"| {cell('peak_gib', '.1f')} | {cell('gpu_util', '.0f')} | {r.get('attention') or '–'} |")
    for name, why in results["skipped"]:
        lines.append(f"| {name} | skipped: {why} |||||||||")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, results in a temporary folder")
    p.add_argument("--only", help="comma-separated run names")
    p.add_argument("--deadline-s", type=float, default=225, help="start no run after this many seconds")
    p.add_argument("--out", help="results JSON (default: bench/gpu_results.json; dry runs: the work folder)")
    args = p.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        sys.exit("no CUDA GPU: use --dry-run for the tiny CPU version")
    start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="gpu_bench_")
    facts = prepare(work, "tiny" if args.dry_run else "360m", device)
    peak = matmul_peak(device)
    log(f"prepared in {time.perf_counter() - start:.0f} s; matmul peak {peak / 1e12:.1f} TFLOP/s")
    import importlib.util
    have_trl = importlib.util.find_spec("trl") is not None
    monitor = GpuMonitor()
    monitor.start()
    results = {"facts": facts, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
               "peak_flops": peak, "versions": {"torch": torch.__version__}, "runs": {}, "skipped": []}
    for module in ("transformers", "deepspeed", "trl"):
        try:
            results["versions"][module] = __import__(module).__version__
        except ImportError:
            pass
    gpu_only = device == "cuda"
    plan = [  # (name, needs, timeout s, run)
        ("ours_sft", None, 90, lambda t: run_ours("ours_sft", "sft", facts, work, t, device, peak)),
        ("trl_sft_padding_free", "trl", 90, lambda t: run_trl("trl_sft_padding_free", "sft_padding_free", facts, work,
                                                              t, peak)),
        ("ours_dpo_reference", None, 60, lambda t: run_reference("ours_dpo_reference", facts, work, t, device)),
        ("ours_dpo", "reference", 90, lambda t: run_ours(
            "ours_dpo", "dpo", facts, work, t, device, peak,
            ref_dir=results["runs"].get("ours_dpo_reference", {}).get("ref_dir"))),
        ("trl_dpo_default", "trl", 90, lambda t: run_trl("trl_dpo_default", "dpo_default", facts, work, t, peak)),
        ("trl_sft_padded", "trl", 90, lambda t: run_trl("trl_sft_padded", "sft_padded", facts, work, t, peak)),
        ("trl_dpo_precompute", "trl", 90, lambda t: run_trl("trl_dpo_precompute", "dpo_precompute", facts, work, t,
                                                            peak)),
        ("ours_sft_segment_flex", "gpu", 90, lambda t: run_ours("ours_sft_segment_flex", "sft", facts, work, t,
                                                                device, peak, ["--attn_implementation", "segment_flex"])),
        ("ours_sft_torch_compile", "gpu", 120, lambda t: run_ours("ours_sft_torch_compile", "sft", facts, work, t,
                                                                  device, peak, ["--torch_compile"])),
        ("ours_sft_segment_sdpa", "gpu", 90, lambda t: run_ours("ours_sft_segment_sdpa", "sft", facts, work, t,
                                                                device, peak, ["--attn_implementation", "segment_sdpa"])),
    ]
    only = set(args.only.split(",")) if args.only else None
    for name, needs, timeout, run in plan:
        left = args.deadline_s - (time.perf_counter() - start)
        why = ("not asked for" if only and name not in only else
               "trl is not installed" if needs == "trl" and not have_trl else
               "GPU only" if needs == "gpu" and not gpu_only else
               "no reference log-probs" if needs == "reference" and results["runs"].get(
                   "ours_dpo_reference", {}).get("rc") != 0 else
               f"no time left ({left:.0f} s)" if left < 20 else None)
        if why:
            results["skipped"].append((name, why))
            continue
        log(f"=== {name} (timeout {min(timeout, left):.0f} s)")
        res = run(min(timeout, left) * (5 if args.dry_run else 1))
        if "t0" in res:
            res["gpu_util"] = monitor.mean(res.pop("t0"), res.pop("t1"))
        results["runs"][name] = res
        log({k: v for k, v in res.items() if k != "tail"} if res.get("rc") == 0 else res)
    monitor.stop.set()
    out = args.out or (os.path.join(work, "gpu_results.json") if args.dry_run else os.path.join(HERE, "gpu_results.json"))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    text = table(results)
    with open(out[:-len(".json")] + ".md", "w") as f:
        f.write(text + "\n")
    log(text)
    log(f"results: {out} (total {time.perf_counter() - start:.0f} s)")
    return 0 if all(r.get("rc") == 0 for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
