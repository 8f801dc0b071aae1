"""train.py end to end: real DeepSpeed launches (CPU, gloo) on the demo model and small synthetic caches.

* the gradient of one optimizer step equals an independent one-big-batch gradient (plain transformers),
  whatever the micro-batches, accumulation steps and processes;
* ZeRO stages 0/1/2/2+offload (1 and 2 processes) give the same weights;
* ``bash train.sh runs/sft.sh`` trains the demo: loss falls, the outputs are complete and loadable;
* kill -9 during a run + ``--resume_from_checkpoint latest`` ends exactly like an uninterrupted run;
* argument errors are one-line usage errors.

Each launch costs ~5-20 s on 2 CPU cores; the first distributed start on a machine JIT-compiles DeepSpeed's
shm communication op once (~40-60 s).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.launching import ENV, MODEL_DIR, ROOT, assert_gradient_matches, demo_model_dir, free_port, launch, weights
from utils.batching import token_budget_batches
from utils.record_io import load_records, save_records
from utils.schema import KINDS, SampleLayout
from utils.token_cache import TokenCache, read_token_cache

CONFIGS = os.path.join(ROOT, "configs")
# ids 0..4 are the demo's special tokens; synthetic samples use ordinary ids below the vocab size (301)
VOCAB_LOW, VOCAB_HIGH = 5, 301


# ------------------------------------------------------------------------------------------- helpers


def run_train(args, nproc=1, timeout=300, expect_rc=0):
    return launch("train.py", args, nproc=nproc, timeout=timeout, expect_rc=expect_rc)


def synthetic_records(n, seed, min_len=5, max_len=40):
    """SFT token-id records: random ids, prompt >= 1 token, response >= 1 token, total min_len..max_len."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        total = int(rng.integers(min_len, max_len + 1))
        n_prompt = int(rng.integers(1, total))
        ids = rng.integers(VOCAB_LOW, VOCAB_HIGH, size=total).tolist()
        records.append({"prompt_id": f"syn-{i}", "prompt_ids": ids[:n_prompt], "response_ids": ids[n_prompt:]})
    return records


def common_args(cache, out, config="ds_config_stage0.json"):
    return ["--training_type", "sft", "--model_name_or_path", MODEL_DIR, "--train_data_path", str(cache),
            "--output_dir", str(out), "--deepspeed", os.path.join(CONFIGS, config)]


def nll_gradient(records, sample_weights):
    """Independent reference: the gradient of Σ_i w_i · (Σ response-token NLL of sample i), each sequence run
    on its own (no packing) through plain transformers; ``sample_weights`` maps sample index -> w_i."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager")
    model.train()
    model.zero_grad()
    loss = 0.0
    for i, w in sample_weights.items():
        prompt, response = records[i]["prompt_ids"], records[i]["response_ids"]
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()  # row p predicts p + 1
        logps = torch.log_softmax(logits, dim=-1)
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)  # prompt tokens not trained
        loss = loss - w * logps[positions, torch.tensor(response)].sum()
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def big_batch_gradient(records, indices):
    """(Σ NLL over every response token of the samples) / (their number of response tokens)."""
    total = sum(len(records[i]["response_ids"]) for i in indices)
    return nll_gradient(records, {i: 1.0 / total for i in indices})


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def demo_model():
    return demo_model_dir()


@pytest.fixture(scope="module")
def w0(demo_model):
    return weights(demo_model)


@pytest.fixture(scope="module")
def sft_cache(tmp_path_factory):
    """32 synthetic SFT samples of 5..40 tokens, as a .pt token-id cache (read back through record_io)."""
    path = tmp_path_factory.mktemp("cache") / "train.pt"
    save_records(str(path), synthetic_records(32, seed=7))
    return path


def cache_records(path):
    return load_records(str(path)).records


def sft_costs(records):
    """Each SFT cache record's token cost as train.py plans it (SampleLayout.costs)."""
    return SampleLayout(KINDS["sft"]).costs(TokenCache.from_records(records, KINDS["sft"]))


def sft_loss_weights(records):
    return SampleLayout(KINDS["sft"]).loss_weights(TokenCache.from_records(records, KINDS["sft"]))


