"""A run never loses its work, never resumes the wrong state, never evaluates on silently wrong data.

Each failure reported in the issue is an input here: eval data that cannot be evaluated (found after training),
a post-training step that fails, another run's checkpoints in the output folder, a resume with changed batching,
caches from another tokenizer, test records changed by max_length, two runs at once without PORT, and the demo
settings applied to a real model.
"""
import json
import os
import subprocess
import sys

import pytest

from tests.launching import ENV, MODEL_DIR, ROOT, demo_model_dir, launch, weights
from utils.errors import UsageError

SFT_TRAIN = os.path.join(ROOT, "demo", "data", "sft", "train.jsonl")


def tokenize(raw, save, model=MODEL_DIR, kind="sft", max_length=256, prompt_type="completion", expect_rc=0):
    proc = subprocess.run([sys.executable, "tokenized_inputs/get_tokenized_data.py", "--model", str(model),
                           "--train_dataset_path", str(raw), "--train_save_path", str(save), "--training_type", kind,
                           "--prompt_type", prompt_type, "--max_length", str(max_length), "--num_proc", "1"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    return save


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def one_error_line(proc):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """60 demo SFT samples tokenized at --max_length 256, and a test folder with one record of 129..256 tokens
    (it fits the training cache's max_length but not a 128-token budget)."""
    demo_model_dir()
    folder = tmp_path_factory.mktemp("safety")
    raw = folder / "train.jsonl"
    raw.write_text("".join(open(SFT_TRAIN).readlines()[:60]))
    cache = tokenize(raw, folder / "train.pt")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    words = "upper lower reverse sort add copy"
    prompt = " ".join([words] * 20)
    while len(tokenizer(prompt)["input_ids"]) > 200:
        prompt = prompt[:-20]
    assert len(tokenizer(prompt)["input_ids"]) > 140
    tests = folder / "tests"
    tests.mkdir()
    write_jsonl(tests / "long.jsonl", [{"prompt_id": "short", "prompt": "add 1 2\n", "response": "3"},
                                       {"prompt_id": "long-one", "prompt": prompt + "\n", "response": "ok"}])
    return {"cache": cache, "tests": tests, "folder": folder}


def train_args(cache, out, *extra, budget=128, steps=4):
    return ["--training_type", "sft", "--model_name_or_path", MODEL_DIR, "--train_data_path", str(cache),
            "--output_dir", str(out), "--per_device_train_batch_max_tokens", str(budget), "--max_steps", str(steps),
            "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "3", *extra]


# --------------------------------------------------------------------------- 1. nothing fails after training


@pytest.mark.slow
def test_eval_sample_over_budget_stops_before_step_1(data, tmp_path):
    out = tmp_path / "out"
    proc = launch("train.py", train_args(data["cache"], out, "--test_dataset_dir", str(data["tests"]),
                                         "--save_steps", "1"), expect_rc=2)
    line = one_error_line(proc)
    assert "long.jsonl" in line and "'long-one'" in line and "--per_device_eval_batch_max_tokens" in line, line
    assert "train:" not in proc.stderr  # no step ran
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_training_sample_over_budget_names_the_sample_and_the_option(data, tmp_path, divider=2):
    """The training set is checked first, against the training budget per bin (// --batch_tokens_divider)."""
    from utils.schema import KINDS, SampleLayout
    from utils.token_data import load_token_cache

    cache = load_token_cache(str(data["cache"]), KINDS["sft"])
    costs = SampleLayout(KINDS["sft"]).costs(cache)
    worst = int(costs.argmax())
    budget = int(costs[worst]) - 2 if divider == 1 else 2 * int(costs[worst]) - 2
    proc = launch("train.py", train_args(data["cache"], tmp_path / "out", "--batch_tokens_divider", str(divider),
                                         budget=budget), expect_rc=2)
    line = one_error_line(proc)
    assert f"training set {data['cache']}: prompt_id {cache.prompt_id[worst]!r} costs {int(costs[worst])}" in line
    assert f"--per_device_train_batch_max_tokens {budget}" in line and f"at least {int(costs[worst]) * divider}" in line


@pytest.mark.slow
def test_model_is_saved_before_a_post_training_step_fails(data, tmp_path):
    out = tmp_path / "out"
    (out / "loss.png").mkdir(parents=True)  # the loss plot, written after training, cannot be written
    proc = launch("train.py", train_args(data["cache"], out, "--save_strategy", "no"), expect_rc=2)
    assert "loss.png" in one_error_line(proc)
    assert set(weights(out)) == set(weights(MODEL_DIR))  # the trained model is there, complete
    assert any((weights(out)[k] != weights(MODEL_DIR)[k]).any() for k in weights(out))
    assert "settings: model" in proc.stdout and "learning_rate 0.001" in proc.stdout  # effective settings shown


# --------------------------------------------------------------------------- 2. and 3. checkpoints belong to a run


@pytest.mark.slow
def test_checkpoints_belong_to_their_run(data, tmp_path):
    out = tmp_path / "out"
    launch("train.py", train_args(data["cache"], out, "--save_steps", "2", steps=6))  # run A: checkpoint-2, -4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    run_b = train_args(data["cache"], out, "--save_steps", "1", "--save_total_limit", "1", steps=3)
    proc = launch("train.py", run_b, expect_rc=2)  # a new run into A's folder stops
    line = one_error_line(proc)
    assert "checkpoint-2" in line and "--overwrite_output_dir" in line and "--resume_from_checkpoint" in line, line
    a_model = weights(out)

    launch("train.py", run_b + ["--overwrite_output_dir"])
    # B kept its own newest checkpoint (limit 1: the one it just wrote, step 2 replacing A's) and left A's
    # checkpoint-4 alone, although A's is newer
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state_2 = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    state_4 = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state_2["run"]["total_steps"] == 3 and state_4["run"]["total_steps"] == 6
    b_model = weights(out)
    assert any((a_model[k] != b_model[k]).any() for k in a_model)

    resumed = launch("train.py", run_b + ["--resume_from_checkpoint", "latest"])  # B's own latest, not A's newer one
    assert "resumed from" in resumed.stdout and "checkpoint-2 at step 2" in resumed.stdout, resumed.stdout
    assert all((weights(out)[k] == b_model[k]).all() for k in b_model)  # the same 3 steps, the same model

    proc = launch("train.py", run_b + ["--resume_from_checkpoint", str(out / "checkpoint-4")], expect_rc=2)
    line = one_error_line(proc)
    assert "belongs to another run" in line and "total_steps 6 there, 3 here" in line, line


@pytest.fixture(scope="module")
def checkpointed(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "out"
    launch("train.py", train_args(data["cache"], out, "--save_steps", "3", steps=8))
    return out


@pytest.mark.parametrize("changed, nproc, says", [
    (["--per_device_train_batch_max_tokens", "256"], 1, "per_device_train_batch_max_tokens 128 there, 256 here"),
    (["--h_accumulation_steps", "2"], 1, "h_accumulation_steps 1 there, 2 here"),
    (["--batch_tokens_divider", "2"], 1, "batch_tokens_divider 1 there, 2 here"),
    ([], 2, "world_size 1 there, 2 here"),
    (["--learning_rate", "2e-3"], 1, "learning_rate 0.001 there, 0.002 here"),
], ids=["budget", "accumulation", "divider", "processes", "learning_rate"])
@pytest.mark.slow
def test_resume_with_other_plan_settings_is_refused(data, checkpointed, changed, nproc, says):
    """The plan (which samples make each step) depends on these settings: resuming the position of another plan
    would skip or repeat samples, so it is refused, naming the setting; so is a learning rate that the restored
    optimizer state would silently replace."""
    args = train_args(data["cache"], checkpointed, "--save_steps", "3", steps=8)
    for flag, value in zip(changed[::2], changed[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    proc = launch("train.py", args + ["--resume_from_checkpoint", str(checkpointed / "checkpoint-3")], nproc=nproc,
                  expect_rc=2)
    assert says in "\n".join(proc.stderr.splitlines()), proc.stderr[-2000:]


# --------------------------------------------------------------------------- 4. caches from another tokenizer


@pytest.mark.slow
def test_caches_from_another_tokenizer_are_refused(data, tiny_tokenizer_dir, tmp_path):
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(open(SFT_TRAIN).readlines()[:30]))
    other = tokenize(raw, tmp_path / "other.pt", model=tiny_tokenizer_dir)
    for flag in ("--train_data_path", "--dev_data_path"):
        args = train_args(data["cache"], tmp_path / f"out{flag}")
        args += [flag, str(other)] if flag == "--dev_data_path" else []
        if flag == "--train_data_path":
            args[args.index(flag) + 1] = str(other)
        line = one_error_line(launch("train.py", args, expect_rc=2))
        assert "other.pt" in line and tiny_tokenizer_dir in line and MODEL_DIR in line, line


def test_cache_without_fingerprint_is_checked_by_its_ids(data, tmp_path):
    from transformers import AutoTokenizer

    from utils.record_io import save_records
    from utils.schema import KINDS
    from utils.token_data import load_token_cache
    path = tmp_path / "old.pt"  # no .meta.json: an older cache
    save_records(str(path), [{"prompt_id": 0, "prompt_ids": [1, 5], "response_ids": [7, 2]},
                             {"prompt_id": 1, "prompt_ids": [1, 5], "response_ids": [400, 2]}])
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)  # 301 ids
    with pytest.raises(UsageError, match=r"record 1: field 'response_ids': token id 400 is outside"):
        load_token_cache(str(path), KINDS["sft"], tokenizer, MODEL_DIR)


def test_reference_cache_of_another_tokenizer_is_refused(tiny_tokenizer_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer

    from utils.provenance import tokenizer_fingerprint
    from utils.reference_cache import read_reference, reference_path, write_reference
    from utils.schema import KINDS
    from utils.token_cache import TokenCache
    from utils.token_data import Split
    records = TokenCache.from_records(
        [{"prompt_id": "a", "prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": [8, 2]}], KINDS["dpo"])
    split = Split("train", "training set t.pt", "t.pt", records)
    other = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    provenance = {"reference_model": tiny_tokenizer_dir, "data_fingerprint": records.fingerprint(),
                  "tokenizer_fingerprint": tokenizer_fingerprint(other)}
    os.makedirs(tmp_path / "ref")
    write_reference(reference_path(str(tmp_path / "ref"), split), ["a"], [[torch.zeros(2)], [torch.zeros(2)]],
                    provenance)
    with pytest.raises(UsageError, match="whose tokenizer is not the policy's"):
        read_reference(str(tmp_path / "ref"), split, AutoTokenizer.from_pretrained(MODEL_DIR))
    reference = read_reference(str(tmp_path / "ref"), split, other)  # the right tokenizer: accepted
    values, offsets = reference.columns[0]  # pair 0's chosen log-probs
    assert values[offsets[0]:offsets[1]].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("setting, theirs", [("max_length", 512), ("prompt_type", "chat"), ("overlong", "drop"),
                                             ("split_special_tokens", False), ("tokenizer_fingerprint", "f00")])
def test_a_dev_cache_made_otherwise_than_the_training_cache_is_refused(tmp_path, setting, theirs):
    """Everything that changes the ids or their meaning: a dev set with another max_length, chat template, overlong
    policy, special-token handling or tokenizer is evaluated on other ids than the model trains on."""
    from utils.token_data import check_caches_agree

    made = {"tokenizer_fingerprint": "abc", "prompt_type": "completion", "max_length": 256, "overlong": "truncate",
            "split_special_tokens": True, "training_type": "sft"}
    for name, meta in (("train.arrow", made), ("dev.arrow", dict(made, **{setting: theirs}))):
        (tmp_path / f"{name}.meta.json").write_text(json.dumps(meta))
    caches = [("training set t", str(tmp_path / "train.arrow")), ("dev set d", str(tmp_path / "dev.arrow"))]
    with pytest.raises(UsageError, match=f"dev set d was tokenized with .*{setting if 'finger' not in setting else ''}"
                                         ".*training set t with"):
        check_caches_agree(caches)
    (tmp_path / "dev.arrow.meta.json").write_text(json.dumps(made))
    check_caches_agree(caches)  # made alike: accepted
    meta = dict(made)
    del meta["split_special_tokens"]  # an older cache: special-token spellings were control tokens (False)
    (tmp_path / "dev.arrow.meta.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="split_special_tokens False"):
        check_caches_agree(caches)


def test_reference_files_agree_on_the_model_and_the_precision_is_the_policy_s():
    """One reference model for every split (refused otherwise); a float32 reference for a --bf16 policy (or the
    reverse) starts DPO away from ln 2 (SmolLM2, 2 processes: step-1 loss 0.6957, accuracy 0.52): a warning."""
    from utils.reference_cache import ReferenceLogProbs, check_references_agree

    def ref(path, provenance):
        return ReferenceLogProbs(path, provenance, ())

    fp32 = {"reference_model": "/m", "reference_fingerprint": "a", "compute_dtype": "float32"}
    bf16 = dict(fp32, compute_dtype="bfloat16 autocast")
    assert check_references_agree([ref("r/train.pt", fp32), ref("r/dev.pt", fp32)], bf16=False) is None
    assert check_references_agree([ref("r/train.pt", bf16)], bf16=True) is None
    for references, policy_bf16 in (([ref("r/train.pt", fp32)], True), ([ref("r/train.pt", bf16)], False),
                                    ([ref("r/train.pt", bf16), ref("r/dev.pt", fp32)], True)):
        warning = check_references_agree(references, policy_bf16)
        assert warning.startswith("warning: the reference log-probs in r were computed in") and "ln 2" in warning
    with pytest.raises(UsageError, match="r/dev.pt and r/train.pt were computed by different reference models"):
        check_references_agree([ref("r/train.pt", fp32), ref("r/dev.pt", dict(fp32, reference_fingerprint="b"))],
                               False)


# --------------------------------------------------------------------------- 5. test records changed by max_length


@pytest.mark.slow
def test_test_records_changed_by_max_length_are_reported(tmp_path):
    demo_model_dir()
    raw = tmp_path / "train.jsonl"
    raw.write_text("".join(open(SFT_TRAIN).readlines()[:40]))
    cache = tokenize(raw, tmp_path / "train.pt", max_length=12)  # cuts a few demo samples too
    tests = tmp_path / "tests"
    tests.mkdir()
    write_jsonl(tests / "t.jsonl", [{"prompt_id": "fits", "prompt": "add 1 2\n", "response": "3"},
                                    {"prompt_id": "cut", "prompt": "reverse abc\n", "response": "a b c d e f g h i"}])
    out = tmp_path / "out"
    proc = launch("train.py", train_args(cache, out, "--test_dataset_dir", str(tests), "--save_strategy", "no",
                                         budget=64, steps=2))
    assert "warning: test file t.jsonl: 2 of 2 records evaluated; 1 truncated (--max_length 12" in proc.stdout, \
        proc.stdout[-2000:]
    results = json.loads((out / "test_results.json").read_text())["t.jsonl"]
    assert (results["records_in"], results["records_evaluated"], results["truncated"]) == (2, 2, 1)


def test_dpo_test_pairs_dropped_are_counted(tmp_path):
    from transformers import AutoTokenizer

    from utils.schema import KINDS
    from utils.token_data import describe_test_changes, tokenize_test_file
    demo_model_dir()
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt_id": 1, "prompt": "add 1 2\n", "chosen": "3", "rejected": "4"},
                                              {"prompt_id": 2, "prompt": "add 2 2\n", "chosen": "4", "rejected": "4"}])
    meta = {"prompt_type": "completion", "max_length": 64, "overlong": "truncate"}
    records, counts = tokenize_test_file(str(path), AutoTokenizer.from_pretrained(MODEL_DIR), meta, KINDS["dpo"])
    assert len(records) == 1 and counts["dropped_chosen_equals_rejected"] == 1 and counts["records_in"] == 2
    assert "1 of 2 records evaluated; 1 dropped chosen equals rejected" in describe_test_changes("t.jsonl", counts, meta)


# --------------------------------------------------------------------------- 6. two runs at once, 7. run scripts


@pytest.mark.slow
def test_two_runs_at_once_without_port(data, tmp_path):
    env = {k: v for k, v in ENV.items() if k not in ("PORT", "NPROC")}
    procs = [subprocess.Popen(["bash", "train.sh", "runs/sft.sh", "--max_steps", "2", "--save_steps", "1000"],
                              cwd=ROOT, env=dict(env, OUTPUT_DIR=str(tmp_path / f"run{i}"), DEV_DATA="", TEST_DIR="",
                                                 TRAIN_DATA=str(data["cache"]), MAX_TOKENS="128"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert all((tmp_path / f"run{i}" / "model.safetensors").exists() for i in range(2))


def test_resuming_says_when_it_does_not_simply_continue(tmp_path):
    from utils.checkpoints import resume_note

    assert resume_note(str(tmp_path), "latest", None) == f"note: no checkpoint of this run in {tmp_path}: starting at step 0"
    assert resume_note(str(tmp_path), None, None) is None
    assert resume_note(str(tmp_path), "latest", "ckpt") is None  # an interrupted run: it just continues
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "already holds this run's final model (model.safetensors): resuming from ckpt" in \
        resume_note(str(tmp_path), "latest", "ckpt")


@pytest.mark.slow
def test_a_refused_launch_keeps_earlier_logs_and_leaves_no_folder(tmp_path):
    """train.sh appends to an output folder's training.log (a header per launch), so a refused or resumed launch
    never replaces the log of the run already there; a launch refused before it wrote anything into a folder it
    created leaves no folder."""
    env = dict(ENV, DEV_DATA="", TEST_DIR="")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "training.log").write_text("the earlier run's log\n")
    for name in ("old", "new"):
        proc = subprocess.run(["bash", "train.sh", "runs/sft.sh", "--learning_rat", "1"], cwd=ROOT,
                              env=dict(env, OUTPUT_DIR=str(tmp_path / name)), capture_output=True, text=True)
        assert proc.returncode == 2
        output = proc.stdout + proc.stderr  # (a first launch in a fresh clone also makes the demo caches)
        assert [line for line in output.splitlines() if line.startswith("error")] == [
            "error: unknown arguments: --learning_rat 1 (see python train.py --help)"], output
    log = (tmp_path / "old" / "training.log").read_text().splitlines()
    assert log[0] == "the earlier run's log" and log[1].endswith("bash train.sh runs/sft.sh --learning_rat 1")
    assert log[2].startswith("error: unknown arguments")
    assert not (tmp_path / "new").exists()


def run_script_args(script, **env):
    """The train.py arguments a run script sets, with the given environment (nothing is launched)."""
    proc = subprocess.run(["bash", "-c", f'set -e; source utils/launch.sh; source {script}; '
                           'printf "%s\\n" "${TRAIN_ARGS[@]}"'],
                          cwd=ROOT, env=dict(ENV, **env), capture_output=True, text=True)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


@pytest.mark.parametrize("script, lr", [("runs/sft.sh", "2e-5"), ("runs/dpo.sh", "5e-7")])
def test_run_scripts_use_fine_tuning_defaults_for_another_model(script, lr, tmp_path):
    rc, args, _ = run_script_args(script, MODEL=str(tmp_path), TRAIN_DATA="mine.pt")
    assert rc == 0
    assert args[args.index("--learning_rate") + 1] == lr
    assert args[args.index("--train_data_path") + 1] == "mine.pt"
    assert "--dev_data_path" not in args and "--test_dataset_dir" not in args  # no demo data for another model
    rc, _, err = run_script_args(script, MODEL=str(tmp_path))
    assert rc == 2 and "set TRAIN_DATA" in err
    rc, args, _ = run_script_args(script)  # the demo keeps its tuned settings
    assert rc == 0 and args[args.index("--learning_rate") + 1] in ("3e-3", "1e-3")


def test_saved_model_files_are_readable_like_every_other_output(tmp_path):
    """safetensors writes its file 0600; the saved model is shared like the logs and metrics (the umask's mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.checkpoints import save_hf_model
    from utils.record_io import plain_file_mode

    demo_model_dir()
    save_hf_model(AutoModelForCausalLM.from_pretrained(MODEL_DIR), AutoTokenizer.from_pretrained(MODEL_DIR), str(tmp_path))
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {plain_file_mode()}, modes
