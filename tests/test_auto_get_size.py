"""auto_get_size.py as a real program: scripted mode against utils.batching, an interactive session in a
pseudo-terminal, and the one-line errors."""
import os
import re
import subprocess
import sys

import numpy as np
import pexpect
import pytest

import auto_get_size
from utils.batching import token_budget_batches, token_budget_plan
from utils.errors import run_cli
from utils.record_io import save_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "auto_get_size.py")


def sft_records(n, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.0, 0.8, (n, 2)).astype(int), 1, 120)
    return [{"prompt_id": i, "prompt_ids": [7] * int(p), "response_ids": [8] * int(r)}
            for i, (p, r) in enumerate(lengths)]


def dpo_records(n, seed=1):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, (n, 3))
    return [{"prompt_id": i, "prompt_ids": [1] * int(p), "chosen_ids": [2] * int(c), "rejected_ids": [3] * int(r)}
            for i, (p, c, r) in enumerate(lengths)]


@pytest.fixture(scope="module")
def sft_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "sft_train.jsonl"
    save_records(path, sft_records(400))
    return path


def run_script(*args):
    """Run the program as a real subprocess (each start imports torch: a few seconds, so used sparingly)."""
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=120)


def run_inprocess(capsys, *args):
    """Run main through run_cli in this process; returns (exit status, stdout, stderr)."""
    try:
        code = run_cli(auto_get_size.main, list(map(str, args)))
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def parse(out):
    b = int(re.search(r"^batch_max_tokens: (\d+)$", out, re.M).group(1))
    lo, hi = map(int, re.search(r"^samples per step: \[(\d+), (\d+)\]", out, re.M).groups())
    flag = int(re.search(r"^--per_device_train_batch_max_tokens (\d+)$", out, re.M).group(1))
    return b, lo, hi, flag


def costs_of(records, kind, share_prompt=True):
    """Independent: SFT prompt + response; DPO each prompt once (the default) or once per response."""
    if kind == "sft":
        return np.array([len(r["prompt_ids"]) + len(r["response_ids"]) for r in records])
    prompts = 1 if share_prompt else 2
    return np.array([prompts * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in records])


@pytest.mark.parametrize("kind,suffix,max_length,W,h,d,batch_size,subprocess_,share", [
    ("sft", ".jsonl", 64, 2, 2, 1, 24, True, True),
    ("dpo", ".json.gz", 80, 3, 1, 2, 40, True, True),
    ("sft", ".pt", 64, 1, 1, 2, 9, False, True),
    ("dpo", ".jsonl", 80, 1, 4, 1, 100, False, False),
])
def test_scripted_answer_matches_batcher(tmp_path, capsys, kind, suffix, max_length, W, h, d, batch_size,
                                         subprocess_, share):
    records = sft_records(400) if kind == "sft" else dpo_records(300)
    path = tmp_path / f"cache{suffix}"
    save_records(path, records)
    G = W * h * d
    args = [path, max_length, kind, "--group_size", G, "--batch_size", batch_size, "--batch_tokens_divider", d,
            "--seed", 7] + ([] if share else ["--share_prompt", "false"])
    if subprocess_:
        res = run_script(*args)
        code, out, err = res.returncode, res.stdout, res.stderr
    else:
        code, out, err = run_inprocess(capsys, *args)
    assert code == 0, err
    b, lo, hi, flag = parse(out)
    assert flag == b * d
    assert f"{len(records)} {'pairs' if kind == 'dpo' else 'samples'}" in out
    costs = costs_of(records, kind, share)
    assert b >= max(max_length, costs.max())

    def mean(budget):
        return token_budget_plan(costs, budget, world_size=G, seed=7).mean_samples_per_step

    assert mean(b) >= batch_size
    assert b == max(max_length, costs.max()) or mean(b - 1) < batch_size
    # the trainer's own call with these settings (budget b*d, h, W, d) gives the printed min/max
    steps = token_budget_batches(costs, flag, batch_tokens_divider=d, h_accumulation_steps=h, world_size=W,
                                 seed=7, epoch=0)
    counts = [s.num_samples for s in steps]
    assert (lo, hi) == (min(counts), max(counts))
    assert sum(counts) / len(counts) >= batch_size