def plan_step(records, T, h, W, seed, epoch=0, step=0):
    costs = sft_costs(records)
    steps = token_budget_batches(costs, T, batch_tokens_divider=1, h_accumulation_steps=h, world_size=W,
                                 seed=seed, epoch=epoch, loss_weights=sft_loss_weights(records))
    return steps[step]


def uneven_seed(records, T, h, W):
    """A seed whose first step has micro-batches of different token counts and pairwise different trained
    token counts (so a per-micro-batch or per-rank mean would give another gradient than the step's mean)."""
    for seed in range(200):
        step = plan_step(records, T, h, W, seed)
        micro = [mb for rank in step.micro_batches for mb in rank]
        tokens = {mb.num_tokens for mb in micro}
        trained = {sum(len(records[i]["response_ids"]) for i in mb.indices) for mb in micro}
        if len(trained) == len(micro) and len(tokens) >= min(3, len(micro)):
            return seed
    raise AssertionError("no seed gives uneven micro-batches")


# ------------------------------------------------------------------------------- 1. gradient exactness


@pytest.mark.parametrize("nproc, config, h", [(2, "ds_config_stage2.json", 2), (1, "ds_config_stage0.json", 3)],
                         ids=["2proc-zero2-h2", "1proc-zero0-h3"])
@pytest.mark.slow
def test_one_step_gradient_equals_big_batch_gradient(demo_model, w0, sft_cache, tmp_path, nproc, config, h):
    records = cache_records(sft_cache)
    T = 80
    seed = uneven_seed(records, T, h, nproc)
    step = plan_step(records, T, h, nproc, seed)
    micro = [mb for rank in step.micro_batches for mb in rank]
    assert len(micro) == nproc * h
    tokens = [mb.num_tokens for mb in micro]
    assert len(set(tokens)) >= min(3, len(micro)), tokens  # uneven micro-batches
    assert max(tokens) <= T
    indices = [i for mb in micro for i in mb.indices]
    assert len(indices) == len(set(indices)) == step.num_samples
    assert step.loss_weight_total == sum(len(records[i]["response_ids"]) for i in indices)
    assert len(indices) < len(records)  # the step is a strict subset: the test depends on the plan

    out = tmp_path / "out"
    run_train(common_args(sft_cache, out, config) + [
        "--per_device_train_batch_max_tokens", str(T), "--h_accumulation_steps", str(h),
        "--optim", "sgd", "--learning_rate", "1.0", "--max_grad_norm", "0", "--lr_scheduler_type", "constant",
        "--max_steps", "1", "--weight_decay", "0", "--save_strategy", "no", "--seed", str(seed)], nproc=nproc)
    w1 = weights(out)
    g_ref = big_batch_gradient(records, indices)
    rel = assert_gradient_matches(g_ref, w0, w1)
    print(f"relative gradient error {rel:.3g}")
    # the check is sensitive: the mean of per-micro-batch means (a classic normalisation bug) is rejected
    trained = [sum(len(records[i]["response_ids"]) for i in mb.indices) for mb in micro]
    g_wrong = nll_gradient(records, {i: 1.0 / (len(micro) * n) for mb, n in zip(micro, trained) for i in mb.indices})
    with pytest.raises(AssertionError):
        assert_gradient_matches(g_wrong, w0, w1)


