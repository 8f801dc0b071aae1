"""Reading and writing record files: ``.json`` (a list), ``.jsonl``, ``.pt`` (a ``torch.save``d list of
dicts), each optionally gzip-compressed (``.json.gz`` ...). The format is chosen by the path's suffix,
for raw data and token-id caches alike. Every write is atomic: a temporary file in the same folder,
fsync, then ``os.replace``, so an interrupted run never leaves a half-written file.
"""
import contextlib
import gzip
import hashlib
import io
import itertools
import json
import os
import tempfile
import zlib

import numpy as np
import torch

from utils.errors import DataError

FORMATS = (".json", ".jsonl", ".pt")


def split_format(path):
    """Return (format, gzipped) for a path, e.g. ('.jsonl', True) for 'x.jsonl.gz'."""
    name = os.path.basename(str(path))
    gzipped = name.endswith(".gz")
    if gzipped:
        name = name[: -len(".gz")]
    for fmt in FORMATS:
        if name.endswith(fmt):
            return fmt, gzipped
    raise DataError(path, "unknown suffix: expected one of .json, .jsonl, .pt, optionally followed by .gz")


class RecordFile:
    """The records of one file, with where each came from ("line 7" or "record 6") for error messages."""

    def __init__(self, path, records, locations):
        self.path, self.records, self.locations = str(path), records, locations

    def __len__(self):
        return len(self.records)

    def error(self, index, field, message):
        return DataError(self.path, message, where=self.locations[index], field=field)


def _read_bytes(path, gzipped):
    if not os.path.isfile(path):
        raise DataError(path, "no such file")
    with open(path, "rb") as f:
        data = f.read()
    if gzipped:
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as err:
            raise DataError(path, f"truncated or corrupt gzip data ({err})") from None
    if not data.strip():
        raise DataError(path, "file is empty")
    return data