def test_interactive_session(sft_cache):
    child = pexpect.spawn(sys.executable, [SCRIPT, str(sft_cache), "64", "sft"], cwd=ROOT, timeout=60,
                          encoding="utf-8")
    child.expect(r"400 samples \(sft\)")
    child.expect(r"mean [\d.]+\s+p50 \d+\s+p90 \d+\s+max \d+")
    answers = []
    for line in ("4 16", "2, 40"):
        child.expect_exact("group_size batch_size> ")
        child.sendline(line)
        child.expect(r"batch_max_tokens: (\d+)")
        b = int(child.match.group(1))
        child.expect(r"samples per step: \[(\d+), (\d+)\]")
        answers.append((b, int(child.match.group(1)), int(child.match.group(2))))
    child.expect_exact("group_size batch_size> ")
    child.sendline("eight 16")
    child.expect("expected two positive integers")
    child.expect_exact("group_size batch_size> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert "Traceback" not in child.before
    costs = costs_of(sft_records(400), "sft")
    for (b, lo, hi), (G, bs) in zip(answers, [(4, 16), (2, 40)]):
        plan = token_budget_plan(costs, b, world_size=G, seed=42)
        assert plan.mean_samples_per_step >= bs
        assert (lo, hi) == (int(plan.step_num_samples.min()), int(plan.step_num_samples.max()))


def test_interactive_ctrl_c_quits_cleanly(sft_cache):
    """(q, 0 and an empty line are checked through parse_answer below; each pty start costs seconds.)"""
    child = pexpect.spawn(sys.executable, [SCRIPT, str(sft_cache), "64", "sft"], cwd=ROOT, timeout=60,
                          encoding="utf-8")
    child.expect_exact("group_size batch_size> ")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_quit_words_and_hints():
    for line in ("", "  ", "q", "Q", "quit", "0"):
        assert auto_get_size.parse_answer(line) == "quit"
    for line in ("8", "8 16 3", "8 x", "0 16", "8 0", "-1 4", "8.5 2"):
        assert auto_get_size.parse_answer(line) is None
    assert auto_get_size.parse_answer(" 8, 128 ") == (8, 128)


def test_bad_input_file_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"prompt_id": 1, "prompt_ids": [1], "response_ids": [2]}\n{not json\n')
    code, out, err = run_inprocess(capsys, bad, 64, "sft", "--group_size", 2, "--batch_size", 4)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}: line 2: malformed JSON")
    code, out, err = run_inprocess(capsys, tmp_path / "missing.pt", 64, "sft")
    assert code == 2 and err == f"error: {tmp_path / 'missing.pt'}: no such file\n"
    code, out, err = run_inprocess(capsys, tmp_path / "missing.pt", 64, "sft", "--group_size", 2)
    assert code == 2 and "go together" in err and err.count("\n") == 1
    code, out, err = run_inprocess(capsys, tmp_path / "missing.pt", 64, "ppo")
    assert code == 2 and "invalid choice" in err and err.count("\n") == 1


def test_unreachable_batch_size_is_an_error(sft_cache, capsys):
    code, out, err = run_inprocess(capsys, sft_cache, 64, "sft", "--group_size", 2, "--batch_size", 401)
    assert code == 2 and "exceeds the 400 samples" in err


def test_batch_size_below_the_smallest_bins_is_said(sft_cache, capsys):
    """max_length far above the real samples: the smallest allowed bins already hold more samples than asked; the
    answer says so and what to change (it used to answer silently)."""
    code, out, _ = run_inprocess(capsys, sft_cache, 4096, "sft", "--group_size", 2, "--batch_size", 8)
    b, lo, hi, _ = parse(out)
    assert code in (0, None) and b == 4096 and lo > 8
    note = next(line for line in out.splitlines() if line.startswith("note:"))
    longest = int(costs_of(sft_records(400), "sft").max())
    assert "8 samples per step cannot be reached" in note and f"pass the longest sample ({longest} tokens)" in note
    code, out, _ = run_inprocess(capsys, sft_cache, longest, "sft", "--group_size", 2, "--batch_size", 8)
    assert "note:" not in out and abs(parse(out)[1] - 8) <= 8  # with the real max_length it is reached
