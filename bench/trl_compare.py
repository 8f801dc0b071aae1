"""Side-by-side benchmark of this trainer and HuggingFace TRL: throughput, padding, memory, MFU and final loss.

    pip install -r requirements.txt -r bench/requirements-bench.txt
    python bench/trl_compare.py                       # the full suite (~30 min on the 2-core machine)
    python bench/trl_compare.py --reps 1 --datasets demo --tasks sft   # a quick look

Same model (bench/fixture/model), same token ids, same machine, one invocation. For every dataset
(``fixture``: long-tailed lengths; ``demo``: the demo data) and task, each configuration trains ONE epoch over
the same training samples, so every run sees exactly the same samples and the same real tokens:

* SFT: ``ours`` (``python train.py``, one process, DeepSpeed ZeRO-0 on CPU), ``trl_padded`` (SFTTrainer with its
  default padding collator), ``trl_packed`` (SFTConfig(packing=True, packing_strategy="bfd"): padding-free
  packed rows, which run on CPU through transformers' sdpa with a block-diagonal mask built from position_ids).
* DPO: ``ours`` (``python train.py`` against reference log-probs cached by ``python get_logits.py``, run and timed
  as ``ours_ref``), ``trl_default`` (DPOTrainer, reference model run every step, padded batches),
  ``trl_precompute`` (``precompute_ref_log_probs=True``). TRL 1.16's DPO ``padding_free`` is disabled (it warns
  and pads), so there is no padding-free TRL DPO mode to compare with.

Matched settings: global batch B samples (pairs) per step (ours: the budget ``auto_get_size.py --group_size 1
--batch_size B`` prints, so the MEAN samples per step is B), AdamW, the same learning rate, linear decay to 0
without warm-up, weight decay 0, clipping 1.0, fp32, seed 42, no gradient checkpointing, the same number of
torch threads (``--threads``, default 1, see bench/README.md). Our DPO runs with ``--share_prompt false``: each
sequence carries its prompt, as TRL's do, so both process the same tokens (sharing the prompt is measured by
``bench/shared_prompt_bench.py``).

Measured per run (medians over ``--reps`` interleaved repetitions are reported):
* real tokens/s: real (non-pad) tokens of the epoch / wall time of the training loop (first step to last step;
  start-up, data preparation, reference precompute and saving excluded; DPO counts 2*prompt + chosen +
  rejected per pair, the policy's tokens). Also tokens per CPU-second of the process over steps 2..S (less
  sensitive to other load on the machine) and the whole process wall time.
* padding: pad positions / processed positions.
* peak RSS of the process (``wait4`` rusage, one process per run).
* MFU: model FLOPs / loop time / measured fp32 matmul FLOP/s, with model FLOPs = 6 * N * tokens (N: the
  weights of every matmul, LM head included, embedding lookup excluded) + causal attention 6 * layers *
  heads * head_dim * n^2 per sequence of n tokens (forward QK^T and AV halved by causality, backward 2x).
  DPO counts the policy's forward + backward only (the reference forward is overhead). The matmul
  FLOP/s is measured here with ``torch.matmul`` of 2048x2048 fp32 matrices on the same number of threads.
* final loss after the epoch: the mean training loss of the last 10 steps, and the held-out loss of the
  saved model on the dev split (SFT: token-mean NLL of the responses with transformers' own
  ``model(labels=...)``; DPO: sigmoid DPO loss against the initial model), computed here, identically
  for every run.

Writes bench/results.json and bench/results.png and prints a markdown table (also bench/results.md).
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "fixture")
CACHE = os.path.join(FIXTURE, "cache")
MODEL = os.path.join(FIXTURE, "model")
RUNS = os.path.join(HERE, "runs")

# dataset -> task -> settings
DATASETS = {
    "fixture": {"sft": dict(train="sft_train.pt", dev="sft_dev.pt", max_length=1024, batch=16, lr=1e-3),
                "dpo": dict(train="dpo_train.pt", dev="dpo_dev.pt", max_length=1024, batch=8, lr=5e-4)},
    "demo": {"sft": dict(train="demo_sft_train.pt", dev="demo_sft_dev.pt", max_length=256, batch=64, lr=1e-3),
             "dpo": dict(train="demo_dpo_train.pt", dev="demo_dpo_dev.pt", max_length=256, batch=64, lr=5e-4)},
}
CONFIGS = {"sft": ["ours", "trl_padded", "trl_packed"], "dpo": ["ours", "trl_default", "trl_precompute", "ours_sft"]}
BETA = 0.1
SEED = 42


def log(*a):
    print(*a, flush=True)


def code_version():
    """HEAD and a hash of the trainer's code as it is on disk (train.py, get_logits.py, utils/)."""
    import hashlib

    h = hashlib.sha256()
    for base, _, files in sorted(os.walk(os.path.join(ROOT, "utils"))):
        for name in sorted(files):
            if name.endswith(".py"):
                h.update(open(os.path.join(base, name), "rb").read())
    for name in ("train.py", "get_logits.py"):
        h.update(open(os.path.join(ROOT, name), "rb").read())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"head": head.strip(), "code_sha256": h.hexdigest()[:16]}


