"""Loading what train.py trains and evaluates on: token-id caches, and raw test files tokenized on the fly
with the settings recorded in the training cache's ``.meta.json`` (so test data is tokenized exactly like
the training data)."""
import json
import os

from utils.errors import DataError, UsageError
from utils.provenance import check_cache_tokenizer
from utils.record_io import FORMATS, split_format
from utils.token_cache import TokenCache, read_token_cache
from utils.tokenization import RecordError, Tokenize, apply_max_length, tokenize_records, validated_records


def read_meta(cache_path):
    path = str(cache_path) + ".meta.json"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# What makes a cache's ids what they are, as its .meta.json records it, and what a cache written before a setting
# was recorded did (None: always recorded). The caches of one run must agree on all of them.
ID_SETTINGS = {"tokenizer_fingerprint": None, "prompt_type": None, "max_length": None, "overlong": None,
               "split_special_tokens": False}


def check_caches_agree(caches):
    """The token-id caches of a run ([(label, path)], the training cache first) were made alike: UsageError naming
    both files and the first ID_SETTINGS setting a cache's .meta.json records differently from the first's (a dev
    set tokenized with another chat template, max_length or special-token handling is evaluated on other ids than
    the model trains on; test files are tokenized with the training cache's settings). Caches without a .meta.json
    are not compared."""
    if len(caches) < 2:
        return
    (first_label, first_path), *others = caches
    first = read_meta(first_path)
    for label, path in others:
        meta = read_meta(path)
        if first is None or meta is None:
            continue
        for setting, default in ID_SETTINGS.items():
            ours, theirs = first.get(setting, default), meta.get(setting, default)
            if ours != theirs:
                shown = "another tokenizer" if setting == "tokenizer_fingerprint" else f"{setting} {theirs!r}"
                raise UsageError(f"{label} was tokenized with {shown}, {first_label} with "
                                 f"{'another' if setting == 'tokenizer_fingerprint' else repr(ours)}: re-tokenize one "
                                 f"of them so that both are made alike (get_tokenized_data.py)")


def load_token_cache(path, training_type, tokenizer=None, model_path=None):
    """The TokenCache in ``path`` (utils.token_cache), checked to hold ``training_type`` samples and, given the
    model's ``tokenizer`` (loaded from ``model_path``), to have been made with that tokenizer."""
    if not os.path.isfile(path):
        raise UsageError(f"token-id cache '{path}' does not exist (make it with tokenized_inputs/get_tokenized_data.py)")
    meta = read_meta(path)
    if meta and meta.get("training_type") != training_type:
        raise UsageError(f"{path} was tokenized for --training_type {meta.get('training_type')}, not {training_type}")
    cache = read_token_cache(path, training_type)
    if tokenizer is not None:
        check_cache_tokenizer(path, meta, cache, tokenizer, model_path)
    return cache


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
    """A raw test file tokenized with the training cache's prompt_type / max_length / overlong policy.
    Returns (TokenCache, counts): ``records_in``, ``records_evaluated`` and every truncation or drop by reason."""
    if not train_meta:
        raise UsageError("evaluating raw test files needs the training cache's .meta.json "
                         "(re-run get_tokenized_data.py), which records how to tokenize them")
    read = {}
    located = list(validated_records(path, training_type, read))
    records, locations = [r for _, r in located], [where for where, _ in located]
    identical = read["dropped_chosen_equals_rejected"]
    # as the training cache: caches from before the option was recorded kept special-token spellings as control tokens
    tokenize = Tokenize(tokenizer, train_meta["prompt_type"], train_meta.get("split_special_tokens", False))
    try:
        ids, _ = tokenize_records(tokenize, records, training_type)
    except RecordError as err:
        raise DataError(path, err.message, where=locations[err.index], field=err.field) from None
    kept, counts = apply_max_length(ids, training_type, train_meta["max_length"], train_meta["overlong"],
                                    lambda i, msg: DataError(path, msg, where=locations[i]))
    if not kept:
        raise UsageError(f"{path}: no record left to evaluate ({identical} with chosen equal to rejected, "
                         f"{len(ids)} removed by --max_length {train_meta['max_length']} --overlong {train_meta['overlong']})")
    counts = {"records_in": len(records) + identical, "records_evaluated": len(kept),
              **({"dropped_chosen_equals_rejected": identical} if training_type == "dpo" else {}), **counts}
    return TokenCache.from_records(kept, training_type, path), counts


def describe_test_changes(name, counts, train_meta):
    """One line about the records of a test file that are not evaluated as written (None when all are)."""
    changed = {k: v for k, v in counts.items() if v and k.startswith(("truncated", "dropped"))}
    if not changed:
        return None
    what = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in changed.items())
    return (f"test file {name}: {counts['records_evaluated']} of {counts['records_in']} records evaluated; {what} "
            f"(--max_length {train_meta['max_length']}, --overlong {train_meta['overlong']} of the training cache)")


def load_test_sets(test_dir, test_files, tokenizer, train_meta, training_type):
    """{file name: (tokenized records, counts)} for every test file to evaluate (see test_file_paths and
    tokenize_test_file)."""
    if not test_dir:
        return {}
    return {os.path.basename(path): tokenize_test_file(path, tokenizer, train_meta, training_type)
            for path in test_file_paths(test_dir, test_files)}


def check_budget(label, cache, max_tokens, share_prompt=False, option="--per_device_eval_batch_max_tokens",
                 divider=1, default=" (default: the training budget)"):
    """Every sample of ``cache`` must fit one micro-batch of ``max_tokens // divider`` tokens (costs as packed:
    ``share_prompt`` for DPO pairs with their prompt once); checked before training starts so that no run fails
    later. UsageError naming the set, the sample's prompt_id, the ``option`` and the value it needs."""
    costs = cache.costs(share_prompt)
    worst = int(costs.argmax())
    if costs[worst] > max_tokens // divider:
        bins = f" // --batch_tokens_divider {divider}" if divider > 1 else ""
        raise UsageError(f"{label}: prompt_id {cache.prompt_id[worst]!r} costs {int(costs[worst])} tokens, more "
                         f"than {option} {max_tokens}{bins}{default}; set it to at least {int(costs[worst]) * divider}")


def check_embedding_rows(caches, rows, tokenizer_size, resize_hint):
    """Every token id of ``caches`` ([(label, TokenCache)]) must have a row in the model's input embedding (``rows``
    of them): an id past it (tokens added to the tokenizer, the model not resized) fails the first forward that
    meets it, which may be the test evaluation after training. Checked before step 1; UsageError naming the set, the
    record and field holding the largest id, the embedding size and what to do (``resize_hint`` when the tokenizer
    has more tokens than the embedding has rows)."""
    for label, cache in caches:
        found = cache.largest_id()
        if found and found[0] >= rows:
            largest, i, field = found
            fix = f"the tokenizer has {tokenizer_size} tokens: {resize_hint}" if tokenizer_size > rows else \
                "was the cache tokenized with another tokenizer?"
            raise UsageError(f"{label}: {cache.where(i)}: field '{field}': token id {largest} has no row in the "
                             f"model's embedding ({rows} rows); {fix}")
