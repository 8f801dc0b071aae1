"""utils/record_io.py: every format x gzip round-trips, the files are what their suffix says (checked with
json/gzip/torch directly), jsonl locations, error messages, atomic writes, and weights_only .pt loading."""
import gzip
import io
import json
import os
import pickle

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from utils import record_io
from utils.errors import DataError
from utils.record_io import atomic_open, load_records, save_records, split_format

SUFFIXES = [".json", ".json.gz", ".jsonl", ".jsonl.gz", ".pt", ".pt.gz"]

RECORDS = [
    {"prompt_id": "a-1", "prompt": "add 12 34\n", "response": "46"},
    {"prompt_id": 7, "prompt": "Ünïcödé 🙂 \"quoted\" \\ back\tslash", "response": " leading and trailing space "},
    {"prompt_id": "sep", "prompt": "line\u2028separator, para\u2029graph, next\x85line, \r\n crlf", "response": "x"},
    {"prompt_id": "ids", "prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 2], "rejected_ids": []},
    {"prompt_id": "nested", "meta": {"score": 0.5, "ok": True, "none": None, "list": ["a", 1]}},
]


def independent_read(path):
    """Read a record file with json/gzip/torch directly, not through record_io."""
    with open(path, "rb") as f:
        data = f.read()
    if str(path).endswith(".gz"):
        assert data[:2] == b"\x1f\x8b", "a .gz file must be gzip-compressed"
        data = gzip.decompress(data)
    else:
        assert data[:2] != b"\x1f\x8b"
    name = str(path).removesuffix(".gz")
    if name.endswith(".pt"):
        return torch.load(io.BytesIO(data), weights_only=True)
    text = data.decode("utf-8")
    if name.endswith(".jsonl"):
        assert text.endswith("\n")
        return [json.loads(line) for line in text.split("\n") if line]
    return json.loads(text)


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def error_of(path):
    with pytest.raises(DataError) as info:
        load_records(path)
    return info.value


# --- formats and round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_every_format(tmp_path, suffix):
    path = str(tmp_path / f"data{suffix}")
    save_records(path, RECORDS)
    assert independent_read(path) == RECORDS
    loaded = load_records(path)
    assert loaded.records == RECORDS
    assert loaded.path == path and len(loaded) == len(RECORDS)
    if suffix.startswith(".jsonl"):
        assert loaded.locations == [f"line {i}" for i in range(1, len(RECORDS) + 1)]
    else:
        assert loaded.locations == [f"record {i}" for i in range(len(RECORDS))]
    assert os.listdir(tmp_path) == [f"data{suffix}"], "no temporary file may be left behind"


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_load_reads_files_written_by_other_tools(tmp_path, suffix):
    """Files made with json/gzip/torch directly (pretty-printed JSON, CRLF jsonl) load the same."""
    name = suffix.removesuffix(".gz")
    if name == ".pt":
        buf = io.BytesIO()
        torch.save(RECORDS, buf)
        data = buf.getvalue()
    elif name == ".json":
        data = json.dumps(RECORDS, indent=2).encode()
    else:
        data = "".join(json.dumps(r) + "\r\n" for r in RECORDS).encode()
    if suffix.endswith(".gz"):
        data = gzip.compress(data)
    assert load_records(write_bytes(tmp_path / f"x{suffix}", data)).records == RECORDS


text_values = st.text(st.characters(codec="utf-8"), max_size=12)
record_strategy = st.dictionaries(
    st.text(max_size=5), st.one_of(text_values, st.integers(-2**40, 2**40), st.lists(st.integers(0, 50_000), max_size=6),
                                   st.booleans(), st.none()), max_size=4)


@pytest.mark.parametrize("suffix", SUFFIXES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record_strategy, min_size=1, max_size=4))
@example(records=[{"prompt": "a\u2028b"}, {"prompt": "c\u2029d\x85e"}])
def test_round_trip_property(tmp_path, suffix, records):
    path = str(tmp_path / f"prop{suffix}")
    save_records(path, records)
    assert load_records(path).records == records


def test_save_records_accepts_a_generator(tmp_path):
    path = str(tmp_path / "gen.jsonl")
    save_records(path, (r for r in RECORDS))
    assert independent_read(path) == RECORDS


def test_gzip_output_is_reproducible(tmp_path):
    """gzip's header carries no timestamp, so equal records give equal bytes (the meta sha256 is stable)."""
    a, b = str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.jsonl.gz")
    save_records(a, RECORDS)
    save_records(b, RECORDS)
    assert open(a, "rb").read() == open(b, "rb").read()


