"""Turn raw SFT / DPO records into a token-id cache.

    python tokenized_inputs/get_tokenized_data.py --model demo/model \
        --train_dataset_path demo/data/sft/train.jsonl --train_save_path cache/sft_train.arrow \
        --dev_dataset_path demo/data/sft/dev.jsonl --dev_save_path cache/sft_dev.arrow \
        --training_type sft --prompt_type completion

Every record of every input is validated before anything is written; a bad record stops the run with
one line naming the file, the record and the field (exit status 2). Each cache is written atomically,
in the format its save path names, with a ``<save_path>.meta.json`` beside it recording how it was made.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a dataset name resolves from the local cache only: no downloads

from utils import sources as raw_sources  # noqa: E402
from utils.errors import UsageError, run_cli
from utils.hf_loading import load_tokenizer
from utils.schema import KIND_HELP, KINDS
from utils.token_cache import ColumnWriter, cache_meta, check_cache_path, ids_dtype, write_token_cache
from utils.tokenization import (
    MIN_RECORDS_PER_WORKER,
    OVERLONG_POLICIES,
    Tokenize,
    TokenizeSettings,
    length_summary,
    tokenize_file,
    validated_records,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="example: python tokenized_inputs/get_tokenized_data.py --model demo/model "
                                       "--train_dataset_path demo/data/sft/train.jsonl --train_save_path "
                                       "cache/sft_train.arrow --training_type sft --prompt_type completion")
    p.add_argument("--model", required=True, help="model/tokenizer folder (or a .gguf file) whose tokenizer to use")
    p.add_argument("--train_dataset_path",
                   help="raw training records: a .json, .jsonl or .pt file (optionally .gz), a .parquet, .arrow or "
                        ".csv file, a datasets.save_to_disk folder ([:split]), a dataset in the local Hugging Face "
                        "cache (owner/name[:split]); or a mixture: a,b with weights (a.jsonl:0.7,b.parquet:0.3) "
                        "or record counts (a.jsonl:5000,b.parquet:2000)")
    p.add_argument("--train_save_path", help="the token-id cache to write: .arrow (recommended for large data), or "
                                            ".json, .jsonl, .pt (+.gz); a .meta.json is written beside it")
    p.add_argument("--dev_dataset_path", help="raw dev records (as --train_dataset_path)")
    p.add_argument("--dev_save_path", help="the dev token-id cache to write (as --train_save_path)")
    p.add_argument("--training_type", required=True, choices=list(KINDS), help=KIND_HELP)
    p.add_argument("--prompt_type", required=True, choices=["completion", "chat"],
                   help="completion: prompt + response as plain text; chat: the tokenizer's chat template")
    p.add_argument("--max_length", type=int, default=1024, help="max tokens of prompt + one response")
    p.add_argument("--overlong", choices=OVERLONG_POLICIES, default="truncate",
                   help="records longer than --max_length: truncate the responses, drop, or error")
    p.add_argument("--split_special_tokens", choices=["true", "false"], default="true",
                   help="true: a special token's spelling in the data (e.g. '</s>', '<|im_end|>') is tokenized as "
                        "text; false: as that control token (the tokenizer's default)")
    p.add_argument("--mask_history", action="store_true",
                   help="conversations: train only the last assistant turn (the earlier ones are prompt), as "
                        "LLaMA-Factory's mask_history; by default every assistant turn is trained")
    p.add_argument("--columns", default="",
                   help="the source's column names where they differ from ours, as field=column pairs "
                        "(e.g. prompt=question,response=answer or messages=conversation)")
    p.add_argument("--seed", type=int, default=42, help="the seed of a mixture's draw")
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
            splits.append((split, raw_sources.parse_sources(src), dst))
    if not splits:
        raise UsageError("give --train_dataset_path/--train_save_path, --dev_dataset_path/--dev_save_path, or both")
    if args.max_length < 2:
        raise UsageError("--max_length must be at least 2")
    if args.num_proc < 1:
        raise UsageError("--num_proc must be at least 1")
    args.split_special_tokens = args.split_special_tokens == "true"
    args.columns = parse_columns(args.columns)
    args.kind = KINDS[args.training_type]
    args.settings = TokenizeSettings(args.prompt_type, args.split_special_tokens, args.max_length, args.overlong,
                                     args.mask_history)
    return args, splits


def parse_columns(text):
    """{our field: the source's column} of a --columns value; UsageError for a malformed one."""
    columns = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        field, _, column = pair.partition("=")
        if not field.strip() or not column.strip():
            raise UsageError(f"--columns: '{pair}' is not field=column")
        columns[field.strip()] = column.strip()
    return columns


def main(argv=None):
    args, splits = parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    tokenize = Tokenize(tokenizer, args.prompt_type, args.split_special_tokens)  # fails early on an unusable template
    drawn = {split: check_inputs(split, sources, args) for split, sources, _ in splits}

    outputs, folders, created = [], [], []
    done = False
    try:  # nothing is written where the outputs go until every split is tokenized
        for split, sources, dst in splits:
            start = time.time()
            parent = os.path.dirname(os.path.abspath(dst))
            missing = parent
            while not os.path.isdir(os.path.dirname(missing)):  # the topmost folder this run creates
                missing = os.path.dirname(missing)
            if not os.path.isdir(parent):
                os.makedirs(parent)
                created.append(missing)
            folders.append(tempfile.mkdtemp(prefix=".tokenizing-", dir=parent))  # beside the output: the same disk
            writer = ColumnWriter(args.kind, ids_dtype(len(tokenizer)), folders[-1])
            selection, records_in, described = drawn[split]
            counts = tokenize_file(sources, args.kind, args.settings, tokenize, writer.append, model=args.model,
                                   num_proc=args.num_proc, records_in=records_in, desc=f"tokenizing {split}",
                                   selection=selection, columns=args.columns)
            if not writer.prompt_id:
                identical = counts["dropped_chosen_equals_rejected"]
                raise UsageError(f"{','.join(s.name for s in sources)}: no record left ({identical} dropped as chosen "
                                 f"equals rejected, {counts['records_in'] - identical} by the --max_length "
                                 f"{args.max_length} policy)")
            cache = writer.finish(dst)
            summary = {"records_out": len(cache), **counts, "length": length_summary(cache),
                       "records_per_second": round(records_in / max(time.time() - start, 1e-9), 1)}
            meta = cache_meta(args.kind, args.settings, args.model, tokenizer, described, args.seed)
            outputs.append((split, dst, cache, meta, summary))
        for split, dst, cache, meta, summary in outputs:
            write_token_cache(dst, cache, meta, summary)
            print_summary(split, dst, summary, args, meta["sources"])
        done = True
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        for folder in [] if done else created:  # a failed run leaves no folder behind either
            if not any(files for _, _, files in os.walk(folder)):
                shutil.rmtree(folder, ignore_errors=True)


def check_inputs(split, sources, args):
    """Read and check every record of a split's sources before anything is tokenized or written; draw a mixture's
    records. Returns (the selection, the records it keeps, each source as the cache's meta records it)."""
    read = {}
    for _ in validated_records(sources, args.kind, read, chat=args.prompt_type == "chat", columns=args.columns):
        pass
    if read["dropped_chosen_equals_rejected"]:
        print(f"warning: {','.join(s.name for s in sources)}: dropped {read['dropped_chosen_equals_rejected']} record(s) whose chosen equals "
              "rejected", file=sys.stderr)
    found = read["records_in_by_source"]
    selection = raw_sources.select(sources, found, args.seed)
    kept = [n if keep is None else len(keep) for n, keep in zip(found, selection)]
    described = [{"source": s.name if s.reader == "hub" else os.path.abspath(s.path) + (f":{s.split}" if s.split else ""),
                  "sha256": raw_sources.sha256(s), "records_in": n, "records_drawn": k,
                  **({"weight": s.weight} if s.weight else {"count": s.count} if s.count else {})}
                 for s, n, k in zip(sources, found, kept)]
    return selection, sum(kept), described


def print_summary(split, dst, summary, args, sources):
    length = summary["length"]
    dropped = {k: v for k, v in summary.items() if k.startswith("dropped") and v}
    print(f"{split}: {summary['records_in']} records in, {summary['records_out']} out -> {dst}")
    if len(sources) > 1 or sources[0]["records_drawn"] != sources[0]["records_in"]:
        print("  drawn: " + ", ".join(f"{s['records_drawn']} of {s['records_in']} from {s['source']}" for s in sources)
              + (f" (seed {args.seed})" if any(s["records_drawn"] != s["records_in"] for s in sources) else ""))
    print(f"  dropped: {dropped or 'none'}; truncated: {summary.get('truncated', 0)}")
    if summary.get("conversations"):
        turns = ("only the last assistant turn trained (--mask_history)" if args.mask_history else
                 f"{summary.get('assistant_turns_trained', 0)} assistant turns trained")
        print(f"  {summary['conversations']} conversation(s): {turns}")
        if summary.get("conversations_split"):
            print(f"  {summary['conversations_split']} conversation(s) split into one record per assistant turn "
                  "(<prompt_id>#<turn>): the chat template renders their history differently from the turns "
                  "themselves (e.g. earlier reasoning dropped), so each turn is trained on the history it is "
                  "generated from")
    if summary.get("special_token_text"):
        print(f"  {summary['special_token_text']} record(s) spell a special token in their text: tokenized "
              + ("as text" if args.split_special_tokens else "as the control token (--split_special_tokens false)"))
    if summary.get("responses_tokenized_apart"):
        print(f"  {summary['responses_tokenized_apart']} response(s) tokenized apart from the prompt (their first "
              "tokens merge with the prompt's end in the whole conversation)")
    print(f"  sequence length: mean {length['mean']:.1f}, p50 {length['p50']:.0f}, "
          f"p90 {length['p90']:.0f}, max {length['max']}; {summary['records_per_second']:.0f} records/s")


if __name__ == "__main__":
    run_cli(main)
