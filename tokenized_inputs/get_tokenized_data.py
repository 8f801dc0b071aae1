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
    p.add_argument("--train_dataset_path", help="raw training records: .json, .jsonl or .pt, optionally .gz")
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
    args.kind = KINDS[args.training_type]
    args.settings = TokenizeSettings(args.prompt_type, args.split_special_tokens, args.max_length, args.overlong,
                                     args.mask_history)
    return args, splits


def main(argv=None):
    args, splits = parse_args(argv)
    tokenizer = load_tokenizer(args.model)
    tokenize = Tokenize(tokenizer, args.prompt_type, args.split_special_tokens)  # fails early on an unusable template

    records_in = {}  # every file is read and checked before any tokenizing or writing
    for split, src, dst in splits:
        read = {}
        records_in[split] = sum(1 for _ in validated_records(src, args.kind, read, chat=args.prompt_type == "chat"))
        if read["dropped_chosen_equals_rejected"]:
            print(f"warning: {src}: dropped {read['dropped_chosen_equals_rejected']} record(s) whose chosen equals "
                  "rejected", file=sys.stderr)

    outputs, folders, created = [], [], []
    done = False
    try:  # nothing is written where the outputs go until every split is tokenized
        for split, src, dst in splits:
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
            counts = tokenize_file(src, args.kind, args.settings, tokenize, writer.append, model=args.model,
                                   num_proc=args.num_proc, records_in=records_in[split], desc=f"tokenizing {split}")
            if not writer.prompt_id:
                raise UsageError(f"{src}: no record left ({counts['dropped_chosen_equals_rejected']} dropped as chosen "
                                 f"equals rejected, {records_in[split]} by the --max_length {args.max_length} policy)")
            cache = writer.finish(dst)
            summary = {"records_out": len(cache), **counts, "length": length_summary(cache),
                       "records_per_second": round(records_in[split] / max(time.time() - start, 1e-9), 1)}
            outputs.append((split, src, dst, cache, summary))
        for split, src, dst, cache, summary in outputs:
            write_token_cache(dst, cache, cache_meta(args.kind, args.settings, args.model, tokenizer, src), summary)
            print_summary(split, dst, summary, args)
        done = True
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        for folder in [] if done else created:  # a failed run leaves no folder behind either
            if not any(files for _, _, files in os.walk(folder)):
                shutil.rmtree(folder, ignore_errors=True)


def print_summary(split, dst, summary, args):
    length = summary["length"]
    dropped = {k: v for k, v in summary.items() if k.startswith("dropped") and v}
    print(f"{split}: {summary['records_in']} records in, {summary['records_out']} out -> {dst}")
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
