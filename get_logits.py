"""Compute the reference model's per-token log-probs of every DPO pair, once, for train.py to read.

    bash get_logits.sh runs/get_ref.sh       # DeepSpeed launcher, settings from a run script
    python get_logits.py --model_name_or_path demo/model --train_data_path cache/dpo_train.arrow \
        --dev_data_path cache/dpo_dev.arrow --output_dir cache/ref_logps

The model runs in eval mode (no dropout) under torch.no_grad, on the same padding-free token-budget
batches as training, on one or many processes. Rank 0 gathers the results and writes one file per split
(``train.pt``, ``dev.pt``, ``test/<file>.pt``) atomically, with its provenance (utils/reference_cache.py).
"""
import io
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from utils.arguments import split_run_script
from utils.errors import UsageError, run_cli

# torch and the modules built on it are imported where they are used, after the arguments are parsed, so that
# --help and argument errors answer at once.


@dataclass
class ReferenceArguments:
    model_name_or_path: str = field(default="demo/model", metadata={
        "help": "the reference model: a save_pretrained folder, a .gguf file or a LoRA adapter folder"})
    output_dir: str = field(default="demo/cache/ref_logps", metadata={"help": "pass it to train.py as --ref_logps_dir"})
    train_data_path: Optional[str] = field(default=None, metadata={"help": "DPO token-id cache of the training pairs"})
    dev_data_path: Optional[str] = field(default=None, metadata={"help": "DPO token-id cache of the dev pairs"})
    test_dataset_dir: Optional[str] = field(default=None, metadata={"help": "raw test files, as for train.py"})
    test_files: Optional[str] = field(default=None, metadata={"help": "comma-separated names in test_dataset_dir"})
    per_device_eval_batch_max_tokens: int = field(default=8192, metadata={"help": "tokens per device per batch"})
    bf16: bool = field(default=False, metadata={
        "help": "compute in bfloat16 (torch autocast over fp32 weights), as train.py --bf16 does"})
    save_dtype: str = field(default="float32", metadata={
        "choices": ["float32", "bfloat16"], "help": "dtype of the saved log-probs (bfloat16 halves the files)"})
    attn_implementation: str = field(default="auto", metadata={"help": "as for train.py (utils/attention.py)"})
    share_prompt: bool = field(default=True, metadata={
        "help": "compute each pair's prompt once, as train.py --share_prompt (same log-probs, fewer tokens)"})
    local_rank: int = field(default=-1, metadata={"help": "set by the DeepSpeed launcher"})


def reference_logps(model, data, max_tokens, rank, world, device, desc, bf16=False, share_prompt=False):
    """{index: (chosen per-token log-probs, rejected ones)} for this rank's share of the pairs of ``data`` (a DPO
    TokenCache), without gradients; ``bf16``: under bfloat16 autocast over fp32 weights, as train.py --bf16
    computes the policy; ``share_prompt``: each pair in one row sequence with its prompt once."""
    import torch
    from tqdm import tqdm

    from utils.batching import eval_batches
    from utils.objectives import pack_pairs

    out = {}
    batches = eval_batches(data.costs(share_prompt), max_tokens, world, rank)
    for indices in tqdm(batches, desc=desc, disable=rank != 0, unit="batch"):
        batch = pack_pairs(data, indices, share_prompt)
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            token_logps, _ = model(batch.to(device))
        per_sequence = torch.split(token_logps.float().cpu(), batch.response_lengths.tolist())
        for k, i in enumerate(indices):
            out[i] = (per_sequence[k], per_sequence[len(indices) + k])
    return out


