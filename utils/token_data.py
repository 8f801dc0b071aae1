"""Loading what train.py trains and evaluates on: token-id caches, and raw test files tokenized on the fly
with the settings recorded in the training cache's ``.meta.json`` (so test data is tokenized exactly like
the training data)."""
import json
import os

from utils.errors import DataError, UsageError
from utils.record_io import FORMATS, load_records, split_format
from utils.tokenization import Tokenize, apply_max_length, tokenize_records, validate_records

CACHE_FIELDS = {"sft": ("prompt_ids", "response_ids"), "dpo": ("prompt_ids", "chosen_ids", "rejected_ids")}


def read_meta(cache_path):
    path = str(cache_path) + ".meta.json"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_token_cache(path, training_type):
    """Records of a token-id cache, checked to hold non-empty id lists for ``training_type``."""
    if not os.path.isfile(path):
        raise UsageError(f"token-id cache '{path}' does not exist (make it with tokenized_inputs/get_tokenized_data.py)")
    meta = read_meta(path)
    if meta and meta.get("training_type") != training_type:
        raise UsageError(f"{path} was tokenized for --training_type {meta.get('training_type')}, not {training_type}")
    record_file = load_records(path)
    first_seen = {}
    for i, record in enumerate(record_file.records):
        for field in ("prompt_id",) + CACHE_FIELDS[training_type]:
            if field not in record:
                raise record_file.error(i, field, f"missing: is this a {training_type} token-id cache?")
        if first_seen.setdefault(record["prompt_id"], i) != i:
            raise record_file.error(i, "prompt_id", f"duplicate {record['prompt_id']!r} (first at record {first_seen[record['prompt_id']]})")
        for field in CACHE_FIELDS[training_type]:
            ids = record[field]
            if not isinstance(ids, list) or not ids or not all(isinstance(x, int) for x in ids):
                raise record_file.error(i, field, "must be a non-empty list of token ids")
    return record_file.records


def test_file_paths(test_dir, test_files=None):
    """The files to evaluate: every record file in ``test_dir``, or the named subset (bare names)."""
    if not os.path.isdir(test_dir):
        raise UsageError(f"--test_dataset_dir '{test_dir}' is not a folder")
    available = []
    for name in sorted(os.listdir(test_dir)):
        try:
            split_format(name)
            available.append(name)
        except DataError:
            continue
    if not available:
        raise UsageError(f"--test_dataset_dir '{test_dir}' holds no {', '.join(FORMATS)} file")
    if test_files:
        names = [n.strip() for n in test_files.split(",") if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise UsageError(f"--test_files: {', '.join(unknown)} not in {test_dir} (available: {', '.join(available)})")
        available = names
    return [os.path.join(test_dir, n) for n in available]


def tokenize_test_file(path, tokenizer, train_meta, training_type):
    """A raw test file tokenized with the training cache's prompt_type / max_length / overlong policy."""
    if not train_meta:
        raise UsageError("evaluating raw test files needs the training cache's .meta.json "
                         "(re-run get_tokenized_data.py), which records how to tokenize them")
    records, locations, _ = validate_records(load_records(path), training_type)
    ids = tokenize_records(Tokenize(tokenizer, train_meta["prompt_type"]), records, training_type)
    kept, _ = apply_max_length(ids, training_type, train_meta["max_length"], train_meta["overlong"],
                               lambda i, msg: DataError(path, msg, where=locations[i]))
    return kept


def load_test_sets(test_dir, test_files, tokenizer, train_meta, training_type):
    """{file name: tokenized records} for every test file to evaluate (see test_file_paths)."""
    if not test_dir:
        return {}
    return {os.path.basename(path): tokenize_test_file(path, tokenizer, train_meta, training_type)
            for path in test_file_paths(test_dir, test_files)}
