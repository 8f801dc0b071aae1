"""Token-id caches held by column: one flat integer array and its offsets per id field, no Python int per token.

A ``TokenCache`` holds the samples of one kind (``utils.schema.Kind``): for each id field (``prompt_ids``,
``response_ids`` / ``chosen_ids``, ``rejected_ids``) a 1-D values array and int64 offsets (sample ``i`` is
``values[offsets[i]:offsets[i + 1]]``), plus the ``prompt_id`` of each sample. Everything on the training path
(costs, plans, packing, reference log-probs, evaluation) reads these arrays.

On disk, the ``.arrow`` format is an Arrow IPC file (pyarrow, which ``datasets`` is built on): one record batch,
``prompt_id`` (JSON-encoded strings, so strings and integers both round-trip) and one ``large_list<int32>`` column
per id field (``large_list<uint16>`` when every id is below 65,536, else ``int32``), the kind's name in the
schema's metadata (under ``KIND_KEY``). It is opened memory-mapped: opening costs
milliseconds whatever the size, the values are never copied, and the processes of a node share the pages.
Measured against numpy ``.npy`` memory maps on 100M tokens (``bench/scale_bench.py``): the same open time (ms)
and validation time (0.13 s), and one self-describing file instead of one per array, so Arrow it is. The older
formats (``.json``, ``.jsonl``, ``.pt``, gzipped or not) stay readable and writable; they are converted to
columns when loaded, with the same values.

A kind's untrained-span field (``utils.schema.Kind.untrained``: sft's ``response_untrained``, a multi-turn
conversation's turns between its assistant turns) is one more column of the same form (int32 values, flat
``[s0, e0, s1, e1, ...]`` per sample), present only when some sample has such a span: a cache of single-turn
records is the same file, byte for byte, as before the field existed.

Validation is vectorised (offsets, lengths, id range, spans, unique ``prompt_id``) and every error names the file,
the record and the field.
"""
import hashlib
import itertools
import json
import os

import numpy as np

from utils.errors import DataError, UsageError
from utils.provenance import tokenizer_fingerprint
from utils.record_io import (
    COLUMNS_FORMAT,
    atomic_open,
    atomic_write_json,
    encode_records,
    file_sha256,
    load_records,
    split_format,
)

ARROW_FORMAT = "llmtrainer-token-ids-arrow-v1"
KIND_KEY = "training_type"  # the kind's name, in an .arrow file's metadata and in a .meta.json