@pytest.mark.slow
def test_bf16_updates_below_bf16_resolution_reach_the_saved_model(demo_model, w0, sft_cache, tmp_path):
    """--bf16 computes in bfloat16 (autocast) over fp32 weights: one SGD step whose update is far below bf16's
    resolution of the weights lands, in fp32, in the saved model (DeepSpeed's bf16 mode would have rounded it
    away and saved bf16)."""
    records = cache_records(sft_cache)
    T, seed = 80, 11
    indices = [i for mbs in plan_step(records, T, 1, 1, seed).micro_batches for mb in mbs for i in mb.indices]
    g_ref = big_batch_gradient(records, indices)
    matrices = [k for k in w0 if w0[k].ndim == 2]
    lr = 1e-3 * float(torch.cat([w0[k].abs().flatten() for k in matrices]).median()
                      / torch.cat([g_ref[k].abs().flatten() for k in matrices]).median())
    out = tmp_path / "bf16"
    run_train(common_args(sft_cache, out) + [
        "--per_device_train_batch_max_tokens", str(T), "--bf16", "--optim", "sgd", "--learning_rate", repr(lr),
        "--max_grad_norm", "0", "--lr_scheduler_type", "constant", "--max_steps", "1", "--save_strategy", "no",
        "--seed", str(seed)])
    w1 = weights(out)
    assert all(w1[k].dtype == torch.float32 for k in w1)
    fp32_ulp = {k: torch.finfo(torch.float32).eps * w0[k].abs() for k in matrices}
    bf16_half_ulp = {k: 0.5 * 2.0 ** -7 * w0[k].abs() for k in matrices}  # bf16 keeps 8 significant bits
    expected = {k: -lr * g_ref[k] for k in matrices}
    below = {k: (expected[k].abs() < bf16_half_ulp[k] / 2) & (expected[k].abs() > 64 * fp32_ulp[k]) for k in matrices}
    n_below = sum(int(b.sum()) for b in below.values())
    assert n_below > 0.5 * sum(w0[k].numel() for k in matrices)  # most updates are below bf16's resolution
    changed = sum(int((w1[k] != w0[k])[below[k]].sum()) for k in matrices)
    assert changed >= 0.99 * n_below, (changed, n_below)
    # and they are the fp32 gradient's update, up to bf16 compute error
    delta = torch.cat([(w1[k].double() - w0[k].double()).flatten() for k in matrices])
    want = torch.cat([expected[k].double().flatten() for k in matrices])
    assert (delta - want).norm() / want.norm() < 0.05


@pytest.mark.slow
def test_report_to_tensorboard_and_wandb_offline(sft_cache, tmp_path):
    """--report_to tensorboard,wandb: TensorBoard's own reader parses the event files and finds every logged loss
    of metrics.jsonl; wandb, offline (WANDB_MODE=offline, no account, no network), writes its run into output_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    run = launch("train.py", common_args(sft_cache, out) + [
        "--report_to", "tensorboard,wandb", "--max_steps", "3", "--logging_steps", "1", "--save_strategy", "no",
        "--per_device_train_batch_max_tokens", "120"], env={"WANDB_MODE": "offline"})
    logged = {r["step"]: r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}
    assert sorted(logged) == [1, 2, 3]
    events = EventAccumulator(str(out / "runs")).Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(logged, rel=1e-6)
    assert {"learning_rate", "grad_norm", "token_accuracy"} <= set(events.Tags()["scalars"])
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # in output_dir, not in the working directory
    assert len(runs) == 1 and b"token_accuracy" in runs[0].read_bytes(), run.stdout[-2000:]


def test_deepspeed_config_leaves_no_device_synchronisation_on(tmp_path):
    """The filled config: no DeepSpeed throughput timer (it synchronises at every forward and step), DeepSpeed's
    clipping off at ZeRO 0 (train.py clips without host reads), on at ZeRO 2; DeepSpeed's bf16 mode refused."""
    from types import SimpleNamespace
    from utils.ds_config import deepspeed_config
    from utils.errors import UsageError

    args = SimpleNamespace(h_accumulation_steps=2, max_grad_norm=0.5, bf16=True, optim="adamw_torch")
    stage0 = deepspeed_config(os.path.join(CONFIGS, "ds_config_stage0.json"), args)
    stage2 = deepspeed_config(os.path.join(CONFIGS, "ds_config_stage2.json"), args)
    for config in (stage0, stage2):
        assert config["timers"]["throughput"]["enabled"] is False
        assert config["bf16"]["enabled"] is False and config["gradient_accumulation_steps"] == 2
    assert stage0["gradient_clipping"] == 0.0 and stage2["gradient_clipping"] == 0.5
    with open(os.path.join(CONFIGS, "ds_config_stage2.json")) as f:
        own = json.load(f)
    own["bf16"] = {"enabled": True}
    path = tmp_path / "bf16_config.json"
    path.write_text(json.dumps(own))
    with pytest.raises(UsageError, match="autocast"):
        deepspeed_config(str(path), args)