def _decode(path, data):
    """UTF-8 text; a byte-order mark at the start (what many Windows tools write) is skipped."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(path, f"not valid UTF-8 (byte offset {err.start})", where=f"line {line}") from None


def load_records(path, columns=False):
    """Load a record file; every record is a dict. Raises DataError with the file and line on problems.
    ``columns``: a .pt file stored by column is returned as its column table (see ``_to_columns``), unconverted."""
    path = str(path)
    fmt, gzipped = split_format(path)
    data = _read_bytes(path, gzipped)
    if fmt == ".pt":
        try:
            records = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as err:  # torch raises many types for a bad pickle/zip; all mean "unreadable"
            raise DataError(path, f"not a readable torch.save file ({type(err).__name__})") from None
        if isinstance(records, dict) and records.get("format") == COLUMNS_FORMAT:
            if columns:
                return records
            records = _from_columns(path, records)
        if not isinstance(records, list):
            raise DataError(path, f"expected a list of records, found {type(records).__name__}")
        locations = [f"record {i}" for i in range(len(records))]
    elif fmt == ".json":
        text = _decode(path, data)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, f"malformed JSON: {err.msg} (column {err.colno})", where=f"line {err.lineno}") from None
        except (ValueError, RecursionError) as err:  # e.g. an integer over Python's digit limit, deep nesting
            raise DataError(path, f"unreadable JSON: {type(err).__name__}: {err}") from None
        if not isinstance(records, list):
            raise DataError(path, f"expected a JSON list of records, found {type(records).__name__}")
        locations = [f"record {i}" for i in range(len(records))]
    else:  # .jsonl
        text = _decode(path, data)
        records, locations = [], []
        # Split on "\n" only: str.splitlines() also breaks at U+2028, U+2029, U+0085, ... which JSON (and
        # json.dumps(ensure_ascii=False)) leaves raw inside strings. A "\r" before "\n" is JSON whitespace.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                records.append(_jsonl_record(path, lineno, line))
                locations.append(f"line {lineno}")
    if not records:
        raise DataError(path, "file holds no records")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(path, f"expected a record (object), found {type(record).__name__}", where=locations[i])
    return RecordFile(path, records, locations)


def _jsonl_record(path, lineno, line):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(path, f"malformed JSON: {err.msg} (column {err.colno})", where=f"line {lineno}") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer over Python's digit limit, deep nesting
        raise DataError(path, f"unreadable JSON: {type(err).__name__}: {err}", where=f"line {lineno}") from None


def iter_records(path):
    """(location, record) of a record file, one at a time. ``.jsonl`` (gzipped or not) is read line by line, so
    its size is not bounded by memory; the other formats are loaded whole (``load_records``). Errors as there."""
    path = str(path)
    fmt, gzipped = split_format(path)
    if fmt != ".jsonl":
        record_file = load_records(path)
        yield from zip(record_file.locations, record_file.records)
        return
    if not os.path.isfile(path):
        raise DataError(path, "no such file")
    seen = False
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            for lineno, raw in enumerate(f, start=1):  # a binary file splits at b"\n" only
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(path, f"not valid UTF-8 (byte offset {err.start} of the line)",
                                    where=f"line {lineno}") from None
                if line.strip():
                    record = _jsonl_record(path, lineno, line)
                    if not isinstance(record, dict):
                        raise DataError(path, f"expected a record (object), found {type(record).__name__}",
                                        where=f"line {lineno}")
                    seen = True
                    yield f"line {lineno}", record
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(path, f"truncated or corrupt gzip data ({err})") from None
    if not seen:
        raise DataError(path, "file is empty")


# Token-id caches in .pt are stored by column: one int64 tensor (+ offsets) per list-of-ids field instead of
# millions of Python ints, which torch's weights_only unpickler reads ~100x slower. Loading gives back the
# same list of dicts; a plain list of dicts (any raw .pt file) loads as it is.
COLUMNS_FORMAT = "llmtrainer-columns-v1"


def _to_columns(records):
    """The columnar form of records whose fields are all the same and whose list fields hold ints; else None."""
    if not records or any(r.keys() != records[0].keys() for r in records):
        return None
    columns = {}
    for key in records[0]:
        values = [r[key] for r in records]
        if all(isinstance(v, list) for v in values):
            flat = list(itertools.chain.from_iterable(values))
            if flat and set(map(type, flat)) != {int}:
                return None
            offsets = np.zeros(len(values) + 1, dtype=np.int64)
            np.cumsum([len(v) for v in values], out=offsets[1:])
            columns[key] = {"ids": torch.tensor(flat, dtype=torch.int64), "offsets": torch.from_numpy(offsets)}
        elif all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            columns[key] = values
        else:
            return None
    return {"format": COLUMNS_FORMAT, "num_records": len(records), "columns": columns}


def _from_columns(path, table):
    try:
        out = [{} for _ in range(table["num_records"])]
        for key, column in table["columns"].items():
            if isinstance(column, dict):
                ids, offsets = column["ids"].tolist(), column["offsets"].tolist()
                for record, a, b in zip(out, offsets[:-1], offsets[1:]):
                    record[key] = ids[a:b]
            else:
                for record, value in zip(out, column):
                    record[key] = value
        return out
    except (KeyError, TypeError, AttributeError, IndexError):
        raise DataError(path, "damaged columnar record file") from None


def encode_records(path, records):
    """Serialize records in the format the path's suffix names; returns bytes."""
    fmt, gzipped = split_format(path)
    if fmt == ".pt":
        buf = io.BytesIO()
        records = list(records)
        torch.save(_to_columns(records) or records, buf)
        data = buf.getvalue()
    elif fmt == ".json":
        data = json.dumps(list(records), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    else:
        data = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records).encode("utf-8")
    if gzipped:
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return data


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _umask()  # read once, at import: setting it again later would race with other threads creating files


def plain_file_mode():
    """The mode a plain open() gives a new file under this process's umask (0644 under the usual 022)."""
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """Open a temporary file beside ``path``; on clean exit fsync and rename it over ``path``.

    On any exception (or Ctrl-C) the temporary file is removed and ``path`` is left as it was.
    """
    path = str(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, plain_file_mode())  # mkstemp makes 0600
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def save_records(path, records):
    """Write records atomically in the format the path's suffix names."""
    atomic_write_bytes(path, encode_records(path, records))


def file_sha256(path, h=None):
    """The sha256 (hex) of a file's bytes, read in 16 MiB blocks; with ``h`` (a hashlib object) the bytes are added
    to it instead and nothing is returned."""
    own = h is None
    h = hashlib.sha256() if own else h
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest() if own else None