class TokenCache:
    """The samples of one ``kind`` (a ``utils.schema.Kind``), by column (see the module docstring).
    ``columns[field]`` is (values: 1-D uint16/int32 array, offsets: (n+1,) int64); ``prompt_id``: a list of
    str/int; ``source``: the file (for messages), ``locations``: each sample's place in it (default "record i")."""

    def __init__(self, kind, columns, prompt_id, source="<records>", locations=None):
        self.kind = kind
        self.columns = columns  # {field: (values, offsets)}
        self.prompt_id = prompt_id  # list of str / int, one per sample
        self.source, self.locations = source, locations

    def __len__(self):
        return len(self.prompt_id)

    def where(self, i):
        return self.locations[i] if self.locations else f"record {i}"

    def error(self, i, field, message):
        return DataError(self.source, message, where=self.where(i), field=field)

    # ---- reading

    def lengths(self):
        """{id field: int64 lengths over the samples; untrained-span field (when the cache has it): the tokens its
        spans cover}."""
        lengths = {f: np.diff(self.columns[f][1]) for f in self.kind.id_fields}
        for span in self.span_fields():
            values, offsets = self.columns[span]
            covered = np.zeros(len(values) // 2 + 1, dtype=np.int64)
            np.cumsum(values[1::2].astype(np.int64) - values[0::2], out=covered[1:])
            lengths[span] = covered[offsets[1:] // 2] - covered[offsets[:-1] // 2]
        return lengths

    def span_fields(self):
        """The kind's untrained-span fields this cache has a column for."""
        return tuple(f for f in self.kind.span_fields if f in self.columns)

    def ids(self, field, i):
        values, offsets = self.columns[field]
        return values[offsets[i]:offsets[i + 1]]

    def sequences(self, indices):
        """[(prompt ids, response ids), ...] of the samples ``indices``, response field by response field (DPO: all
        chosen sequences, then all rejected ones), as array views."""
        return [(self.ids("prompt_ids", i), self.ids(field, i)) for field in self.kind.response_id_fields
                for i in indices]

    def untrained(self, indices):
        """The untrained spans of :meth:`sequences` (one flat int array per sequence, in the same order), or None
        when the cache has no span column (every response token trained)."""
        spans = {f: self.kind.span_field(f) for f in self.kind.response_id_fields}
        if not any(s in self.columns for s in spans.values()):
            return None
        empty = np.zeros(0, np.int32)
        return [self.ids(spans[f], i) if spans[f] in self.columns else empty
                for f in self.kind.response_id_fields for i in indices]

    def shared_prompt_samples(self, indices):
        """[(prompt ids, (response ids, ...)), ...] of the samples ``indices`` (DPO: (chosen, rejected)), as array
        views, for ``utils.packing.pack_shared_prompts``."""
        return [(self.ids("prompt_ids", i), tuple(self.ids(field, i) for field in self.kind.response_id_fields))
                for i in indices]

    def record(self, i):
        return {"prompt_id": self.prompt_id[i], **{f: self.ids(f, i).tolist()
                                                   for f in self.kind.id_fields + self.span_fields()}}

    def to_records(self):
        return [self.record(i) for i in range(len(self))]

    def fingerprint(self):
        """sha256 of the prompt_ids and every id and span field (values as int32 whatever their storage, offsets)."""
        h = hashlib.sha256(json.dumps(self.prompt_id).encode())
        for field in self.kind.id_fields + self.span_fields():
            values, offsets = self.columns[field]
            h.update(field.encode())
            for start in range(0, len(values), 1 << 24):  # in slices: no copy of the whole column
                h.update(np.ascontiguousarray(values[start:start + (1 << 24)], dtype=np.int32).tobytes())
            h.update(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
        return h.hexdigest()

    def largest_id(self):
        """(the largest token id, the index of a sample holding it, its id field), or None for a cache without ids."""
        found = None
        for field in self.kind.id_fields:
            values, offsets = self.columns[field]
            if values.size and (found is None or int(values.max()) > found[0]):
                k = int(values.argmax())
                found = (int(values[k]), int(np.searchsorted(offsets, k, side="right")) - 1, field)
        return found

    # ---- building

    @classmethod
    def from_records(cls, records, kind, source="<records>", locations=None):
        """Columns of a list of cache records (dicts) of ``kind``; DataError naming the first bad record."""
        cache = cls(kind, {}, [], source, locations)
        if not records:
            raise DataError(source, "holds no records")
        for i, record in enumerate(records):
            if "prompt_id" not in record:
                raise cache.error(i, "prompt_id", "missing: is this a token-id cache?")
        cache.prompt_id = [r["prompt_id"] for r in records]
        for field in kind.id_fields:
            lists = [r.get(field) for r in records]
            bad = next((i for i, v in enumerate(lists) if type(v) is not list and not _is_1d(v)), None)
            if bad is not None:
                message = (f"missing: is this a {kind.name} token-id cache?" if field not in records[bad]
                           else f"expected a list of token ids, found {type(lists[bad]).__name__}")
                raise cache.error(bad, field, message)
            lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
            offsets = np.zeros(len(lists) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            flat = np.array(list(itertools.chain.from_iterable(lists)))
            if flat.size and flat.dtype.kind not in "iu":
                k = next(i for i, v in enumerate(lists) if any(type(x) is not int and not isinstance(x, np.integer)
                                                               for x in v))
                raise cache.error(k, field, "must be a list of integer token ids")
            if flat.size and flat.min() < 0:
                k = int(np.searchsorted(offsets, int(np.argmin(flat)), side="right")) - 1
                raise cache.error(k, field, "negative token id")
            cache.columns[field] = (flat if flat.size else np.zeros(0, np.int64), offsets)
        for span in kind.span_fields:
            lists = [r.get(span) or [] for r in records]
            bad = next((i for i, v in enumerate(lists) if not (type(v) is list or _is_1d(v))
                        or any(type(x) is not int and not isinstance(x, np.integer) for x in v)), None)
            if bad is not None:
                raise cache.error(bad, span, "must be a list of integer token positions [start, end, ...]")
            if any(len(v) for v in lists):
                cache.columns[span] = _column(lists, np.int32)
        cache.compact()
        cache.validate()
        return cache

    def compact(self):
        """Store the ids as uint16 when every id of every field is below 65,536 (most vocabularies up to ~64k),
        else int32: 2 or 4 bytes a token in memory and on disk."""
        top = max((int(v.max()) for v, _ in (self.columns[f] for f in self.kind.id_fields) if v.size), default=0)
        dtype = ids_dtype(top + 1)
        for field in self.kind.id_fields:
            values, offsets = self.columns[field]
            self.columns[field] = (values.astype(dtype, copy=False), offsets)

    @classmethod
    def from_columns(cls, table, kind, source):
        """From the columnar .pt layout of utils.record_io ({field: {"ids", "offsets"}}, prompt_id list)."""
        try:
            columns = table["columns"]
            prompt_id = list(columns["prompt_id"])
            data = {f: (columns[f]["ids"].numpy(), columns[f]["offsets"].numpy().astype(np.int64))
                    for f in kind.id_fields + kind.span_fields if f in columns}
        except (KeyError, TypeError, AttributeError) as err:
            raise DataError(source, f"damaged columnar token-id file ({err})") from None
        cache = cls(kind, data, prompt_id, source)
        for field in kind.id_fields:
            if field not in data:
                raise cache.error(0, field, f"missing: is this a {kind.name} token-id cache?")
        for field in kind.id_fields:
            values, offsets = data[field]
            if values.size and values.min() < 0:
                raise cache.error(int(np.searchsorted(offsets, int(np.argmin(values)), side="right")) - 1, field,
                                  "negative token id")
        cache.compact()
        cache.validate()
        return cache

    def validate(self):
        """Offsets consistent with the values, non-negative ids, a trained token in every response, unique
        prompt_id. DataError naming the first bad record and field."""
        n = len(self.prompt_id)
        for field in self.kind.id_fields:
            values, offsets = self.columns[field]
            if values.ndim != 1 or offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(values):
                raise DataError(self.source, f"field '{field}': offsets do not match the values (damaged file?)")
            steps = np.diff(offsets)
            if (steps < 0).any():
                raise self.error(int(np.flatnonzero(steps < 0)[0]), field, "negative length (damaged file?)")
            if values.dtype.kind not in "iu" or (values.dtype.kind == "i" and values.size and values.min() < 0):
                i = int(np.searchsorted(offsets, int(np.argmin(values)), side="right")) - 1 if values.size else 0
                raise self.error(i, field, "negative token id" if values.dtype.kind == "i" else
                                 f"token ids stored as {values.dtype}, not integers")
        lengths = self.lengths()
        for field in self.kind.response_id_fields:
            empty = np.flatnonzero(lengths[field] == 0)
            if empty.size:
                raise self.error(int(empty[0]), field, "is empty: the sample has nothing to train on")
            untrained = np.flatnonzero(self.kind.trained_tokens(lengths, field) < 1)
            if untrained.size:
                raise self.error(int(untrained[0]), field, "one token after an empty prompt: nothing to train on "
                                                           "(the first token has nothing to be predicted from)")
        for span in self.span_fields():
            self._validate_spans(span, lengths)
        first_seen = {}
        for i, key in enumerate(self.prompt_id):
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise self.error(i, "prompt_id", f"must be a string or an integer, found {type(key).__name__}")
            if first_seen.setdefault(key, i) != i:
                raise self.error(i, "prompt_id", f"duplicate {key!r} (first at {self.where(first_seen[key])})")

    def _validate_spans(self, span, lengths):
        """Each sample's untrained spans lie strictly inside its response, in order, apart: ``0 < s < e < R``
        and each starts after the one before ends (the response begins and ends with trained tokens)."""
        values, offsets = self.columns[span]
        n = len(self.prompt_id)
        if values.ndim != 1 or offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(values):
            raise DataError(self.source, f"field '{span}': offsets do not match the values (damaged file?)")
        counts = np.diff(offsets)
        odd = np.flatnonzero((counts % 2) | (counts < 0))
        if odd.size:
            raise self.error(int(odd[0]), span, "must hold pairs of positions [start, end, ...]")
        values = values.astype(np.int64)
        starts, ends = values[0::2], values[1::2]
        sample = np.repeat(np.arange(n), counts // 2)
        response = lengths[next(f for f, s in self.kind.untrained if s == span)][sample]
        after = np.ones(len(starts), bool)
        after[1:] = starts[1:] > ends[:-1]
        after[(offsets[:-1] // 2)[counts > 0]] = True  # a sample's first span follows nothing
        bad = np.flatnonzero((starts < 1) | (ends <= starts) | (ends >= response) | ~after)
        if bad.size:
            k = int(bad[0])
            raise self.error(int(sample[k]), span, f"span [{starts[k]}, {ends[k]}) is not inside the response "
                             f"({response[k]} tokens) after the span before it: spans must satisfy 0 < start < end "
                             "< response length, in order")

    # ---- the .arrow format

    @classmethod
    def open_arrow(cls, path, kind):
        """Memory-map an .arrow token-id cache of ``kind`` (no copy of the ids) and validate it."""
        import pyarrow as pa

        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            table = reader.read_all()
            meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(path, f"not a readable Arrow token-id file ({str(err).splitlines()[0]})") from None
        if meta.get("format") != ARROW_FORMAT:
            raise DataError(path, "not an llmtrainer token-id cache (no format marker in its metadata)")
        if meta.get(KIND_KEY) != kind.name:
            raise UsageError(f"{path} holds {meta.get(KIND_KEY)} samples, not {kind.name}")
        columns = {}
        missing = next((f for f in kind.id_fields if f not in table.column_names), None)
        if missing:
            raise DataError(path, f"no column '{missing}'")
        for field in kind.id_fields + tuple(f for f in kind.span_fields if f in table.column_names):
            column = table.column(field)
            chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
            columns[field] = (chunk.values.to_numpy(zero_copy_only=True),
                              chunk.offsets.to_numpy(zero_copy_only=True).astype(np.int64, copy=False))
        try:
            prompt_id = [json.loads(s) for s in table.column("prompt_id").to_pylist()]
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(path, f"unreadable prompt_id column ({err})") from None
        cache = cls(kind, columns, prompt_id, str(path))
        cache.validate()
        return cache

    def write_arrow(self, file):
        """Write as an .arrow token-id cache to an open binary file."""
        import pyarrow as pa

        arrays = {"prompt_id": pa.array([json.dumps(k) for k in self.prompt_id], pa.string())}
        for field in self.kind.id_fields + self.span_fields():
            values, offsets = self.columns[field]
            arrays[field] = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
        table = pa.table(arrays).replace_schema_metadata({"format": ARROW_FORMAT, KIND_KEY: self.kind.name})
        with pa.ipc.new_file(file, table.schema) as writer:
            writer.write_table(table)


class ColumnWriter:
    """Builds a TokenCache from chunks of cache records (dicts) without holding their ids as Python ints: each
    chunk's ids are appended to a file per id field in ``folder`` (``dtype``); lengths and prompt_ids stay in
    memory (8 bytes and one object a sample). Untrained spans (records' optional span fields) go the same way, as
    int32; a span column no record used is left out. ``finish`` memory-maps the files."""

    def __init__(self, kind, dtype, folder):
        self.kind, self.folder = kind, folder
        self.dtypes = {**{f: np.dtype(dtype) for f in kind.id_fields}, **{f: np.dtype(np.int32) for f in kind.span_fields}}
        self.files = {f: open(os.path.join(folder, f + ".bin"), "wb") for f in self.dtypes}
        self.lengths = {f: [] for f in self.dtypes}
        self.prompt_id = []

    def append(self, records):
        for field, file in self.files.items():
            lists = [r.get(field, ()) for r in records]
            lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
            file.write(np.fromiter(itertools.chain.from_iterable(lists), dtype=self.dtypes[field],
                                   count=int(lengths.sum())).tobytes())
            self.lengths[field].append(lengths)
        self.prompt_id += [r["prompt_id"] for r in records]

    def finish(self, source):
        """The validated TokenCache of everything appended (ids memory-mapped from the folder's files)."""
        columns = {}
        for field, file in self.files.items():
            file.close()
            lengths = np.concatenate(self.lengths[field]) if self.lengths[field] else np.zeros(0, np.int64)
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            if field in self.kind.span_fields and not offsets[-1]:
                continue  # no sample has an untrained span
            values = (np.memmap(file.name, dtype=self.dtypes[field], mode="r", shape=(int(offsets[-1]),))
                      if offsets[-1] else np.zeros(0, self.dtypes[field]))
            columns[field] = (values, offsets)
        cache = TokenCache(self.kind, columns, self.prompt_id, source)
        cache.validate()
        return cache


def ids_dtype(vocab_size):
    """The storage of token ids for a vocabulary: uint16 up to 65,536 ids, else int32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def _column(lists, dtype):
    """(values, offsets) of a list of integer lists."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, lists), dtype=np.int64, count=len(lists)), out=offsets[1:])
    return np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=int(offsets[-1])), offsets


def _is_1d(value):
    return getattr(value, "ndim", None) == 1


def is_arrow(path):
    return str(path).endswith(".arrow")


def check_cache_path(path):
    """A token-id cache path names its format: .arrow, or a record format of utils.record_io."""
    if not is_arrow(path):
        try:
            split_format(path)
        except DataError:
            raise DataError(path, "unknown suffix: expected .arrow (recommended for large data), or .json, .jsonl, "
                                  ".pt, optionally followed by .gz") from None


def read_token_cache(path, kind):
    """The validated TokenCache of ``kind`` in ``path`` (.arrow memory-mapped; the record formats converted to
    columns); UsageError when its .meta.json says it holds another kind."""
    check_cache_path(path)
    meta = read_meta(path)
    if meta and meta.get(KIND_KEY) != kind.name:
        raise UsageError(f"{path} was tokenized for --{KIND_KEY} {meta.get(KIND_KEY)}, not {kind.name}")
    if is_arrow(path):
        if not os.path.isfile(path):
            raise DataError(path, "no such file")
        return TokenCache.open_arrow(path, kind)
    loaded = load_records(path, columns=True)
    if isinstance(loaded, dict) and loaded.get("format") == COLUMNS_FORMAT:
        return TokenCache.from_columns(loaded, kind, str(path))
    return TokenCache.from_records(loaded.records, kind, str(path), loaded.locations)


def write_token_cache(path, cache, meta=None, summary=None):
    """Write ``cache`` atomically in the format ``path`` names and, given ``meta`` (:func:`cache_meta`), its
    ``.meta.json`` beside it: ``meta``, the sha256 of the written bytes, ``summary``."""
    check_cache_path(path)
    if is_arrow(path):
        with atomic_open(path, "wb") as f:
            cache.write_arrow(f)
        sha256 = file_sha256(path)
    else:
        data = encode_records(path, cache.to_records())
        with atomic_open(path, "wb") as f:
            f.write(data)
        sha256 = hashlib.sha256(data).hexdigest()
    if meta is not None:
        atomic_write_json(meta_path(path), {**meta, "sha256": sha256, "summary": summary})


# ---- the .meta.json beside a cache: how its ids were made

META_FORMAT = "llmtrainer-token-ids-v1"
# What makes a cache's ids what they are, as its .meta.json records it, and what a cache written before a setting
# was recorded did (None: always recorded). The caches of one run must agree on all of them.
ID_SETTINGS = {"tokenizer_fingerprint": None, "prompt_type": None, "max_length": None, "overlong": None,
               "split_special_tokens": False, "mask_history": False}


def cache_meta(kind, settings, tokenizer_path, tokenizer, sources, seed):
    """The ``.meta.json`` of a cache of ``kind`` made from ``sources`` (one dict per raw source: ``source``, its
    ``sha256``, ``records_in``, ``records_drawn`` and the weight or count asked for) with ``settings`` (a
    ``utils.tokenization.TokenizeSettings``), ``tokenizer`` (loaded from ``tokenizer_path``) and a mixture's draw
    ``seed``, less the sha256 and summary :func:`write_token_cache` adds. ``source``: the sources' names, joined."""
    return {"format": META_FORMAT, KIND_KEY: kind.name, "prompt_type": settings.prompt_type,
            "split_special_tokens": settings.split_special_tokens, "tokenizer": os.path.abspath(tokenizer_path),
            "tokenizer_class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),  # checked by train.py, get_logits.py
            "max_length": settings.max_length, "overlong": settings.overlong, "mask_history": settings.mask_history,
            "source": ",".join(s["source"] for s in sources), "sources": sources, "seed": seed}


def meta_path(path):
    return str(path) + ".meta.json"


def read_meta(path):
    """The ``.meta.json`` of the cache in ``path`` (a dict), or None for a cache without one."""
    if not os.path.isfile(meta_path(path)):
        return None
    with open(meta_path(path), encoding="utf-8") as f:
        return json.load(f)