# ------------------------------------------------------------------------------ 2. ZeRO configs agree


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_zero_stages_give_the_same_weights(demo_model, w0, sft_cache, tmp_path):
    """3 AdamW steps (gradient clipping on) with ZeRO 0, 1, 2 + CPU-offloaded optimizer on 1 process with 2
    accumulation micro-batches, and ZeRO 2 on 2 processes with 1 micro-batch each: both have 2 bins per step,
    so the plans hold the same samples in every step and the final weights must agree. ZeRO 0 with
    --torch_compile too."""
    records = cache_records(sft_cache)
    T, seed = 80, 3
    one = token_budget_batches(sft_costs(records), T, h_accumulation_steps=2, world_size=1, seed=seed)
    two = token_budget_batches(sft_costs(records), T, h_accumulation_steps=1, world_size=2, seed=seed)
    assert len(one) >= 3
    for a, b in zip(one[:3], two[:3]):  # same samples per step, split differently over processes
        assert sorted(i for mbs in a.micro_batches for mb in mbs for i in mb.indices) == \
            sorted(i for mbs in b.micro_batches for mb in mbs for i in mb.indices)
    runs = [("ds_config_stage0.json", 1, 2, ()), ("ds_config_stage1.json", 1, 2, ()),
            ("ds_config_stage2_off_o.json", 1, 2, ()), ("ds_config_stage2.json", 2, 1, ()),
            ("ds_config_stage0.json", 1, 2, ("--torch_compile",))]  # compiled layers compute the same steps
    results = {}
    for config, nproc, h, extra in runs:
        out = tmp_path / f"{config[:-5]}-{nproc}{'-'.join(extra)}"
        run_train(common_args(sft_cache, out, config) + [
            "--per_device_train_batch_max_tokens", str(T), "--h_accumulation_steps", str(h),
            "--learning_rate", "1e-3", "--max_steps", "3", "--save_strategy", "no", "--seed", str(seed), *extra],
            nproc=nproc)
        results[(config, nproc, extra)] = (weights(out), read_metrics(out))
    ref_w, ref_m = results[("ds_config_stage0.json", 1, ())]
    assert [r["step"] for r in ref_m] == [1, 2, 3]
    moved = max((ref_w[k] - w0[k]).abs().max().item() for k in w0)
    assert moved > 5e-4  # the weights really changed (Adam moves each by about lr per step)
    for key, (w, m) in results.items():
        assert set(w) == set(ref_w)
        # compiled kernels fuse and order fp32 operations differently; Adam's normalised update magnifies those
        # roundings where a gradient is near zero, so allow 10% of one step's movement (lr 1e-3) there
        tolerance = 1e-4 if "--torch_compile" in key[2] else 1e-5
        for name in ref_w:
            diff = (w[name] - ref_w[name]).abs().max().item()
            assert diff <= tolerance, f"{key}: {name} differs from ZeRO 0 by {diff:.3g}"
        for row, ref_row in zip(m, ref_m):  # the logged training loss is the step's global mean everywhere
            assert row["loss"] == pytest.approx(ref_row["loss"], rel=1e-5), (key, row, ref_row)
            assert row["learning_rate"] == pytest.approx(ref_row["learning_rate"], rel=1e-9)
            if row.get("grad_norm") is not None and ref_row.get("grad_norm") is not None:
                assert row["grad_norm"] == pytest.approx(ref_row["grad_norm"], rel=1e-4), (key, row, ref_row)


# ------------------------------------------------------------------------- 3. train.sh on the demo, end to end