def loadavg():
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------------ measuring


def run_measured(cmd, env, watch_metrics=None, expected_rows=None):
    """Run ``cmd``; returns wall time, rusage peak RSS, CPU times at metrics rows 1 and ``expected_rows``."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_chunks = []
    import threading

    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    ps = psutil.Process(proc.pid)
    marks, peak_tree = {}, 0
    usage, status = None, None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # wait4: this child's own rusage (peak RSS)
        if pid:
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
            break
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak_tree = max(peak_tree, rss)
            if watch_metrics and os.path.exists(watch_metrics):
                with open(watch_metrics, "rb") as f:
                    rows = f.read().count(b"\n")
                for k in (1, expected_rows):
                    if rows >= k and k not in marks:
                        cpu = ps.cpu_times()
                        marks[k] = (time.perf_counter(), cpu.user + cpu.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            pass
        time.sleep(0.02)
    reader.join()
    output = (out_chunks[0] if out_chunks else b"").decode(errors="replace")
    if rc != 0:
        raise RuntimeError(f"command failed ({rc}): {' '.join(cmd)}\n{output[-4000:]}")
    return {"wall_s": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "peak_rss_tree_mb": peak_tree / 2**20, "marks": marks, "output": output}


def measured_env(threads):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu",
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None)
    return env


def matmul_flops(threads, n=2048, trials=7):
    """fp32 torch.matmul FLOP/s (2 n^3 per product) on ``threads`` threads: median and best of ``trials``."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        rates.append(3 * 2 * n ** 3 / (time.perf_counter() - t))
    return {"median": statistics.median(rates), "best": max(rates), "n": n, "threads": threads}


# ------------------------------------------------------------------------------------------------ data facts


def load_cache(name):
    from utils.record_io import load_records

    return load_records(os.path.join(CACHE, name)).records


def sequences(records, task):
    """(prompt length, response length) of every sequence the policy processes."""
    if task == "sft":
        return [(len(r["prompt_ids"]), len(r["response_ids"])) for r in records]
    return [(len(r["prompt_ids"]), len(r[k])) for r in records for k in ("chosen_ids", "rejected_ids")]


def model_facts():
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(MODEL)
    d, L, V, ff = c.hidden_size, c.num_hidden_layers, c.vocab_size, c.intermediate_size
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * ff
    return {"matmul_params": L * per_layer + V * d, "layers": L, "attn_width": q, "vocab": V, "hidden": d}


def epoch_flops(records, task, facts):
    """Model FLOPs of one training epoch over ``records`` (policy forward + backward)."""
    total = 0.0
    for p, r in sequences(records, task):
        n = p + r
        total += 6 * facts["matmul_params"] * n + 6 * facts["layers"] * facts["attn_width"] * n * n
    return total