@pytest.mark.parametrize("name, expected", [
    ("x.json", (".json", False)), ("x.jsonl", (".jsonl", False)), ("x.pt", (".pt", False)),
    ("dir.json/x.jsonl.gz", (".jsonl", True)), ("x.json.gz", (".json", True)), ("x.tar.pt.gz", (".pt", True)),
])
def test_split_format(name, expected):
    assert split_format(name) == expected


@pytest.mark.parametrize("name", ["x.csv", "x.gz", "x.json.bz2", "x.JSON", "x.jsonl.gz.tmp", "json", "x.pth"])
def test_unknown_suffix_is_a_data_error(tmp_path, name):
    with pytest.raises(DataError, match="unknown suffix") as info:
        split_format(name)
    assert info.value.path == name
    with pytest.raises(DataError, match="unknown suffix"):
        save_records(str(tmp_path / name), RECORDS)
    assert os.listdir(tmp_path) == []


# --- jsonl lines ---------------------------------------------------------------------------------------------

def test_jsonl_blank_lines_are_skipped_and_locations_count_them(tmp_path):
    lines = ["", '{"a": 1}', "   ", "\t", '{"a": 2}', "", '{"a": 3}', "", ""]
    path = write_bytes(tmp_path / "blank.jsonl", "\n".join(lines).encode())
    loaded = load_records(path)
    assert loaded.records == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert loaded.locations == ["line 2", "line 5", "line 7"]
    assert str(loaded.error(1, "a", "bad")) == f"{path}: line 5: field 'a': bad"


def test_jsonl_malformed_line_names_its_line_number(tmp_path):
    path = write_bytes(tmp_path / "bad.jsonl", b'{"a": 1}\n\n{"a": 2}\n{"a": \n{"a": 4}\n')
    err = error_of(path)
    assert err.path == path and err.where == "line 4"
    assert str(err).startswith(f"{path}: line 4: malformed JSON")


def test_jsonl_line_numbers_are_newline_based_in_gzip_too(tmp_path):
    path = write_bytes(tmp_path / "bad.jsonl.gz", gzip.compress(b'{"a": "x\xe2\x80\xa8y"}\n{"a": 2}\n{oops}\n'))
    assert error_of(path).where == "line 3"


# --- error messages ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, data, where, message", [
    ("empty.jsonl", b"", None, "file is empty"),
    ("blank.json", b" \n\t\n", None, "file is empty"),
    ("empty.pt", b"", None, "file is empty"),
    ("empty.json.gz", gzip.compress(b"", mtime=0), None, "file is empty"),
    ("truncated.jsonl.gz", gzip.compress(b'{"a": 1}\n' * 50, mtime=0)[:-12], None, "truncated or corrupt gzip"),
    ("notgzip.json.gz", b'[{"a": 1}]', None, "truncated or corrupt gzip"),
    ("latin1.jsonl", b'{"a": 1}\n{"a": "caf\xe9"}\n', "line 2", "not valid UTF-8"),
    ("latin1.json", b'[{"a": 1},\n\n {"a": "caf\xe9"}]', "line 3", "not valid UTF-8"),
    ("bad.json", b'[{"a": 1},\n {"a": 2,}\n]', "line 2", "malformed JSON"),
    ("object.json", b'{"a": 1}', None, "expected a JSON list of records, found dict"),
    ("nolist.jsonl", b'{"a": 1}\n[1, 2]\n', "line 2", "expected a record (object), found list"),
    ("strings.json", b'[{"a": 1}, "b"]', "record 1", "expected a record (object), found str"),
    ("none.json", b"[]", None, "file holds no records"),
    ("garbage.pt", b"this is not a torch file", None, "not a readable torch.save file"),
])
def test_load_errors_name_file_and_place(tmp_path, name, data, where, message):
    path = write_bytes(tmp_path / name, data)
    err = error_of(path)
    assert err.path == path and err.where == where and message in err.message
    assert str(err).startswith(path + ": ") and "\n" not in str(err)


def test_missing_file_is_a_data_error(tmp_path):
    path = str(tmp_path / "absent.jsonl")
    err = error_of(path)
    assert err.path == path and "no such file" in str(err)
    (tmp_path / "folder.json").mkdir()
    assert "no such file" in str(error_of(str(tmp_path / "folder.json")))


def test_pt_holding_a_non_list_is_rejected(tmp_path):
    path = str(tmp_path / "dict.pt")
    torch.save({"a": 1}, path)
    assert "expected a list of records, found dict" in str(error_of(path))
    torch.save([{"a": 1}, [1, 2]], path)
    assert error_of(path).where == "record 1"