def dev_loss(model_dir, records):
    """Mean response-token NLL of ``records`` under the model in ``model_dir`` (plain transformers, one
    right-padded batch: a causal model's predictions before the padding do not see it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seqs = [r["prompt_ids"] + r["response_ids"] for r in records]
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
    nll, tokens = 0.0, 0
    for row, r in enumerate(records):
        prompt, response = r["prompt_ids"], r["response_ids"]
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
        nll -= logps[row, positions, torch.tensor(response)].sum().item()
        tokens += len(response)
    return nll / tokens


@pytest.mark.slow
def test_train_sh_demo_end_to_end(demo_model, tmp_path):
    out = tmp_path / "sft_demo"
    # the run script's settings, a few pinned so that the test does not depend on its current defaults
    env = dict(ENV, OUTPUT_DIR=str(out), MAX_TOKENS="512", LR="3e-3", SEED="42", PORT=str(free_port()))
    env.pop("NPROC", None)
    extra = ["--max_steps", "40", "--logging_steps", "5", "--eval_steps", "10", "--save_steps", "1000"]
    proc = subprocess.run(["bash", "train.sh", "runs/sft.sh", *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    log = (out / "training.log").read_text(encoding="utf-8")
    assert "40 optimizer steps" in log and "dev before training: loss" in log and "after training" in log
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(5, 41, 5))
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # one row per step, in order
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(set(evals) - {0}) == [10, 20, 30, 40], evals  # (step 0: the evaluation before training)
    before = float(log.split("dev before training: loss ")[1].split(",")[0])
    if 0 in evals:
        assert evals[0] == pytest.approx(before, abs=1e-4)
    assert evals[40] < before - 1.5, (before, evals)  # ~5.7 -> ~3.0
    assert evals[40] < evals[10]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0
    lrs = [r["learning_rate"] for r in train_rows]
    assert max(lrs) <= 3e-3 * (1 + 1e-9) and lrs[-1] < 3e-4  # cosine schedule, (nearly) run down

    # the logged dev losses, recomputed independently from the token-id cache and the models
    dev_records = read_token_cache(os.path.join(ROOT, "demo", "cache", "sft_dev.arrow"), KINDS["sft"]).to_records()
    assert len(dev_records) == 200
    assert dev_loss(str(out), dev_records) == pytest.approx(evals[40], rel=1e-4)
    assert dev_loss(demo_model, dev_records) == pytest.approx(before, abs=1e-4)

    results = json.loads((out / "test_results.json").read_text())
    test_dir = os.path.join(ROOT, "demo", "data", "sft", "test")
    assert sorted(results) == sorted(os.listdir(test_dir))
    for name, metrics in results.items():
        assert 0 < metrics["loss"] < before, (name, metrics)
        assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]), rel=1e-9)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("add 12 34\n", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1] and torch.equal(generated[0, :ids.shape[1]], ids[0])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("checkpoint-*"))  # --save_steps 100 > 40 steps: nothing saved but the model


# ------------------------------------------------------------------------ 4. kill -9 and resume == uninterrupted


def last_logged_step(folder):
    try:
        return max(json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines())
    except (OSError, ValueError):  # not written yet
        return 0


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(demo_model, sft_cache, tmp_path):
    N = 16  # 10 steps per epoch: the run crosses an epoch boundary
    settings = ["--per_device_train_batch_max_tokens", "80", "--learning_rate", "2e-3", "--max_steps", str(N),
                "--save_steps", "4", "--save_total_limit", "2", "--logging_steps", "1", "--seed", "5"]
    records = cache_records(sft_cache)
    assert len(token_budget_batches(sft_costs(records), 80, seed=5)) < N

    a = tmp_path / "a"
    run_train(common_args(sft_cache, a) + settings)
    assert sorted(p.name for p in a.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]  # limit 2

    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "train.py", *common_args(sft_cache, b), *settings], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        # kill it between checkpoint-8 and checkpoint-12, once it has logged steps past checkpoint-8
        while not ((b / "checkpoint-8" / "trainer_state.json").is_file() and last_logged_step(b) >= 10):
            assert proc.poll() is None, f"run B ended (rc {proc.returncode}) before the kill"
            assert time.time() < deadline, "no checkpoint-8 after 240 s"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (b / "model.safetensors").exists()  # it really died mid-run
    complete = sorted(int(p.name.split("-")[1]) for p in b.glob("checkpoint-*") if p.name.split("-")[1].isdigit()
                      and (p / "trainer_state.json").is_file())
    assert complete == [4, 8], complete
    logged = [r["step"] for r in read_metrics(b)]
    assert logged[-1] >= 10  # metrics.jsonl holds steps that the resumed run must drop and redo
    resumed = run_train(common_args(sft_cache, b) + settings + ["--resume_from_checkpoint", "latest"])
    assert f"resumed from {b / 'checkpoint-8'} at step 8" in resumed.stdout

    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        diff = (wa[name] - wb[name]).abs().max().item()
        assert diff <= 1e-6, f"{name}: resumed run differs by {diff:.3g}"
    assert any(not torch.equal(wa[k], weights(demo_model)[k]) for k in wa)
    # the checkpoints the resumed run wrote are those of the uninterrupted run, pruned to the last 2
    assert sorted(p.name for p in b.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]
    assert not list(b.glob("*.tmp")) and not list(b.glob("*.saving"))
    ca, cb = weights(a / "checkpoint-12"), weights(b / "checkpoint-12")
    assert all((ca[k] - cb[k]).abs().max().item() <= 1e-6 for k in ca)
    state = json.loads((b / "checkpoint-12" / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and state["epoch"] == 1  # 10 steps per epoch
    # metrics.jsonl: every step once, the same numbers as the uninterrupted run
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in rows_b] == list(range(1, N + 1))
    costs = sft_costs(records)
    epoch1 = token_budget_batches(costs, 80, seed=5, epoch=1)
    assert rows_a[-1]["num_input_tokens_seen"] == sum(costs) + sum(s.num_tokens for s in epoch1[:N - 10])
    for ra, rb in zip(rows_a, rows_b):
        assert rb["num_input_tokens_seen"] == ra["num_input_tokens_seen"]
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6, abs=1e-9), (ra, rb)
        assert rb["learning_rate"] == pytest.approx(ra["learning_rate"], rel=1e-9, abs=1e-15)
        assert rb["epoch"] == ra["epoch"]


# ---------------------------------------------------------------------------------- 5. argument errors


def parse(*argv):
    from utils.arguments import parse_arguments
    return parse_arguments(["--train_data_path", "x.pt", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--beta", "0.2"], "--beta"),
    (["--loss_type", "ipo"], "--loss_type"),
    (["--label_smoothing", "0.1"], "--label_smoothing"),
    (["--po_beta", "0.2"], "--beta"),  # legacy DPO spelling, renamed and then rejected for sft
    (["--eval_steps", "10"], "--dev_data_path"),
    (["--save_strategy", "no", "--save_steps", "10"], "--save_steps"),
    (["--save_strategy", "epoch", "--save_steps", "10"], "--save_steps"),
    (["--warmup_steps", "5", "--warmup_ratio", "0.1"], "choose one"),
    (["--test_files", "a.jsonl"], "--test_dataset_dir"),
    (["--per_device_train_batch_max_tokens", "100", "--batch_tokens_divider", "3"], "multiple"),
    (["--h_accumulation_steps", "0"], "--h_accumulation_steps"),
    (["--max_steps", "0", "--num_train_epochs", "0"], "--max_steps"),
    (["--deepspeed", "configs/nope.json"], "nope.json"),
    (["--report_to", "mlflow"], "mlflow"),
    (["--training_type", "dpo"], "--ref_logps_dir"),  # sigmoid DPO without reference log-probs
    (["--training_type", "dpo", "--loss_type", "simpo", "--ref_logps_dir", "refs"], "--ref_logps_dir"),
    (["--per_device_train_batch_max_tokens", "100", "--per_deivce_train_batch_max_tokens", "200"], "both given"),
    (["--per_deivce_train_batch_max_tokens=200", "--per_device_train_batch_max_tokens=100"], "both given"),
    (["--save_steps", "0"], "--save_steps"),  # would divide by zero after the first step
    (["--dev_data_path", "dev.pt", "--eval_steps", "-1"], "--eval_steps"),
    (["--learning_rat", "1e-3"], "unknown arguments: --learning_rat"),  # a typo, not an abbreviation
])
def test_ignored_or_contradictory_settings_are_errors(argv, message):
    from utils.errors import UsageError
    with pytest.raises(UsageError, match=message.replace("-", r"\-")):
        parse(*argv)


def test_arguments_legacy_spellings_and_defaults():
    _, _, t = parse("--per_deivce_train_batch_max_tokens", "123")
    assert t.per_device_train_batch_max_tokens == 123
    _, _, t = parse("--per_deivce_train_batch_max_tokens=77")
    assert t.per_device_train_batch_max_tokens == 77
    _, d, t = parse("--training_type", "dpo", "--loss_type", "simpo", "--po_beta", "0.3", "--po_gamma", "0.5")
    assert (d.training_type, t.beta, t.simpo_gamma) == ("dpo", 0.3, 0.5)
    _, _, t = parse("--training_type", "dpo", "--norm_by_len", "--ref_logps_dir", "refs")
    assert t.loss_type == "ln_dpo"
    _, _, t = parse("--save_strategy", "no")  # --save_steps left at its default is fine
    assert t.save_strategy == "no"


def test_dropout_is_off_by_default_for_dpo_and_lora_dropout_then_an_error():
    """TRL's disable_dropout (default true for DPO): the policy must compute what the reference computed."""
    from utils.errors import UsageError

    dpo = ["--training_type", "dpo", "--ref_logps_dir", "refs"]
    assert parse(*dpo)[2].disable_dropout is True
    assert parse()[2].disable_dropout is False  # SFT keeps the model's dropout
    assert parse(*dpo, "--disable_dropout", "false")[2].disable_dropout is False
    model_args, _, _ = parse(*dpo, "--use_peft")
    assert model_args.lora_dropout == 0.0  # (its default 0.05 would be zeroed anyway)
    with pytest.raises(UsageError, match="--lora_dropout is ignored with --disable_dropout"):
        parse(*dpo, "--use_peft", "--lora_dropout", "0.1")
    assert parse(*dpo, "--use_peft", "--lora_dropout", "0.1", "--disable_dropout", "false")[0].lora_dropout == 0.1


