"""What train.py and get_logits.py train and evaluate on: the splits of a run (a token-id cache, where it came from
and, for losses that need them, its reference log-probs), from token-id caches and from raw test files tokenized
on the fly with the settings recorded in the training cache's ``.meta.json`` (so test data is tokenized exactly
like the training data), each checked before step 1."""
import os
from dataclasses import dataclass
from typing import Optional

from utils.errors import UsageError
from utils.provenance import check_cache_tokenizer
from utils.sources import SOURCE_SUFFIXES, Source, is_source_file
from utils.token_cache import ID_SETTINGS, TokenCache, read_meta, read_token_cache
from utils.tokenization import MAX_LENGTH_COUNTS, Tokenize, TokenizeSettings, tokenize_file


@dataclass
class Split:
    """One split of a run. ``role``: train, dev or test; ``label``: how messages name it; ``path``: its cache (a
    raw file for a test file); ``name``: a test file's name; ``counts``: a test file's records by outcome
    (``records_in``, ``records_evaluated``, truncations and drops); ``reference``: its reference log-probs
    (``utils.reference_cache.ReferenceLogProbs``) when the loss needs them."""
    role: str
    label: str
    path: str
    cache: TokenCache
    name: Optional[str] = None
    counts: Optional[dict] = None
    reference: Optional[object] = None


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


def load_token_cache(path, kind, tokenizer=None, model_path=None):
    """The TokenCache in ``path`` (utils.token_cache), checked to hold samples of ``kind`` and, given the model's
    ``tokenizer`` (loaded from ``model_path``), to have been made with that tokenizer."""
    if not os.path.isfile(path):
        raise UsageError(f"token-id cache '{path}' does not exist (make it with tokenized_inputs/get_tokenized_data.py)")
    cache = read_token_cache(path, kind)
    if tokenizer is not None:
        check_cache_tokenizer(path, read_meta(path), cache, tokenizer, model_path)
    return cache


def load_splits(kind, tokenizer, model_path, train_path, dev_path, test_dir, test_files, say):
    """The splits of a run ([Split], train first, then dev, then the test files; a path left out is no split):
    caches checked for ``kind`` and the model's ``tokenizer`` and to agree in how they were made
    (:func:`check_caches_agree`), test files tokenized as the training cache was (what their max_length policy
    changed is said through ``say``)."""
    splits = [Split(role, f"{what} {path}", path, load_token_cache(path, kind, tokenizer, model_path))
              for role, what, path in (("train", "training set", train_path), ("dev", "dev set", dev_path)) if path]
    check_caches_agree([(split.label, split.path) for split in splits])
    train_meta = read_meta(train_path) if train_path else None
    for path in test_file_paths(test_dir, test_files) if test_dir else []:
        name = os.path.basename(path)
        cache, counts = tokenize_test_file(path, tokenizer, train_meta, kind)
        splits.append(Split("test", f"test file {name}", path, cache, name=name, counts=counts))
        if note := describe_test_changes(name, counts, train_meta):
            say("warning: " + note)
    return splits


def test_file_paths(test_dir, test_files=None):
    """The files to evaluate: every record file in ``test_dir``, or the named subset (bare names)."""
    if not os.path.isdir(test_dir):
        raise UsageError(f"--test_dataset_dir '{test_dir}' is not a folder")
    available = [name for name in sorted(os.listdir(test_dir)) if is_source_file(name)]
    if not available:
        raise UsageError(f"--test_dataset_dir '{test_dir}' holds no {', '.join(SOURCE_SUFFIXES)} file")
    if test_files:
        names = [n.strip() for n in test_files.split(",") if n.strip()]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise UsageError(f"--test_files: {', '.join(unknown)} not in {test_dir} (available: {', '.join(available)})")
        available = names
    return [os.path.join(test_dir, n) for n in available]


def tokenize_test_file(path, tokenizer, train_meta, kind):
    """A raw test file tokenized with the training cache's prompt_type / max_length / overlong policy
    (``utils.tokenization.tokenize_file``, as get_tokenized_data.py tokenizes). Returns (TokenCache, counts):
    ``records_in``, ``records_evaluated`` and every truncation or drop by reason."""
    if not train_meta:
        raise UsageError("evaluating raw test files needs the training cache's .meta.json "
                         "(re-run get_tokenized_data.py), which records how to tokenize them")
    settings = TokenizeSettings.of_cache(train_meta)
    kept = []
    made = tokenize_file([Source(path)], kind, settings, Tokenize(tokenizer, settings.prompt_type, settings.split_special_tokens),
                         kept.extend)
    identical = made["dropped_chosen_equals_rejected"]
    if not kept:
        raise UsageError(f"{path}: no record left to evaluate ({identical} with chosen equal to rejected, "
                         f"{made['records_in'] - identical} removed by --max_length {settings.max_length} --overlong "
                         f"{settings.overlong})")
    counts = {"records_in": made["records_in"], "records_evaluated": len(kept),
              **({"dropped_chosen_equals_rejected": identical} if kind.paired else {}),
              **{key: made.get(key, 0) for key in MAX_LENGTH_COUNTS}}
    return TokenCache.from_records(kept, kind, path), counts


def describe_test_changes(name, counts, train_meta):
    """One line about the records of a test file that are not evaluated as written (None when all are)."""
    changed = {k: v for k, v in counts.items() if v and k.startswith(("truncated", "dropped"))}
    if not changed:
        return None
    what = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in changed.items())
    return (f"test file {name}: {counts['records_evaluated']} of {counts['records_in']} records evaluated; {what} "
            f"(--max_length {train_meta['max_length']}, --overlong {train_meta['overlong']} of the training cache)")


def check_budget(split, layout, max_tokens, option="--per_device_eval_batch_max_tokens", divider=1,
                 default=" (default: the training budget)"):
    """Every sample of ``split`` must fit one micro-batch of ``max_tokens // divider`` tokens (costs as ``layout``
    packs them); checked before training starts so that no run fails later. UsageError naming the split, the
    sample's prompt_id, the ``option`` and the value it needs."""
    costs = layout.costs(split.cache)
    worst = int(costs.argmax())
    if costs[worst] > max_tokens // divider:
        bins = f" // --batch_tokens_divider {divider}" if divider > 1 else ""
        raise UsageError(f"{split.label}: prompt_id {split.cache.prompt_id[worst]!r} costs {int(costs[worst])} tokens, "
                         f"more than {option} {max_tokens}{bins}{default}; set it to at least {int(costs[worst]) * divider}")


#END