class Exploit:
    """Unpickling this with weights_only=False would create the file named by ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".pt.gz"])
def test_pt_loading_is_weights_only(tmp_path, suffix):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save([{"prompt_id": 1, "x": Exploit(str(marker))}], buf)
    data = gzip.compress(buf.getvalue()) if suffix.endswith(".gz") else buf.getvalue()
    path = write_bytes(tmp_path / f"evil{suffix}", data)
    err = error_of(path)
    assert "not a readable torch.save file" in str(err)
    assert not marker.exists(), "the pickle's payload ran"
    # A plain (non-zip) pickle with the same payload is rejected as well.
    path = write_bytes(tmp_path / "plain.pt", pickle.dumps([Exploit(str(marker))], protocol=2))
    assert "not a readable torch.save file" in str(error_of(path))
    assert not marker.exists()


# --- atomic writes -------------------------------------------------------------------------------------------

OLD = [{"prompt_id": "old", "prompt": "keep me"}]


def setup_target(tmp_path, suffix, existing):
    path = str(tmp_path / f"out{suffix}")
    if existing:
        save_records(path, OLD)
    before = open(path, "rb").read() if existing else None
    return path, before


def assert_untouched(tmp_path, path, before):
    names = os.listdir(tmp_path)
    if before is None:
        assert names == [], f"left behind: {names}"
    else:
        assert names == [os.path.basename(path)], f"left behind: {names}"
        assert open(path, "rb").read() == before
        assert load_records(path).records == OLD


def failing_records():
    yield RECORDS[0]
    yield RECORDS[1]
    raise RuntimeError("source failed midway")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_failing_record_source_leaves_no_file(tmp_path, suffix, existing):
    path, before = setup_target(tmp_path, suffix, existing)
    with pytest.raises(RuntimeError, match="midway"):
        save_records(path, failing_records())
    assert_untouched(tmp_path, path, before)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl.gz"])
def test_unserializable_record_leaves_no_file(tmp_path, suffix, existing):
    path, before = setup_target(tmp_path, suffix, existing)
    with pytest.raises(TypeError):
        save_records(path, RECORDS[:2] + [{"x": object()}] + RECORDS[2:])
    assert_untouched(tmp_path, path, before)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "ctrl-c"])
@pytest.mark.parametrize("patched", ["os.replace", "os.fsync"])
def test_interrupted_commit_leaves_no_temporary_file(tmp_path, monkeypatch, existing, failure, patched):
    """The temporary file exists (written, maybe synced) when the failure hits; it must be removed."""
    path, before = setup_target(tmp_path, ".jsonl", existing)
    seen = []

    def fail(*args):
        seen.append(sorted(os.listdir(tmp_path)))
        raise failure

    monkeypatch.setattr(record_io.os, patched.split(".")[1], fail)
    with pytest.raises(type(failure)):
        save_records(path, RECORDS)
    assert len(seen) == 1 and any(n.endswith(".tmp") for n in seen[0]), "the failure came before the temp file"
    monkeypatch.undo()
    assert_untouched(tmp_path, path, before)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_atomic_open_exception_midway_through_writing(tmp_path, existing):
    path, before = setup_target(tmp_path, ".jsonl", existing)
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(path) as f:
            f.write(b'{"prompt_id": "new"}\n{"prompt_id": "half')
            f.flush()
            assert any(n.endswith(".tmp") for n in os.listdir(tmp_path)), "writes go to a temporary file beside it"
            raise KeyboardInterrupt
    assert_untouched(tmp_path, path, before)


def test_atomic_open_replaces_existing_target_and_creates_folders(tmp_path):
    path = str(tmp_path / "new" / "sub" / "out.jsonl")
    save_records(path, OLD)
    save_records(path, RECORDS)
    assert independent_read(path) == RECORDS
    assert os.listdir(tmp_path / "new" / "sub") == ["out.jsonl"]


def test_pt_token_ids_are_stored_by_column_and_load_back_identical(tmp_path):
    records = [{"prompt_id": f"p{i}", "prompt_ids": list(range(i, i + 5)), "response_ids": [7] * (i % 3)}
               for i in range(50)]
    path = tmp_path / "cache.pt"
    save_records(str(path), records)
    raw = torch.load(str(path), weights_only=True)
    assert raw["format"] == "llmtrainer-columns-v1" and raw["columns"]["prompt_ids"]["ids"].dtype == torch.int64
    assert load_records(str(path)).records == records
    # what is not a plain id table (a float in a list) is stored as the list of dicts it is
    odd = [{"prompt_id": 1, "x": [1.5]}]
    save_records(str(path), odd)
    assert isinstance(torch.load(str(path), weights_only=True), list)
    assert load_records(str(path)).records == odd


def test_pt_damaged_column_table_is_a_data_error(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"format": "llmtrainer-columns-v1", "num_records": 2, "columns": {"a": {"ids": torch.tensor([1])}}},
               str(path))
    with pytest.raises(DataError, match="damaged"):
        load_records(str(path))
