"""Turn raw SFT / DPO records into a token-id cache.

    python tokenized_inputs/get_tokenized_data.py --model demo/model \
        --train_dataset_path demo/data/sft/train.jsonl --train_save_path cache/sft_train.pt \
        --dev_dataset_path demo/data/sft/dev.jsonl --dev_save_path cache/sft_dev.pt \
        --training_type sft --prompt_type completion

Every record of every input is validated before anything is written; a bad record stops the run with
one line naming the file, the record and the field (exit status 2). Each cache is written atomically,
in the format its save path names, with a ``<save_path>.meta.json`` beside it recording how it was made.
"""
import argparse
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from utils.errors import DataError, UsageError, run_cli  # noqa: E402
from utils.hf_loading import load_tokenizer  # noqa: E402
from utils.provenance import tokenizer_fingerprint  # noqa: E402
from utils.record_io import atomic_write_json, load_records  # noqa: E402
from utils.token_cache import TokenCache, check_cache_path, write_token_cache  # noqa: E402
from utils.tokenization import (OVERLONG_POLICIES, RecordError, Tokenize, apply_max_length,  # noqa: E402
                                length_summary, tokenize_records, validate_records)

CHUNK = 1000  # records per tokenizer call / per task sent to a worker process
MIN_RECORDS_PER_WORKER = 20_000  # below this, starting a worker (imports + tokenizer load) costs more than it saves


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model/tokenizer folder (or a .gguf file)")
    p.add_argument("--train_dataset_path")
    p.add_argument("--train_save_path")
    p.add_argument("--dev_dataset_path")
    p.add_argument("--dev_save_path")
    p.add_argument("--training_type", required=True, choices=["sft", "dpo"])
    p.add_argument("--prompt_type", required=True, choices=["completion", "chat"])
    p.add_argument("--max_length", type=int, default=1024, help="max tokens of prompt + one response")
    p.add_argument("--overlong", choices=OVERLONG_POLICIES, default="truncate",
                   help="records longer than --max_length: truncate the responses (default), drop, or error")
    p.add_argument("--split_special_tokens", choices=["true", "false"], default="true",
                   help="true (default): a special token's spelling in the data (e.g. '</s>', '<|im_end|>') is "
                        "tokenized as text; false: as that control token (the tokenizer's default)")
    p.add_argument("--num_proc", type=int, default=min(4, os.cpu_count() or 1),
                   help=f"worker processes; each takes at least {MIN_RECORDS_PER_WORKER} records")
    args = p.parse_args(argv)
    splits = []
    for split in ("train", "dev"):
        src, dst = getattr(args, f"{split}_dataset_path"), getattr(args, f"{split}_save_path")
        if bool(src) != bool(dst):
            raise UsageError(f"--{split}_dataset_path and --{split}_save_path go together")
        if src:
            check_cache_path(dst)  # an unknown output suffix fails now, not after the work
            splits.append((split, src, dst))
    if not splits:
        raise UsageError("give --train_dataset_path/--train_save_path, --dev_dataset_path/--dev_save_path, or both")
    if args.max_length < 2:
        raise UsageError("--max_length must be at least 2")
    if args.num_proc < 1:
        raise UsageError("--num_proc must be at least 1")
    args.split_special_tokens = args.split_special_tokens == "true"
    return args, splits


_worker = {}


def _init_worker(model, prompt_type, split_special_tokens):
    _worker["tokenize"] = Tokenize(load_tokenizer(model), prompt_type, split_special_tokens)


def _tokenize_chunk(job):
    """(ids, counts) of a chunk, or the chunk's RecordError (returned, not raised: it crosses processes)."""
    records, training_type = job
    try:
        return tokenize_records(_worker["tokenize"], records, training_type)
    except RecordError as err:
        return err