def run_script_settings(script):
    """The TRAIN_ARGS a run script sets for the demo (sourced as train.sh does; the demo data is not built)."""
    command = f'source utils/launch.sh; demo_data() {{ :; }}; source {script}; printf "%s\\n" "${{TRAIN_ARGS[@]}}"'
    return subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")[:-1]


@pytest.mark.parametrize("script", ["runs/sft.sh", "runs/dpo.sh", "runs/simpo.sh", "runs/sampo.sh"])
@pytest.mark.parametrize("override", [["--save_strategy", "no"], ["--save_strategy=epoch"], ["--warmup_steps", "10"],
                                      ["--lr_scheduler_type", "constant"], ["--optim", "sgd"]])
def test_a_run_script_default_never_turns_an_override_into_an_error(script, override):
    """bash train.sh runs/dpo.sh --save_strategy no was refused ('--save_total_limit is ignored with --save_strategy
    no'): the run script's own --save_total_limit 2. The run script's settings are defaults; the user's override
    drops those it makes moot, and the same two settings typed by the user stay an error."""
    from utils.arguments import RUN_SCRIPT_END, parse_arguments
    from utils.errors import UsageError

    settings = run_script_settings(script)
    assert "--save_total_limit" in settings and "--warmup_ratio" in settings
    _, _, t = parse_arguments(settings + [RUN_SCRIPT_END, *override])
    name, _, value = override[0][2:].partition("=")
    assert str(getattr(t, name)) == (value or override[1])
    if override == ["--save_strategy", "no"]:
        assert t.save_total_limit is None
        with pytest.raises(UsageError, match="--save_total_limit is ignored"):
            parse_arguments(settings + override)  # without the marker: all typed by the user


@pytest.mark.slow
def test_cli_errors_are_one_line_exit_2(demo_model, sft_cache, tmp_path):
    """A missing cache and an unknown --test_files name: exit status 2, one 'error: ...' line, no traceback."""
    cases = [
        (["--train_data_path", str(tmp_path / "missing.pt")], ["missing.pt", "does not exist"]),
        (["--train_data_path", str(sft_cache), "--test_dataset_dir", "demo/data/sft/test",
          "--test_files", "arith.jsonl,nope.jsonl"], ["nope.jsonl", "arith.jsonl", "strings.json"]),
    ]
    for argv, words in cases:
        proc = run_train(argv + ["--output_dir", str(tmp_path / "out")], expect_rc=2, timeout=120)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr
        assert all(w in errors[0] for w in words), errors[0]
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "out" / "model.safetensors").exists()