def budget(dataset, task):
    s = DATASETS[dataset][task]
    out = subprocess.run([sys.executable, "auto_get_size.py", os.path.join(CACHE, s["train"]), str(s["max_length"]),
                          task, "--group_size", "1", "--batch_size", str(s["batch"]), "--share_prompt", "false"],
                         cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return int(re.findall(r"--per_device_train_batch_max_tokens (\d+)", out)[-1])


def our_plan(records, task, max_tokens):
    from utils.batching import token_budget_batches
    from utils.schema import KINDS, sample_layout
    from utils.token_cache import TokenCache

    layout, _ = sample_layout(task, share_prompt=False)  # ours runs with --share_prompt false, like TRL
    cache = TokenCache.from_records(records, KINDS[task])
    costs = layout.costs(cache)
    plan = token_budget_batches(costs, max_tokens, batch_tokens_divider=1, h_accumulation_steps=1, world_size=1,
                                seed=SEED, epoch=0, loss_weights=layout.loss_weights(cache))
    return [(s.num_samples, s.num_tokens) for s in plan]


# ------------------------------------------------------------------------------------------------ runs


def run_ours(dataset, task, rep, threads, max_tokens, records, as_sft=False):
    """``as_sft``: SFT on the DPO data's sequences (every pair as two samples), same token budget as our DPO."""
    s = dict(DATASETS[dataset][task])
    out = os.path.join(RUNS, f"{dataset}_{task}_ours{'_sft' if as_sft else ''}_{rep}")
    if as_sft:
        s["train"] = s["train"].replace("_train.pt", "_as_sft_train.pt")
        task = "sft"
        records = load_cache(s["train"])
    shutil.rmtree(out, ignore_errors=True)
    env = measured_env(threads)
    result = {}
    extra = []
    if task == "dpo":
        ref_dir = out + "_ref"
        shutil.rmtree(ref_dir, ignore_errors=True)
        ref = run_measured([sys.executable, "get_logits.py", "--model_name_or_path", MODEL, "--train_data_path",
                            os.path.join(CACHE, s["train"]), "--output_dir", ref_dir, "--share_prompt", "false"], env)
        result["ref"] = {k: ref[k] for k in ("wall_s", "peak_rss_mb")}
        # the fixed part of that: the same command on a single pair (imports, process group, model load, writing)
        import torch
        one = os.path.join(RUNS, f"one_pair_{dataset}.pt")
        torch.save(records[:1], one)
        shutil.rmtree(ref_dir + "_one", ignore_errors=True)
        fixed = run_measured([sys.executable, "get_logits.py", "--model_name_or_path", MODEL, "--train_data_path", one,
                              "--output_dir", ref_dir + "_one", "--share_prompt", "false"], env)
        result["ref"]["fixed_s"] = fixed["wall_s"]
        extra = ["--ref_logps_dir", ref_dir, "--loss_type", "sigmoid", "--beta", str(BETA), "--share_prompt", "false"]
    plan = our_plan(records, task, max_tokens)
    metrics = os.path.join(out, "metrics.jsonl")
    cmd = [sys.executable, "train.py", "--training_type", task, "--model_name_or_path", MODEL,
           "--train_data_path", os.path.join(CACHE, s["train"]), "--output_dir", out,
           "--deepspeed", "configs/ds_config_stage0.json", "--per_device_train_batch_max_tokens", str(max_tokens),
           "--learning_rate", str(s["lr"]), "--lr_scheduler_type", "linear", "--weight_decay", "0.0",
           "--max_grad_norm", "1.0", "--num_train_epochs", "1", "--logging_steps", "1", "--save_strategy", "no",
           "--seed", str(SEED), *extra]
    m = run_measured(cmd, env, watch_metrics=metrics, expected_rows=len(plan))
    rows = [json.loads(line) for line in open(metrics)]
    assert len(rows) == len(plan), (len(rows), len(plan))
    step_s = [tok / row["tokens_per_second"] for (_, tok), row in zip(plan, rows)]
    real = sum(t for _, t in plan)
    (t1, c1), (tS, cS) = m["marks"][1], m["marks"][len(plan)]
    result.update({
        "steps": len(plan), "samples": sum(n for n, _ in plan), "real_tokens": real, "processed_tokens": real,
        "loop_s": sum(step_s), "steps2_tokens": real - plan[0][1], "steps2_cpu_s": cS - c1, "steps2_wall_s": tS - t1,
        "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"], "peak_rss_tree_mb": m["peak_rss_tree_mb"],
        "train_loss_last10": statistics.mean(r["loss"] for r in rows[-10:]),
        "samples_per_step": [n for n, _ in plan], "model_dir": out,
    })
    return result


