"""Token-id caches by column (utils/token_cache.py): every format round-trips to the same samples, the .arrow
format is memory-mapped, old and new caches give the same plans and losses, and a damaged file is one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.launching import ENV, MODEL_DIR, ROOT, demo_model_dir, launch
from utils.errors import DataError, UsageError
from utils.record_io import save_records
from utils.schema import KINDS, SampleLayout
from utils.token_cache import TokenCache, read_token_cache, write_token_cache

SFT = [{"prompt_id": 0, "prompt_ids": [1, 5, 6], "response_ids": [7, 8, 2]},
       {"prompt_id": "b", "prompt_ids": [], "response_ids": [3, 2]},
       {"prompt_id": 7, "prompt_ids": [1] * 40, "response_ids": list(range(5, 60))}]
DPO = [{"prompt_id": "p0", "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
       {"prompt_id": 3, "prompt_ids": [1, 6, 6], "chosen_ids": [7, 8], "rejected_ids": [9]}]
SUFFIXES = [".arrow", ".pt", ".pt.gz", ".json", ".json.gz", ".jsonl", ".jsonl.gz"]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("kind, records", [("sft", SFT), ("dpo", DPO)])
def test_every_format_round_trips(tmp_path, suffix, kind, records):
    path = tmp_path / f"cache{suffix}"
    write_token_cache(path, TokenCache.from_records(records, KINDS[kind]))
    cache = read_token_cache(path, KINDS[kind])
    assert cache.to_records() == records  # prompt_id types (str / int) included
    assert SampleLayout(KINDS[kind]).costs(cache).tolist() == [len(r["prompt_ids"]) * (len(r) - 2) +
                                      sum(len(v) for k, v in r.items() if k.endswith("_ids") and k != "prompt_ids")
                                      for r in records]
    if suffix == ".arrow":  # opened memory-mapped: the ids are views of the file, not copies
        values = cache.columns["prompt_ids"][0]
        assert not values.flags.owndata and not values.flags.writeable


def test_arrow_cache_is_readable_by_pyarrow_and_datasets(tmp_path):
    import pyarrow as pa
    from datasets import Dataset

    path = tmp_path / "c.arrow"
    write_token_cache(path, TokenCache.from_records(DPO, KINDS["dpo"]))
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    assert table.column("chosen_ids").to_pylist() == [r["chosen_ids"] for r in DPO]
    assert Dataset(table)[1]["rejected_ids"] == DPO[1]["rejected_ids"]


@pytest.mark.slow
def test_plan_and_first_loss_equal_from_old_and_new_caches(tmp_path):
    """The same samples in .pt (the seed's columnar format) and .arrow: the same plan, the same step-1 loss."""
    demo_model_dir()
    from utils.batching import token_budget_batches

    rng = np.random.default_rng(3)
    records = [{"prompt_id": f"s{i}", "prompt_ids": rng.integers(5, 301, rng.integers(1, 20)).tolist(),
                "response_ids": rng.integers(5, 301, rng.integers(1, 20)).tolist()} for i in range(40)]
    paths = {s: tmp_path / f"train{s}" for s in (".pt", ".arrow")}
    save_records(paths[".pt"], records)
    write_token_cache(paths[".arrow"], read_token_cache(paths[".pt"], KINDS["sft"]))
    plans = [token_budget_batches(SampleLayout(KINDS["sft"]).costs(read_token_cache(p, KINDS["sft"])), 128, seed=1)
             for p in paths.values()]
    assert [[mb.indices for mb in s.micro_batches[0]] for s in plans[0]] == \
        [[mb.indices for mb in s.micro_batches[0]] for s in plans[1]]
    losses = []
    for suffix, path in paths.items():
        out = tmp_path / f"out{suffix}"
        launch("train.py", ["--model_name_or_path", MODEL_DIR, "--train_data_path", str(path), "--output_dir", str(out),
                            "--per_device_train_batch_max_tokens", "128", "--max_steps", "2", "--seed", "1",
                            "--save_strategy", "no"])
        losses.append([json.loads(line)["loss"] for line in open(out / "metrics.jsonl")])
    assert losses[0] == losses[1]


def damaged_files(tmp_path):
    import pyarrow as pa

    good = tmp_path / "good.arrow"
    write_token_cache(good, TokenCache.from_records(SFT, KINDS["sft"]))
    data = good.read_bytes()
    (tmp_path / "truncated.arrow").write_bytes(data[:len(data) // 2])
    # a flipped byte: prompt_ids' last offset (43) made 99, past its values
    offsets = np.array([0, 3, 3, 43], dtype=np.int64).tobytes()
    assert data.count(offsets) == 1
    (tmp_path / "offsets.arrow").write_bytes(data.replace(offsets, np.array([0, 3, 3, 99], dtype=np.int64).tobytes()))
    negative = TokenCache.from_records(SFT, KINDS["sft"])
    values, offsets = negative.columns["response_ids"]
    values = values.astype(np.int32)
    values[4] = -7  # (a valid Arrow file whose ids are not token ids)
    negative.columns["response_ids"] = (values, offsets)
    with open(tmp_path / "negative.arrow", "wb") as f:
        negative.write_arrow(f)
    foreign = pa.table({"prompt_id": pa.array(["0"]), "prompt_ids": pa.array([[1]], pa.large_list(pa.int32()))})
    with pa.OSFile(str(tmp_path / "foreign.arrow"), "wb") as f, pa.ipc.new_file(f, foreign.schema) as w:
        w.write_table(foreign)
    return {"truncated.arrow": "not a readable Arrow token-id file", "offsets.arrow": "offsets do not match",
            "negative.arrow": "record 1: field 'response_ids': negative token id",
            "foreign.arrow": "not an llmtrainer token-id cache"}


def test_damaged_arrow_files_are_named_errors(tmp_path):
    for name, message in damaged_files(tmp_path).items():
        with pytest.raises(DataError, match=message) as err:
            read_token_cache(tmp_path / name, KINDS["sft"])
        assert str(tmp_path / name) in str(err.value)
    with pytest.raises(UsageError, match="holds sft samples, not dpo"):
        read_token_cache(tmp_path / "good.arrow", KINDS["dpo"])


@pytest.mark.slow
def test_damaged_cache_stops_train_py_in_one_line(tmp_path):
    damaged_files(tmp_path)
    proc = launch("train.py", ["--model_name_or_path", MODEL_DIR, "--train_data_path", str(tmp_path / "truncated.arrow"),
                               "--output_dir", str(tmp_path / "out")], expect_rc=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "truncated.arrow" in errors[0] and "Traceback" not in proc.stderr


def test_bad_samples_in_columns_are_named():
    with pytest.raises(DataError, match=r"record 1: field 'response_ids': one token after an empty prompt"):
        TokenCache.from_records([SFT[0], {"prompt_id": 1, "prompt_ids": [], "response_ids": [2]}], KINDS["sft"])
    with pytest.raises(DataError, match=r"record 1: field 'prompt_id': duplicate 0"):
        TokenCache.from_records([SFT[0], dict(SFT[1], prompt_id=0)], KINDS["sft"])
    with pytest.raises(DataError, match=r"record 0: field 'chosen_ids': must be a list of integer token ids"):
        TokenCache.from_records([dict(DPO[0], chosen_ids=[1.5])], KINDS["dpo"])


@pytest.mark.slow
def test_tokenizer_cli_writes_arrow(tmp_path):
    demo_model_dir()
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(open(os.path.join(ROOT, "demo", "data", "dpo", "dev.jsonl")).readlines()[:30]))
    for suffix in (".arrow", ".pt"):
        subprocess.run([sys.executable, "tokenized_inputs/get_tokenized_data.py", "--model", MODEL_DIR,
                        "--train_dataset_path", str(raw), "--train_save_path", str(tmp_path / f"c{suffix}"),
                        "--training_type", "dpo", "--prompt_type", "chat", "--num_proc", "1"],
                       cwd=ROOT, env=ENV, check=True, capture_output=True)
    arrow, pt = (read_token_cache(tmp_path / f"c{s}", KINDS["dpo"]) for s in (".arrow", ".pt"))
    assert arrow.to_records() == pt.to_records() and arrow.fingerprint() == pt.fingerprint()
    meta = json.loads((tmp_path / "c.arrow.meta.json").read_text())
    import hashlib
    assert meta["sha256"] == hashlib.sha256((tmp_path / "c.arrow").read_bytes()).hexdigest()


MULTI_TURN = [  # response_untrained: the turns between assistant turns, in the row but not trained
    {"prompt_id": "m", "prompt_ids": [1, 5], "response_ids": [7, 8, 2, 9, 9, 6, 2], "response_untrained": [3, 5]},
    {"prompt_id": 1, "prompt_ids": [1], "response_ids": [4, 2], "response_untrained": []},
    {"prompt_id": 2, "prompt_ids": [1], "response_ids": [4, 2, 9, 6, 2, 9, 5, 2], "response_untrained": [2, 3, 5, 7]}]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_untrained_spans_round_trip_and_weigh_and_pack(tmp_path, suffix):
    path = tmp_path / f"cache{suffix}"
    write_token_cache(path, TokenCache.from_records(MULTI_TURN, KINDS["sft"]))
    cache = read_token_cache(path, KINDS["sft"])
    assert cache.to_records() == MULTI_TURN
    layout = SampleLayout(KINDS["sft"])
    assert layout.loss_weights(cache).tolist() == [5, 2, 5]  # response tokens less the untrained ones
    assert layout.costs(cache).tolist() == [9, 3, 9]  # the untrained tokens are in the row all the same
    batch = layout.pack(cache, [0, 2])
    row = MULTI_TURN[0]["prompt_ids"] + MULTI_TURN[0]["response_ids"] + MULTI_TURN[2]["prompt_ids"] + \
        MULTI_TURN[2]["response_ids"]
    trained = [2, 3, 4, 7, 8] + [10, 11, 13, 14, 17]  # row positions of the trained tokens, written out
    assert batch.input_ids[0].tolist() == row
    assert batch.target_ids.tolist() == [row[p] for p in trained]
    assert batch.target_positions.tolist() == [p - 1 for p in trained]
    assert batch.response_lengths.tolist() == [5, 5]


def test_single_turn_caches_have_no_span_column(tmp_path):
    path = tmp_path / "cache.arrow"
    write_token_cache(path, TokenCache.from_records([dict(r, response_untrained=[]) for r in SFT], KINDS["sft"]))
    import pyarrow as pa
    assert "response_untrained" not in pa.ipc.open_file(str(path)).schema.names
    assert read_token_cache(path, KINDS["sft"]).fingerprint() == TokenCache.from_records(SFT, KINDS["sft"]).fingerprint()


@pytest.mark.parametrize("spans, message", [([0, 2], "0 < start"), ([3, 3], "0 < start"), ([3, 7], "0 < start"),
                                            ([3, 5, 4, 6], "in order"), ([3], "pairs"), ("x", "integer")])
def test_bad_untrained_spans_are_named(spans, message):
    bad = [MULTI_TURN[1], dict(MULTI_TURN[0], response_untrained=spans)]
    with pytest.raises(DataError) as err:
        TokenCache.from_records(bad, KINDS["sft"], source="c.jsonl")
    assert "record 1" in str(err.value) and "response_untrained" in str(err.value) and message in str(err.value)


def test_max_length_cut_inside_an_untrained_span_ends_the_response_trained():
    from utils.tokenization import apply_max_length
    record = MULTI_TURN[2]  # prompt 1 token, response 8 with untrained [2, 3) and [5, 7)
    cut = {n: apply_max_length([record], KINDS["sft"], n, "truncate", None)[0][0] for n in (8, 7, 5, 4)}
    assert (cut[8]["response_ids"], cut[8]["response_untrained"]) == ([4, 2, 9, 6, 2], [2, 3])  # cut in [5, 7)
    assert (cut[7]["response_ids"], cut[7]["response_untrained"]) == ([4, 2, 9, 6, 2], [2, 3])
    assert (cut[5]["response_ids"], cut[5]["response_untrained"]) == ([4, 2, 9, 6], [2, 3])
    assert (cut[4]["response_ids"], cut[4]["response_untrained"]) == ([4, 2], [])  # cut right after [2, 3)
