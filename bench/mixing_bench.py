"""Do token-budget steps learn as well as random batches? One epoch of SFT, three ways, the same samples per step.

    pip install -r bench/requirements-bench.txt      # TRL for the baseline
    python bench/mixing_bench.py                     # ~5 minutes on the 2-core machine

For the demo data and the long-tailed fixture (``bench/make_fixture.py``), one epoch of SFT from the fixture's
random-init model with the settings of ``bench/trl_compare.py`` (AdamW, the same learning rate, linear decay,
fp32, one thread, seed 42), B samples per optimizer step on average:

* ``ours``: train.py's default packing (bins filled from the shuffled stream: random steps), budget from
  ``auto_get_size.py --group_size 1 --batch_size B``;
* ``ours --group_by_length``: best-fit decreasing bins (similar lengths together), same budget;
* ``random batches``: TRL's SFTTrainer with its default padded collator and shuffled sampler, B per step.

Reported: the dev loss of the saved model (token-mean response NLL, ``trl_compare.dev_loss``), the fill of our
bins (real tokens / (budget x micro-batches)) and the samples per step (min, max).
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from trl_compare import CACHE, DATASETS, MODEL, RUNS, SEED, budget, dev_loss, load_cache, measured_env, run_trl


def run_ours(dataset, max_tokens, group_by_length):
    s = DATASETS[dataset]["sft"]
    out = os.path.join(RUNS, f"mixing_{dataset}_{'grouped' if group_by_length else 'random'}")
    subprocess.run([sys.executable, "train.py", "--model_name_or_path", MODEL, "--train_data_path",
                    os.path.join(CACHE, s["train"]), "--output_dir", out, "--overwrite_output_dir",
                    "--per_device_train_batch_max_tokens", str(max_tokens), "--learning_rate", str(s["lr"]),
                    "--lr_scheduler_type", "linear", "--num_train_epochs", "1", "--save_strategy", "no",
                    "--logging_steps", "1000", "--seed", str(SEED), *(["--group_by_length"] if group_by_length else [])],
                   cwd=ROOT, env=measured_env(1), check=True, capture_output=True)
    return out


def plan_facts(dataset, max_tokens, group_by_length):
    from utils.batching import token_budget_plan
    from utils.schema import KINDS, SampleLayout
    from utils.token_cache import read_token_cache

    cache = read_token_cache(os.path.join(CACHE, DATASETS[dataset]["sft"]["train"]), KINDS["sft"])
    costs = SampleLayout(KINDS["sft"]).costs(cache)
    plan = token_budget_plan(costs, max_tokens, seed=SEED, group_by_length=group_by_length)
    return {"fill": float(costs.sum() / (max_tokens * plan.num_bins)), "steps": int(plan.num_steps),
            "min": int(plan.step_num_samples.min()), "max": int(plan.step_num_samples.max())}


def main():
    subprocess.run([sys.executable, os.path.join(HERE, "make_fixture.py")], check=True, stdout=subprocess.DEVNULL)
    results = {}
    for dataset in ("demo", "fixture"):
        max_tokens = budget(dataset, "sft")
        dev = load_cache(DATASETS[dataset]["sft"]["dev"])
        rows = {}
        for name, grouped in (("ours", False), ("ours --group_by_length", True)):
            rows[name] = {"dev_loss": dev_loss(run_ours(dataset, max_tokens, grouped), "sft", dev),
                          **plan_facts(dataset, max_tokens, grouped)}
        trl = run_trl(dataset, "sft", "trl_padded", "mixing", 1, max_tokens)
        rows["random batches (TRL, padded)"] = {"dev_loss": dev_loss(trl["model_dir"], "sft", dev), "steps": trl["steps"],
                                                "min": min(trl["samples_per_step"]), "max": max(trl["samples_per_step"])}
        results[dataset] = rows
        base = rows["random batches (TRL, padded)"]["dev_loss"]
        print(f"\n{dataset}: budget {max_tokens} tokens, {DATASETS[dataset]['sft']['batch']} samples per step on average")
        for name, r in rows.items():
            extra = f", fill {r['fill']:.1%}" if "fill" in r else ""
            print(f"  {name:<30} dev loss {r['dev_loss']:.4f} ({r['dev_loss'] / base - 1:+.1%} vs random batches), "
                  f"{r['steps']} steps, samples per step {r['min']}-{r['max']}{extra}")
    with open(os.path.join(RUNS, "mixing_results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
