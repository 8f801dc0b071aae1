"""Where raw records come from: one source or a mixture of several, read one record at a time.

A source is

* a record file read by ``utils.record_io``: ``.json``, ``.jsonl``, ``.pt``, each optionally ``.gz``;
* a file read through ``datasets`` (streamed, so memory stays bounded whatever its size): ``.parquet``, ``.arrow``
  (a Hugging Face Arrow file), ``.csv``;
* a folder written by ``datasets.save_to_disk`` (memory-mapped), ``folder:split`` for one split of a DatasetDict;
* a dataset name already in the local Hugging Face cache, ``owner/name:split`` (never downloaded: resolved offline).

A mixture is a comma-separated list of sources, each optionally followed by ``:weight`` or ``:count``:
``a.jsonl:0.7,b.parquet:0.3`` draws the records in those proportions, the most the sources allow (the source that
runs out first gives all its records); ``a.jsonl:5000,b.parquet:2000`` draws that many from each. The draw is
without replacement, from each source's records in file order, seeded (``select``). A source without a weight or
count gives all its records, which only a mixture without weights allows.

A record's place is ``line 7`` (``.jsonl``), ``record 6`` (``.json``, ``.pt``) or ``row 6`` (datasets' sources,
0-based, as ``dataset[6]``).
"""
import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np

from utils.errors import DataError, UsageError
from utils.record_io import FORMATS, file_sha256, iter_records

DATASETS_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
SOURCE_SUFFIXES = (*FORMATS, *DATASETS_SUFFIXES)  # and each of FORMATS + .gz
BATCH = 1000  # rows converted from Arrow at a time


def is_source_file(name):
    """Whether a file name has the suffix of a raw record file (a test folder's files are those)."""
    return name.removesuffix(".gz").endswith(FORMATS) or name.endswith(tuple(DATASETS_SUFFIXES))


@dataclass(frozen=True)
class Source:
    """One raw source of a split: ``path`` (a file, a folder or a cached dataset's name), ``split`` (of a folder or
    a dataset name), ``weight`` (a proportion of the mixture) or ``count`` (records drawn), both None for all."""
    path: str
    split: str = None
    weight: float = None
    count: int = None

    @property
    def name(self):
        """The source as messages name it (the path, with its split)."""
        return self.path + (f":{self.split}" if self.split else "")

    @property
    def reader(self):
        """'records' (utils.record_io), a datasets builder name ('parquet', 'arrow', 'csv'), 'disk', 'hub', or
        'unknown' (a file with another suffix)."""
        if self.path.removesuffix(".gz").endswith(FORMATS):
            return "records"
        for suffix, builder in DATASETS_SUFFIXES.items():
            if self.path.endswith(suffix):
                return builder
        return "disk" if os.path.isdir(self.path) else "unknown" if os.path.exists(self.path) else "hub"


_NUMBER = re.compile(r"\d+(\.\d*)?|\.\d+")


def parse_sources(spec):
    """The Sources of a ``--*_dataset_path`` value (see the module docstring). Raises UsageError for a malformed
    one: an empty item, weights mixed with counts, a weighted mixture with an unweighted source, a weight of 0."""
    sources = []
    for item in (s.strip() for s in str(spec).split(",")):
        if not item:
            raise UsageError(f"'{spec}': an empty source in the list")
        weight = count = split = None
        head, _, tail = item.rpartition(":")
        if head and _NUMBER.fullmatch(tail) and not os.path.exists(item):
            item = head
            if "." in tail:
                weight = float(tail)
            else:
                count = int(tail)
            if not (weight or count):
                raise UsageError(f"'{spec}': the weight of {item} is 0")
        head, _, tail = item.rpartition(":")
        if head and not os.path.exists(item) and not tail.endswith(tuple(DATASETS_SUFFIXES) + FORMATS + (".gz",)):
            item, split = head, tail
        sources.append(Source(item, split, weight, count))
    kinds = {("weight" if s.weight else "count" if s.count else "all") for s in sources}
    if len(kinds) > 1:
        raise UsageError(f"'{spec}': give every source a weight (a fraction such as 0.3), or every source a count "
                         "(a whole number of records), or none")
    return sources


def read(source, columns=None):
    """(place, record) of every record of ``source``, in order; ``columns`` ({our field: the source's column}):
    those columns renamed. Raises DataError naming the source for one that cannot be found or read."""
    records = _records(source) if source.reader == "records" else _rows(source)
    if not columns:
        yield from records
        return
    for place, record in records:
        yield place, {next((ours for ours, theirs in columns.items() if theirs == key), key): value
                      for key, value in record.items()}


