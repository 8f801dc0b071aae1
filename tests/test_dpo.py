"""DPO family end to end: reference log-prob cache (get_logits.py) and DPO training against it (train.py).

* cached per-token log-probs (each pair's prompt computed once, the default) equal an independent
  full-sequence forward of the reference model, for completion- and chat-mode data, by 1 and by 2 processes;
* the first step's sigmoid loss is ln 2 and the rewards are 0 (policy == reference), through the real cache;
* a cache made for other data is refused with one line;
* one optimizer step's gradient equals the independent one-big-batch pair-mean gradient with uneven
  micro-batches, accumulation and 2 processes, prompts shared (the default) or not;
* the demo through the wrappers (get_logits.sh, train.sh runs/dpo.sh) learns to prefer chosen.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.launching import ENV, MODEL_DIR, ROOT, assert_gradient_matches, demo_model_dir, launch, weights
from utils.batching import token_budget_batches
from utils.record_io import load_records, save_records
from utils.schema import KINDS, SampleLayout
from utils.token_cache import TokenCache

DEMO_DEV = os.path.join(ROOT, "demo", "data", "dpo", "dev.jsonl")


def costs_and_weights(records, share_prompt):
    """(costs, loss weights) of DPO cache records as train.py plans them, each prompt once or not."""
    layout, cache = SampleLayout(KINDS["dpo"], share_prompt), TokenCache.from_records(records, KINDS["dpo"])
    return layout.costs(cache), layout.loss_weights(cache)


def independent_token_logps(model, prompt, response):
    """log p(response_t | prompt, response_<t) from one full forward of the sequence alone (no packing)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return torch.log_softmax(logits, -1)[positions, torch.tensor(response)]


@pytest.fixture(scope="module")
def reference_model():
    from transformers import AutoModelForCausalLM
    demo_model_dir()
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def dpo_caches(tmp_path_factory):
    """Demo DPO pairs tokenized in completion mode (train: 40 pairs, dev: 20 more) and the 40 in chat mode."""
    demo_model_dir()
    folder = tmp_path_factory.mktemp("dpo")
    lines = open(DEMO_DEV).readlines()
    raw, raw_dev = folder / "pairs.jsonl", folder / "dev_pairs.jsonl"
    raw.write_text("".join(lines[:40]))
    raw_dev.write_text("".join(lines[40:60]))
    completion = ["--train_dataset_path", str(raw), "--train_save_path", str(folder / "train.pt"),
                  "--dev_dataset_path", str(raw_dev), "--dev_save_path", str(folder / "dev.pt")]
    chat = ["--train_dataset_path", str(raw), "--train_save_path", str(folder / "chat.jsonl")]
    for mode, splits in (("completion", completion), ("chat", chat)):
        subprocess.run([sys.executable, "tokenized_inputs/get_tokenized_data.py", "--model", MODEL_DIR, *splits,
                        "--training_type", "dpo", "--prompt_type", mode], cwd=ROOT, env=ENV, check=True,
                       capture_output=True)
    return folder / "train.pt", folder / "dev.pt", folder / "chat.jsonl"