def run_trl(dataset, task, config, rep, threads, max_tokens):
    s = DATASETS[dataset][task]
    out = os.path.join(RUNS, f"{dataset}_{task}_{config}_{rep}")
    shutil.rmtree(out, ignore_errors=True)
    mode = {"trl_padded": "sft_padded", "trl_packed": "sft_packed", "trl_padding_free": "sft_padding_free",
            "trl_default": "dpo_default", "trl_precompute": "dpo_precompute"}[config]
    cmd = [sys.executable, os.path.join("bench", "trl_run.py"), "--mode", mode, "--model", MODEL,
           "--data", os.path.join(CACHE, s["train"]), "--batch_size", str(s["batch"]), "--learning_rate", str(s["lr"]),
           "--beta", str(BETA), "--seed", str(SEED), "--output_dir", out, "--save_model", "--pack_length", str(max_tokens)]
    m = run_measured(cmd, measured_env(threads))
    r = json.load(open(os.path.join(out, "result.json")))
    batches = r["batches"]
    ends = r["step_end"]
    assert len(batches) == len(ends), (len(batches), len(ends))
    real, processed = sum(b["real"] for b in batches), sum(b["processed"] for b in batches)
    losses = r["losses"]
    result = {
        "steps": len(ends), "samples": sum(b["samples"] for b in batches), "real_tokens": real,
        "processed_tokens": processed, "loop_s": ends[-1][0] - r["train_begin"][0],
        "steps2_tokens": real - batches[0]["real"], "steps2_cpu_s": ends[-1][1] - ends[0][1],
        "steps2_wall_s": ends[-1][0] - ends[0][0], "wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"],
        "peak_rss_tree_mb": m["peak_rss_tree_mb"],
        "train_loss_last10": losses[-1]["loss"] if losses else None,  # TRL logs the mean of every 10 steps
        "samples_per_step": [b["samples"] for b in batches], "model_dir": os.path.join(out, "model"),
        "precompute": r["precompute"],
    }
    return result


# ------------------------------------------------------------------------------------------------ held-out loss