def main(argv):
    args, unknown = HfArgumentParser(
        ReferenceArguments, description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog="example: python get_logits.py --model_name_or_path demo/model --train_data_path "
               "cache/dpo_train.arrow --output_dir cache/ref_logps").parse_args_into_dataclasses(
        args=sum(split_run_script(argv), []), return_remaining_strings=True)
    if unknown:
        raise UsageError(f"unknown arguments: {' '.join(unknown)} (see python get_logits.py --help)")
    if not (args.train_data_path or args.dev_data_path or args.test_dataset_dir):
        raise UsageError("nothing to do: give --train_data_path, --dev_data_path and/or --test_dataset_dir")
    if args.test_dataset_dir and not args.train_data_path:
        raise UsageError("--test_dataset_dir needs --train_data_path: its .meta.json says how to tokenize the tests")
    import torch
    import torch.distributed as dist

    from utils.attention import prompt_sharing
    from utils.distributed import barrier, init_distributed
    from utils.hf_loading import load_tokenizer, pretrained_location
    from utils.modeling import ResponseLogProbs, bf16_note, load_causal_lm
    from utils.provenance import tokenizer_fingerprint
    from utils.record_io import atomic_write_bytes
    from utils.reference_cache import model_fingerprint, pack_split, split_path
    from utils.token_data import (check_budget, check_caches_agree, check_embedding_rows, describe_test_changes,
                                  load_test_sets, load_token_cache, read_meta)

    if not sys.stderr.isatty():  # a log file: no progress bars of transformers' (loading) either
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()
    rank, world, device = init_distributed()

    tokenizer = load_tokenizer(args.model_name_or_path)
    train_meta = read_meta(args.train_data_path) if args.train_data_path else None
    splits = []  # (split, label, source, records)
    for split, path in (("train", args.train_data_path), ("dev", args.dev_data_path)):
        if path:
            splits.append((split, split, path, load_token_cache(path, "dpo", tokenizer, args.model_name_or_path)))
    check_caches_agree([(f"{split} set {source}", source) for split, _, source, _ in splits])
    for name, (records, counts) in load_test_sets(args.test_dataset_dir, args.test_files, tokenizer, train_meta,
                                                  "dpo").items():
        splits.append(("test", name, os.path.join(args.test_dataset_dir, name), records))
        if rank == 0 and describe_test_changes(name, counts, train_meta):
            print("warning: " + describe_test_changes(name, counts, train_meta))
    share, note = prompt_sharing(args.share_prompt, args.attn_implementation, device, args.bf16)
    if note and rank == 0:
        print(note)
    for split, label, source, records in splits:
        check_budget(f"{label} ({source})", records, args.per_device_eval_batch_max_tokens, share, default="")

    if rank == 0 and (note := bf16_note(device, args.bf16)):
        print(note)
    model = load_causal_lm(args.model_name_or_path, args.attn_implementation, torch.float32, device, training=False,
                           bf16=args.bf16).eval()
    check_embedding_rows([(f"{label} ({source})", records) for _, label, source, records in splits],
                         model.get_input_embeddings().num_embeddings, len(tokenizer),
                         "compute the reference with a model that has rows for them (train.py saves one with "
                         "--resize_token_embeddings)")
    model = ResponseLogProbs(model, bf16=args.bf16)
    if rank == 0:
        print("load-time checks: " + "; ".join(model.load_checks))
    fingerprint = model_fingerprint(pretrained_location(args.model_name_or_path)[0]) if rank == 0 else None

    for split, label, source, records in splits:
        part = reference_logps(model, records, args.per_device_eval_batch_max_tokens, rank, world, device,
                               f"reference log-probs: {label}", args.bf16, share)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(part, gathered, dst=0)
        if rank == 0:
            merged = {i: v for p in gathered for i, v in p.items()}
            assert sorted(merged) == list(range(len(records))), "every pair is computed exactly once"
            provenance = {"reference_model": os.path.abspath(args.model_name_or_path),
                          "reference_fingerprint": fingerprint, "data_path": os.path.abspath(source),
                          "data_fingerprint": records.fingerprint(), "tokenizer": type(tokenizer).__name__,
                          "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                          "compute_dtype": "bfloat16 autocast" if args.bf16 else "float32", "save_dtype": args.save_dtype,
                          "max_length": (train_meta or {}).get("max_length"), "share_prompt": share}
            saved = pack_split(records.prompt_id, [merged[i][0] for i in range(len(records))],
                               [merged[i][1] for i in range(len(records))], provenance, getattr(torch, args.save_dtype))
            buffer = io.BytesIO()
            torch.save(saved, buffer)
            target = split_path(args.output_dir, split, label if split == "test" else None)
            atomic_write_bytes(target, buffer.getvalue())
            print(f"{label}: {len(records)} pairs -> {target}")
        barrier()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