@pytest.fixture(scope="module")
def ref_dir(dpo_caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref_logps")
    launch("get_logits.py", ["--model_name_or_path", MODEL_DIR, "--train_data_path", str(dpo_caches[0]),
                             "--dev_data_path", str(dpo_caches[1]), "--output_dir", str(out),
                             "--per_device_eval_batch_max_tokens", "400"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_cached_logps_equal_independent_forward(dpo_caches, ref_dir, reference_model, tmp_path, nproc):
    """1 process: the completion-mode train and dev sets; 2 processes: the chat-mode set."""
    out, splits = ref_dir, ((dpo_caches[0], "train"), (dpo_caches[1], "dev"))
    if nproc == 2:
        out, splits = tmp_path / "ref2", ((dpo_caches[2], "train"),)
        launch("get_logits.py", ["--model_name_or_path", MODEL_DIR, "--train_data_path", str(dpo_caches[2]),
                                 "--output_dir", str(out), "--per_device_eval_batch_max_tokens", "300"], nproc=2)
    for cache_path, split in splits:
        records = load_records(str(cache_path)).records
        cache = torch.load(out / f"{split}.pt", weights_only=True)
        assert cache["prompt_ids"] == [r["prompt_id"] for r in records]
        assert cache["provenance"]["reference_model"] == os.path.abspath(MODEL_DIR)
        for i, r in enumerate(records):
            for side in ("chosen", "rejected"):
                a, b = cache[f"{side}_offsets"][i:i + 2].tolist()
                expected = independent_token_logps(reference_model, r["prompt_ids"], r[f"{side}_ids"])
                torch.testing.assert_close(cache[f"{side}_logps"][a:b], expected, atol=1e-5, rtol=0)


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_first_step_loss_is_ln2_and_rewards_zero(dpo_caches, ref_dir, tmp_path):
    proc = launch("train.py", ["--training_type", "dpo", "--loss_type", "sigmoid", "--beta", "0.1",
                               "--ref_logps_dir", str(ref_dir), "--model_name_or_path", MODEL_DIR,
                               "--train_data_path", str(dpo_caches[0]), "--dev_data_path", str(dpo_caches[1]),
                               "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_max_tokens", "200",
                               "--max_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-3",
                               "--save_strategy", "no"])
    before, first = read_metrics(tmp_path / "out")[:2]  # dev before training (step 0), then step 1
    assert (before["step"], first["step"]) == (0, 1)
    # the tokens the step really processed: each pair's prompt once
    records = load_records(str(dpo_caches[0])).records
    step = token_budget_batches(costs_and_weights(records, share_prompt=True)[0], 200, seed=42)[0]
    pairs = [i for rank in step.micro_batches for mb in rank for i in mb.indices]
    assert first["num_input_tokens_seen"] == step.num_tokens == sum(
        len(records[i]["prompt_ids"]) + len(records[i]["chosen_ids"]) + len(records[i]["rejected_ids"]) for i in pairs)
    for row, prefix in ((first, ""), (before, "eval_")):
        assert abs(row[prefix + "loss"] - math.log(2)) < 1e-6, row
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert abs(row[prefix + key]) < 1e-6, (key, row)
    assert "dev before training:" in proc.stdout


@pytest.mark.slow
def test_first_step_is_ln2_for_a_model_whose_config_has_dropout(dpo_caches, ref_dir, tmp_path):
    """attention_dropout 0.5 in the config: the reference ran in eval mode, the policy in training mode with dropout,
    so step 1 logged 0.6918 with rewards != 0; dropout is now off for DPO by default (TRL's disable_dropout)."""
    from tests.test_model_support import with_dropout

    model = with_dropout(tmp_path / "dropout")
    out = tmp_path / "out"
    launch("train.py", ["--training_type", "dpo", "--model_name_or_path", str(model), "--train_data_path",
                        str(dpo_caches[0]), "--ref_logps_dir", str(ref_dir), "--output_dir", str(out),
                        "--per_device_train_batch_max_tokens", "400", "--max_steps", "1", "--save_strategy", "no"])
    first = json.loads(open(out / "metrics.jsonl").readline())
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6), first
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0, first


@pytest.mark.slow
def test_cache_for_other_data_is_refused(dpo_caches, ref_dir, tmp_path):
    records = load_records(str(dpo_caches[0])).records
    records[3] = dict(records[3], chosen_ids=records[3]["chosen_ids"] + [7])  # re-tokenized differently
    changed = tmp_path / "changed.pt"
    save_records(str(changed), records)
    proc = launch("train.py", ["--training_type", "dpo", "--ref_logps_dir", str(ref_dir), "--model_name_or_path",
                               MODEL_DIR, "--train_data_path", str(changed), "--output_dir", str(tmp_path / "out")],
                  expect_rc=2)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "computed for other data" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def pair_mean_gradient(records, indices, ref_logps, beta, label_smoothing):
    """Independent reference: gradient of the mean over ``indices`` of the (c)DPO loss, each sequence run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager")
    model.zero_grad()
    total = 0.0
    for i in indices:
        r = records[i]
        logp = {}
        for side in ("chosen", "rejected"):
            ids = torch.tensor([r["prompt_ids"] + r[f"{side}_ids"]])
            logits = model(input_ids=ids).logits[0].float()
            n = len(r["prompt_ids"])
            positions = torch.arange(n - 1, n + len(r[f"{side}_ids"]) - 1)
            logp[side] = torch.log_softmax(logits, -1)[positions, torch.tensor(r[f"{side}_ids"])].sum()
        h = (logp["chosen"] - ref_logps[i][0]) - (logp["rejected"] - ref_logps[i][1])
        total = total - F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    (total / len(indices)).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("share_prompt", [True, False])
def test_dpo_step_gradient_equals_pair_mean_gradient(dpo_caches, ref_dir, tmp_path, share_prompt):
    """Pairs with their prompt once (the default) and as two sequences both give the independent gradient."""
    records = load_records(str(dpo_caches[0])).records
    cache = torch.load(ref_dir / "train.pt", weights_only=True)
    ref = [(cache["chosen_logps"][cache["chosen_offsets"][i]:cache["chosen_offsets"][i + 1]].sum().item(),
            cache["rejected_logps"][cache["rejected_offsets"][i]:cache["rejected_offsets"][i + 1]].sum().item())
           for i in range(len(records))]
    T, h, W = 120, 2, 2
    costs, weights_ = costs_and_weights(records, share_prompt)
    for seed in range(100):  # micro-batches holding different numbers of pairs
        step = token_budget_batches(costs, T, h_accumulation_steps=h, world_size=W, seed=seed,
                                    loss_weights=weights_)[0]
        micro = [mb for rank in step.micro_batches for mb in rank]
        if len({len(mb.indices) for mb in micro}) >= 3:
            break
    else:
        pytest.fail("no seed gives micro-batches of uneven pair counts")
    indices = [i for mb in micro for i in mb.indices]
    launch("train.py", ["--training_type", "dpo", "--loss_type", "sigmoid", "--beta", "0.5",
                        "--label_smoothing", "0.1", "--ref_logps_dir", str(ref_dir),
                        "--model_name_or_path", MODEL_DIR, "--train_data_path", str(dpo_caches[0]),
                        "--output_dir", str(tmp_path / "out"), "--deepspeed", "configs/ds_config_stage2.json",
                        "--per_device_train_batch_max_tokens", str(T), "--h_accumulation_steps", str(h),
                        "--seed", str(seed), "--optim", "sgd", "--learning_rate", "1.0", "--max_grad_norm", "0",
                        "--lr_scheduler_type", "constant", "--max_steps", "1", "--save_strategy", "no",
                        "--share_prompt", str(share_prompt).lower()], nproc=W)
    g_ref = pair_mean_gradient(records, indices, ref, beta=0.5, label_smoothing=0.1)
    assert_gradient_matches(g_ref, weights(MODEL_DIR), weights(tmp_path / "out"))


@pytest.fixture(scope="module")
def demo_reference(tmp_path_factory):
    """The demo model's reference log-probs of the demo DPO data, by the wrapper (get_logits.sh runs/get_ref.sh)."""
    out = tmp_path_factory.mktemp("demo_ref")
    proc = subprocess.run(["bash", "get_logits.sh", "runs/get_ref.sh"], cwd=ROOT, env=dict(ENV, REF_LOGPS_DIR=str(out)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def train_demo_dpo(reference, out, *extra, env=()):
    proc = subprocess.run(["bash", "train.sh", "runs/dpo.sh", *extra], cwd=ROOT, capture_output=True, text=True,
                          env=dict(ENV, REF_LOGPS_DIR=str(reference), OUTPUT_DIR=str(out), **dict(env)), timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.load(open(out / "test_results.json"))
    assert sorted(results) == sorted(os.listdir(os.path.join(ROOT, "demo", "data", "dpo", "test")))
    return read_metrics(out), sum(r["rewards/accuracies"] for r in results.values()) / len(results)


@pytest.mark.slow
def test_demo_dpo_through_wrappers_learns_to_prefer_chosen(demo_reference, tmp_path):
    rows, accuracy = train_demo_dpo(demo_reference, tmp_path / "dpo", "--max_steps", "40", "--eval_steps", "0")
    assert accuracy > 0.6
    before, after = rows[0], rows[-1]  # dev before training (step 0) and at the end
    assert before["step"] == 0 and abs(before["eval_loss"] - math.log(2)) < 1e-5
    assert after["eval_logps/chosen"] - after["eval_logps/rejected"] > \
        before["eval_logps/chosen"] - before["eval_logps/rejected"] + 0.5, (before, after)
    assert after["eval_rewards/accuracies"] > 0.6


@pytest.mark.slow
def test_lora_dpo_starts_at_ln2_and_the_demo_learns(demo_reference, tmp_path):
    rows, accuracy = train_demo_dpo(demo_reference, tmp_path / "dpo", "--use_peft", "--lora_r", "4", "--lora_alpha",
                                    "32", "--lora_dropout", "0", "--max_steps", "40", "--logging_steps", "1",
                                    "--eval_steps", "0", env={"LR": "1e-2"})
    first = next(r for r in rows if r["step"] == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA's B starts at 0: policy == reference
    assert accuracy > 0.6