def tokenize_all(args, records, locations, src, desc):
    """(cache records, counts) of validated raw records; a record the tokenizer cannot take is a DataError."""
    chunks = [(records[i:i + CHUNK], args.training_type) for i in range(0, len(records), CHUNK)]
    out, counts = [], {}
    with tqdm(total=len(records), desc=desc, unit="rec", disable=None) as bar:
        workers = min(args.num_proc, len(records) // MIN_RECORDS_PER_WORKER)
        if workers <= 1:
            results = map(_tokenize_chunk, chunks)
        else:
            pool = multiprocessing.get_context("spawn").Pool(
                workers, _init_worker, (args.model, args.prompt_type, args.split_special_tokens))
            results = pool.imap(_tokenize_chunk, chunks)
        try:
            for k, result in enumerate(results):
                if isinstance(result, RecordError):
                    raise DataError(src, result.message, where=locations[k * CHUNK + result.index], field=result.field)
                part, part_counts = result
                out += part
                for key, value in part_counts.items():
                    counts[key] = counts.get(key, 0) + value
                bar.update(len(part))
        finally:
            if workers > 1:
                pool.terminate()
    return out, counts


def main(argv=None):
    args, splits = parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    # in-process use; also fails early on a template that cannot be split
    _worker["tokenize"] = Tokenize(tokenizer, args.prompt_type, args.split_special_tokens)

    validated = []  # every file is read and checked before any tokenizing or writing
    for split, src, dst in splits:
        records, locations, identical = validate_records(load_records(src), args.training_type)
        if identical:
            print(f"warning: {src}: dropped {identical} record(s) whose chosen equals rejected", file=sys.stderr)
        validated.append((split, src, dst, records, locations, identical))

    outputs = []
    for split, src, dst, records, locations, identical in validated:
        start = time.time()
        ids, text_counts = tokenize_all(args, records, locations, src, f"tokenizing {split}")
        kept, counts = apply_max_length(ids, args.training_type, args.max_length, args.overlong,
                                        lambda i, msg: DataError(src, msg, where=locations[i]))
        counts.update(text_counts)
        if not kept:
            raise UsageError(f"{src}: no record left ({identical} dropped as chosen equals rejected, "
                             f"{len(ids)} by the --max_length {args.max_length} policy)")
        counts["dropped_chosen_equals_rejected"] = identical
        summary = {"records_in": len(records) + identical, "records_out": len(kept), **counts,
                   "length": length_summary(kept, args.training_type),
                   "records_per_second": round(len(records) / max(time.time() - start, 1e-9), 1)}
        outputs.append((split, src, dst, kept, summary))

    fingerprint = tokenizer_fingerprint(tokenizer)  # checked by train.py and get_logits.py against their model's
    for split, src, dst, kept, summary in outputs:
        sha256 = write_token_cache(dst, TokenCache.from_records(kept, args.training_type, dst))
        atomic_write_json(dst + ".meta.json", {
            "format": "llmtrainer-token-ids-v1", "training_type": args.training_type,
            "prompt_type": args.prompt_type, "split_special_tokens": args.split_special_tokens,
            "tokenizer": os.path.abspath(args.model),
            "tokenizer_class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "tokenizer_fingerprint": fingerprint,
            "max_length": args.max_length, "overlong": args.overlong, "source": os.path.abspath(src),
            "sha256": sha256, "summary": summary})
        length = summary["length"]
        dropped = {k: v for k, v in summary.items() if k.startswith("dropped") and v}
        print(f"{split}: {summary['records_in']} records in, {summary['records_out']} out -> {dst}")
        print(f"  dropped: {dropped or 'none'}; truncated: {summary['truncated']}")
        if summary["special_token_text"]:
            print(f"  {summary['special_token_text']} record(s) spell a special token in their text: tokenized "
                  + ("as text" if args.split_special_tokens else "as the control token (--split_special_tokens false)"))
        if summary["responses_tokenized_apart"]:
            print(f"  {summary['responses_tokenized_apart']} response(s) tokenized apart from the prompt (their first "
                  "tokens merge with the prompt's end in the whole conversation)")
        print(f"  sequence length: mean {length['mean']:.1f}, p50 {length['p50']:.0f}, "
              f"p90 {length['p90']:.0f}, max {length['max']}; {summary['records_per_second']:.0f} records/s")


if __name__ == "__main__":
    run_cli(main)