def _records(source):
    if source.split:
        raise DataError(source.path, f"a record file has no splits (':{source.split}')")
    yield from iter_records(source.path)


def _rows(source):
    """The rows of a source read through ``datasets``, in batches of BATCH; None values (Arrow's missing struct
    fields and columns) are left out, so a message without ``tool_calls`` has none."""
    dataset = _dataset(source)
    row = 0
    try:
        for batch in dataset.iter(batch_size=BATCH):
            for values in zip(*batch.values()):
                yield f"row {row}", {k: _without_none(v) for k, v in zip(batch, values) if v is not None}
                row += 1
    except Exception as err:  # noqa: BLE001 - pyarrow / datasets raise many types for a damaged file
        raise DataError(source.name, f"unreadable ({type(err).__name__}: {_first_line(err)})",
                        where=f"row {row}") from None
    if not row:
        raise DataError(source.name, "holds no records")


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _first_line(err):
    return (str(err).strip().splitlines() or [""])[0][:300]


def _dataset(source):
    """The datasets object to iterate: an IterableDataset (files, streamed) or a memory-mapped Dataset."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    reader = source.reader
    if reader == "unknown":
        raise DataError(source.path, f"unknown suffix: expected one of {', '.join(SOURCE_SUFFIXES)} (the first three "
                                     "optionally followed by .gz), a datasets.save_to_disk folder or a dataset name")
    try:
        if reader == "disk":
            return _one_split(datasets.load_from_disk(source.path), source)
        if reader == "hub":
            return _one_split(datasets.load_dataset(source.path, split=source.split), source)
        if source.split:
            raise DataError(source.path, f"a {reader} file has no splits (':{source.split}')")
        if not os.path.isfile(source.path):
            raise DataError(source.path, "no such file")
        return datasets.load_dataset(reader, data_files=source.path, split="train", streaming=True)
    except DataError:
        raise
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        if reader == "hub":
            raise DataError(source.name, "no such file or folder, and no such dataset in the local Hugging Face "
                                         "cache (datasets are never downloaded here: load it once with "
                                         "datasets.load_dataset, or give its files)") from None
        raise DataError(source.name, f"cannot be read: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - datasets raises ValueError, KeyError, ... for what it cannot read
        raise DataError(source.name, f"cannot be read ({type(err).__name__}: {_first_line(err)})") from None


def _one_split(loaded, source):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        names = ", ".join(loaded)
        if len(loaded) != 1:
            raise DataError(source.path, f"holds the splits {names}: name one ({source.path}:<split>)")
        loaded = next(iter(loaded.values()))
    elif source.split and source.reader == "disk":
        raise DataError(source.path, f"a saved Dataset has no splits (':{source.split}')")
    return loaded


def sha256(source):
    """The sha256 of a source's bytes: the file; every file of a folder (by relative path, sorted); a cached
    dataset's Arrow files."""
    if source.reader not in ("disk", "hub"):
        return file_sha256(source.path)
    if source.reader == "disk":
        files = sorted(os.path.relpath(os.path.join(d, f), source.path)
                       for d, _, names in os.walk(source.path) for f in names)
        files = [(f, os.path.join(source.path, f)) for f in files]
    else:
        files = [(os.path.basename(c["filename"]), c["filename"]) for c in _dataset(source).cache_files]
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode() + b"\0")
        file_sha256(path, h)
    return h.hexdigest()


def select(sources, records_in, seed):
    """Which records of each source a mixture draws: a list with, per source, None (all) or the sorted record
    indices (0-based, in the source's order). ``records_in``: each source's record count. Weights: ``n`` records in
    all, the largest with every source's share ``round(w * n)`` at most its records; counts: that many each (at
    most the source's records, else UsageError). Deterministic from ``seed`` (numpy's default_rng)."""
    if all(s.weight is None and s.count is None for s in sources):
        return [None] * len(sources)
    if sources[0].count:
        wanted = [s.count for s in sources]
    else:
        share = np.array([s.weight for s in sources]) / sum(s.weight for s in sources)
        total = min(n / w for n, w in zip(records_in, share))
        wanted = [min(n, int(round(w * total))) for n, w in zip(records_in, share)]
    rng = np.random.default_rng(seed)
    picks = []
    for source, n, k in zip(sources, records_in, wanted):
        if k > n:
            raise UsageError(f"{source.name}: {k} records asked for, it holds {n}")
        picks.append(None if k == n else np.sort(rng.choice(n, size=k, replace=False)))
    return picks
