"""Compute the reference model's per-token log-probs of every DPO pair, once, for train.py to read.

    bash get_logits.sh runs/get_ref.sh       # DeepSpeed launcher, settings from a run script
    python get_logits.py --model_name_or_path demo/model --train_data_path cache/dpo_train.arrow \
        --dev_data_path cache/dpo_dev.arrow --output_dir cache/ref_logps

The model runs in eval mode (no dropout) under torch.no_grad, on the same padding-free token-budget
batches as training, on one or many processes. Rank 0 gathers the results and writes one file per split
(``train.pt``, ``dev.pt``, ``test/<file>.pt``) atomically, with its provenance (utils/reference_cache.py).
"""
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from utils.arguments import split_run_script
from utils.errors import UsageError, run_cli
from utils.schema import KINDS

REFERENCE_KINDS = [name for name, kind in KINDS.items() if kind.paired]  # the kinds a reference model scores

# torch and the modules built on it are imported where they are used, after the arguments are parsed, so that
# --help and argument errors answer at once.


@dataclass
class ReferenceArguments:
    model_name_or_path: str = field(default="demo/model", metadata={
        "help": "the reference model: a save_pretrained folder, a .gguf file or a LoRA adapter folder"})
    output_dir: str = field(default="demo/cache/ref_logps", metadata={"help": "pass it to train.py as --ref_logps_dir"})
    training_type: str = field(default="dpo", metadata={
        "choices": REFERENCE_KINDS, "help": "the kind of the caches' samples (those whose losses use a reference)"})
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


def reference_logps(model, objective, split, max_tokens, rank, world, device, bf16=False):
    """{index: (chosen per-token log-probs, rejected ones)} for this rank's share of the pairs of ``split`` (a
    ``utils.token_data.Split``), through the trainer's path: ``objective.collate`` -> device -> the model's forward,
    without gradients; ``bf16``: under bfloat16 autocast over fp32 weights, as train.py --bf16 computes the policy."""
    import torch

    from utils.batching import eval_batches
    from utils.run_log import progress_bar

    out = {}
    batches = eval_batches(objective.costs(split), max_tokens, world, rank)
    with progress_bar(len(batches), f"reference log-probs: {split.name or split.role}", "batch", rank == 0) as bar:
        for indices in batches:
            batch = objective.collate(split, indices).to(device)
            with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                token_logps, _ = model(batch)
            per_sequence = torch.split(token_logps.float().cpu(), batch.response_lengths.tolist())
            for k, i in enumerate(indices):
                out[i] = (per_sequence[k], per_sequence[len(indices) + k])
            bar.update(1)
    return out


def main(argv):
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    from utils.attention import shares_prompts
    from utils.distributed import barrier, init_distributed
    from utils.hf_loading import load_tokenizer, pretrained_location
    from utils.modeling import ResponseLogProbs, bf16_note, check_embedding_rows, load_causal_lm
    from utils.objectives import Objective
    from utils.provenance import model_fingerprint
    from utils.reference_cache import reference_path, reference_provenance, write_reference
    from utils.run_log import quiet_when_logged
    from utils.schema import sample_layout
    from utils.token_cache import read_meta
    from utils.token_data import check_budget, load_splits

    quiet_when_logged()
    rank, world, device = init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)

    layout, note = sample_layout(args.training_type, args.share_prompt,
                                 shares_prompts(args.attn_implementation, device, args.bf16), args.attn_implementation)
    tokenizer = load_tokenizer(args.model_name_or_path)
    splits = load_splits(layout.kind, tokenizer, args.model_name_or_path, args.train_data_path, args.dev_data_path,
                         args.test_dataset_dir, args.test_files, say)
    if note:
        say(note)
    for split in splits:
        check_budget(split, layout, args.per_device_eval_batch_max_tokens, default="")

    if note := bf16_note(device, args.bf16):
        say(note)
    model = load_causal_lm(args.model_name_or_path, args.attn_implementation, torch.float32, device, training=False,
                           bf16=args.bf16).eval()
    check_embedding_rows([(split.label, split.cache) for split in splits], model.get_input_embeddings().num_embeddings,
                         len(tokenizer), "compute the reference with a model that has rows for them (train.py saves one "
                         "with --resize_token_embeddings)")
    model = ResponseLogProbs(model, bf16=args.bf16)
    say("load-time checks: " + "; ".join(model.load_checks))
    fingerprint = model_fingerprint(pretrained_location(args.model_name_or_path)[0]) if rank == 0 else None
    max_length = (read_meta(args.train_data_path) or {}).get("max_length") if args.train_data_path else None

    objective = Objective(layout)  # the trainer's collate, without a loss
    for split in splits:
        part = reference_logps(model, objective, split, args.per_device_eval_batch_max_tokens, rank, world, device,
                               args.bf16)
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(part, gathered, dst=0)
        if rank == 0:
            merged = {i: v for p in gathered for i, v in p.items()}
            assert sorted(merged) == list(range(len(split.cache))), "every pair is computed exactly once"
            provenance = reference_provenance(args.model_name_or_path, fingerprint, split, tokenizer, args.bf16,
                                              args.save_dtype, max_length=max_length, share_prompt=layout.share_prompt)
            target = reference_path(args.output_dir, split)
            write_reference(target, split.cache.prompt_id, [[merged[i][k] for i in range(len(split.cache))]
                                                             for k in (0, 1)], provenance, getattr(torch, args.save_dtype))
            print(f"{split.name or split.role}: {len(split.cache)} pairs -> {target}")
        barrier()
    return 0


def parse_args(argv):
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
    return args


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