def dev_loss(model_dir, task, dev_records, ref_logps=None):
    """SFT: token-mean response NLL via model(labels=...); DPO: mean sigmoid loss vs the initial model."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        if task == "sft":
            nll, n = 0.0, 0
            for r in dev_records:
                ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
                labels = ids.clone()
                labels[0, :len(r["prompt_ids"])] = -100
                k = len(r["response_ids"])
                nll += model(input_ids=ids, labels=labels).loss.item() * k
                n += k
            return nll / n

        def seq_logp(p, c):
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()
            return -F.cross_entropy(logits, torch.tensor(c), reduction="sum").item()

        logps = [(seq_logp(r["prompt_ids"], r["chosen_ids"]), seq_logp(r["prompt_ids"], r["rejected_ids"]))
                 for r in dev_records]
        if ref_logps is None:
            return logps
        losses = [-F.logsigmoid(torch.tensor(BETA * ((pc - rc) - (pr - rr)))).item()
                  for (pc, pr), (rc, rr) in zip(logps, ref_logps)]
        return statistics.mean(losses)


# ------------------------------------------------------------------------------------------------ summary


def summarize(runs, facts, flops, epoch_model_flops):
    """Medians over repetitions of every (dataset, task, config)."""
    table = {}
    for key, reps in runs.items():
        dataset, task, config = key.split("/")
        med = lambda f: statistics.median(f(r) for r in reps)  # noqa: E731
        row = {
            "dataset": dataset, "task": task, "config": config, "reps": len(reps),
            "samples": reps[0]["samples"], "steps": reps[0]["steps"], "real_tokens": reps[0]["real_tokens"],
            "tokens_per_s": med(lambda r: r["real_tokens"] / r["loop_s"]),
            "tokens_per_s_all": [round(r["real_tokens"] / r["loop_s"], 1) for r in reps],
            "tokens_per_cpu_s": med(lambda r: r["steps2_tokens"] / max(r["steps2_cpu_s"], 1e-9)),
            "loop_s": med(lambda r: r["loop_s"]),
            "process_wall_s": med(lambda r: r["wall_s"]),
            "padding": med(lambda r: 1 - r["real_tokens"] / r["processed_tokens"]),
            "peak_rss_mb": med(lambda r: r["peak_rss_mb"]),
            "mfu": med(lambda r: epoch_model_flops[f"{dataset}/{task}"] / r["loop_s"] / flops["median"]),
            "train_loss_last10": med(lambda r: r["train_loss_last10"]),
            "dev_loss": None if reps[0]["dev_loss"] is None else med(lambda r: r["dev_loss"]),
            "samples_per_step_min_max": [min(reps[0]["samples_per_step"]), max(reps[0]["samples_per_step"])],
        }
        if config == "ours" and task == "dpo":
            row["ref_precompute_s"] = med(lambda r: r["ref"]["wall_s"])
            row["tokens_per_s_with_ref"] = med(lambda r: r["real_tokens"] / (r["loop_s"] + r["ref"]["wall_s"]))
            row["ref_peak_rss_mb"] = med(lambda r: r["ref"]["peak_rss_mb"])
            row["ref_fixed_s"] = med(lambda r: r["ref"]["fixed_s"])
        if config == "trl_precompute":
            row["ref_precompute_s"] = med(lambda r: r["precompute"]["train"]["wall_s"])
            row["tokens_per_s_with_ref"] = med(
                lambda r: r["real_tokens"] / (r["loop_s"] + r["precompute"]["train"]["wall_s"]))
        table[key] = row
    for key, row in table.items():
        ours = table.get(f"{row['dataset']}/{row['task']}/ours")
        if ours:
            row["ours_speedup"] = ours["tokens_per_s"] / row["tokens_per_s"]
            row["ours_speedup_cpu"] = ours["tokens_per_cpu_s"] / row["tokens_per_cpu_s"]
    return table


def markdown(table):
    head = ("| data | task | config | real tok/s | ours ÷ this | tok/CPU-s | padding | peak RSS MB | MFU | loop s "
            "| process s | train loss (last 10 steps) | dev loss |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rank = {"ours": 0, "trl_padded": 1, "trl_default": 1, "trl_packed": 2, "trl_precompute": 2, "ours_sft": 9}
    rows = sorted(table.values(), key=lambda r: (r["dataset"] != "fixture", r["task"] != "sft", rank.get(r["config"], 5)))
    for r in rows:
        tps = f"{r['tokens_per_s']:.0f}"
        if "tokens_per_s_with_ref" in r:
            tps += f" ({r['tokens_per_s_with_ref']:.0f} incl. ref)"
        config = "ours, SFT on the same sequences" if r["config"] == "ours_sft" else r["config"]
        ratio = "—" if r["config"] == "ours" else f"{r['ours_speedup']:.2f}×"
        dev = "—" if r["dev_loss"] is None else f"{r['dev_loss']:.4f}"
        lines.append(
            f"| {r['dataset']} | {r['task'].upper()} | {config} | {tps} | {ratio} | {r['tokens_per_cpu_s']:.0f} | "
            f"{100 * r['padding']:.1f}% | {r['peak_rss_mb']:.0f} | {100 * r['mfu']:.0f}% | {r['loop_s']:.1f} | "
            f"{r['process_wall_s']:.1f} | {r['train_loss_last10']:.4f} | {dev} |")
    lines.append("")
    lines.append("Per repetition (real tok/s), reference precompute (s):")
    lines.append("")
    for r in rows:
        ref = ""
        if "ref_precompute_s" in r:
            ref = f"; reference precompute {r['ref_precompute_s']:.1f} s"
            if "ref_fixed_s" in r:
                ref += f" (process wall; {r['ref_fixed_s']:.1f} s of it is the fixed start-up of get_logits.py)"
        lines.append(f"- {r['dataset']} {r['task'].upper()} {r['config']}: {r['tokens_per_s_all']}{ref}")
    return "\n".join(lines)


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dataset"], r["task"]) for r in table.values()}, key=lambda g: (g[0] != "fixture", g[1] != "sft"))
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 7), squeeze=False)
    colors = {"ours": "#2b8a3e", "trl_padded": "#c92a2a", "trl_default": "#c92a2a", "trl_packed": "#e67700",
              "trl_precompute": "#e67700", "trl_padding_free": "#1971c2", "ours_sft": "#8ce99a"}
    for j, (dataset, task) in enumerate(groups):
        rows = [r for r in table.values() if r["dataset"] == dataset and r["task"] == task]
        names = [r["config"] for r in rows]
        for i, (field, label) in enumerate((("tokens_per_s", "real tokens / s"), ("peak_rss_mb", "peak RSS (MB)"))):
            ax = axes[i][j]
            vals = [r[field] for r in rows]
            bars = ax.bar(names, vals, color=[colors.get(n, "gray") for n in names])
            if field == "tokens_per_s":
                for r, bar in zip(rows, bars):
                    ax.annotate(f"{r['tokens_per_s']:.0f}\npad {100 * r['padding']:.0f}%",
                                (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                                fontsize=8)
                    if "tokens_per_s_with_ref" in r:
                        ax.plot([bar.get_x(), bar.get_x() + bar.get_width()], [r["tokens_per_s_with_ref"]] * 2,
                                color="black", linestyle="--", linewidth=1)
                ax.set_ylim(0, max(vals) * 1.25)
            ax.set_title(f"{dataset} {task.upper()}: {label}", fontsize=10)
            ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.suptitle("llmtrainer vs TRL 1.16 (CPU, fp32, same model/data/batch; medians; dashed: incl. reference precompute)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="repetitions of the fixture runs (default 3)")
    p.add_argument("--demo_reps", type=int, default=3, help="repetitions of the demo-data runs (default 3)")
    p.add_argument("--datasets", default="fixture,demo")
    p.add_argument("--tasks", default="sft,dpo")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every run (default 1)")
    p.add_argument("--extra_sft", default="", help="extra TRL SFT configs, e.g. trl_padding_free")
    p.add_argument("--out", default=os.path.join(HERE, "results.json"))
    p.add_argument("--replot", action="store_true", help="only redo results.md and results.png from --out")
    args = p.parse_args(argv)
    if args.replot:
        table = json.load(open(args.out))["table"]
        with open(os.path.join(HERE, "results.md"), "w") as f:
            f.write(markdown(table) + "\n")
        plot(table, os.path.join(HERE, "results.png"))
        return 0
    datasets, tasks = args.datasets.split(","), args.tasks.split(",")
    started = time.time()
    subprocess.run([sys.executable, os.path.join(HERE, "make_fixture.py")], cwd=ROOT, check=True)
    os.makedirs(RUNS, exist_ok=True)

    import platform

    import torch
    import transformers
    import trl
    import deepspeed

    version_before = code_version()
    facts = model_facts()
    flops_before = matmul_flops(args.threads)
    log(f"fp32 matmul: {flops_before['median'] / 1e9:.1f} GFLOP/s median ({args.threads} thread(s)); load {loadavg()}")
    configs = {t: CONFIGS[t] + ([c for c in args.extra_sft.split(",") if c] if t == "sft" else []) for t in tasks}
    budgets, records, epoch_model_flops = {}, {}, {}
    for dataset in datasets:
        for task in tasks:
            key = f"{dataset}/{task}"
            budgets[key] = budget(dataset, task)
            records[key] = load_cache(DATASETS[dataset][task]["train"])
            epoch_model_flops[key] = epoch_flops(records[key], task, facts)
    runs, loads = {}, []
    reps = {d: (args.reps if d == "fixture" else args.demo_reps) for d in datasets}
    for rep in range(max(reps.values())):
        for dataset in datasets:
            if rep >= reps[dataset]:
                continue
            for task in tasks:
                key = f"{dataset}/{task}"
                order = configs[task] if rep % 2 == 0 else configs[task][::-1]  # alternate to cancel drift
                for config in order:
                    load_before = loadavg()
                    if config in ("ours", "ours_sft"):
                        r = run_ours(dataset, task, rep, args.threads, budgets[key], records[key], config == "ours_sft")
                    else:
                        r = run_trl(dataset, task, config, rep, args.threads, budgets[key])
                    r["load_before"], r["load_after"] = load_before, loadavg()
                    loads.append(r["load_before"][0])
                    runs.setdefault(f"{key}/{config}", []).append(r)
                    log(f"[rep {rep}] {key}/{config}: {r['real_tokens'] / r['loop_s']:.0f} real tok/s, loop "
                        f"{r['loop_s']:.1f} s, process {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                        f"padding {100 * (1 - r['real_tokens'] / r['processed_tokens']):.1f}%, load {r['load_before']}")
    flops_after = matmul_flops(args.threads)
    version_after = code_version()
    if version_after["code_sha256"] != version_before["code_sha256"]:
        log(f"WARNING: the trainer's code changed during the runs: {version_before} -> {version_after}")
    flops = {"median": statistics.median([flops_before["median"], flops_after["median"]]),
             "before": flops_before, "after": flops_after}

    # held-out loss of every trained model, computed identically here
    initial_ref = {}
    for key, reps_list in runs.items():
        dataset, task, config = key.split("/")
        if config == "ours_sft":  # SFT on the DPO sequences: only there for memory and speed
            for r in reps_list:
                r["dev_loss"] = None
            continue
        dev = load_cache(DATASETS[dataset][task]["dev"])
        ref = None
        if task == "dpo":
            if dataset not in initial_ref:
                initial_ref[dataset] = dev_loss(MODEL, "dpo", dev)
            ref = initial_ref[dataset]
        for r in reps_list:
            r["dev_loss"] = dev_loss(r["model_dir"], task, dev, ref)
        log(f"{key}: dev loss {[round(r['dev_loss'], 4) for r in reps_list]}")

    table = summarize(runs, facts, flops, epoch_model_flops)
    md = markdown(table)
    log("\n" + md)
    for r in runs.values():
        for x in r:
            x.pop("samples_per_step", None)
    result = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__,
                     "deepspeed": deepspeed.__version__},
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                    "matmul_fp32_flops": flops, "load_avg_1min_during_runs": {
                        "min": min(loads), "median": statistics.median(loads), "max": max(loads)}},
        "model": facts, "budgets": budgets, "batch": {k: DATASETS[k.split("/")[0]][k.split("/")[1]]["batch"]
                                                       for k in budgets},
        "epoch_model_flops": epoch_model_flops, "table": table, "runs": runs,
        "command": "python bench/trl_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "code": {"before": version_before, "after": version_after},
        "suite_wall_s": time.time() - started,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=float)
    with open(os.path.join(HERE, "results.md"), "w") as f:
        f.write(md + "\n")
    plot(table, os.path.join(HERE, "results.png"))
    log(f"results: {args.out}, bench/results.md, bench/results.png ({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
