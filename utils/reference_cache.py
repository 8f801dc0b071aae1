"""The reference model's per-token log-probs, computed once by get_logits.py and read by train.py.

One file per split in a folder: ``train.pt``, ``dev.pt``, ``test/<test file name>.pt``. Each is a
``torch.save``d dict::

    {"format": "llmtrainer-ref-logps-v2",
     "provenance": {"reference_model", "reference_fingerprint", "data_fingerprint", "tokenizer",
                    "tokenizer_fingerprint", ...},
     "prompt_ids": [...],                        # one per pair, in the data's order
     "chosen_offsets": LongTensor (P+1,), "chosen_logps": Tensor (sum of chosen lengths,),
     "rejected_offsets": LongTensor (P+1,), "rejected_logps": Tensor (...)}

Per-token (not per-sequence) log-probs, so losses that select tokens (SamPO) apply the same selection to
policy and reference. ``data_fingerprint`` (``TokenCache.fingerprint``) hashes the token ids the log-probs belong
to: train.py refuses a cache made for other data (a re-tokenized cache, another max_length, a stale file).
"""
import io
import os
from dataclasses import dataclass

import numpy as np
import torch

from utils.errors import UsageError
from utils.provenance import tokenizer_fingerprint
from utils.record_io import atomic_write_bytes

FORMAT = "llmtrainer-ref-logps-v2"


def reference_path(cache_dir, split):
    """The file of ``split`` (a ``utils.token_data.Split``) in a reference folder."""
    if split.role == "test":
        return os.path.join(cache_dir, "test", split.name + ".pt")
    return os.path.join(cache_dir, split.role + ".pt")


def reference_provenance(model_path, fingerprint, split, tokenizer, bf16, save_dtype, **settings):
    """What a reference file records of how it was made (``train.py`` checks the data and tokenizer fingerprints);
    ``settings``: get_logits.py's own (max_length of the cache, the layout's prompt sharing)."""
    return {"reference_model": os.path.abspath(model_path), "reference_fingerprint": fingerprint,
            "data_path": os.path.abspath(split.path), "data_fingerprint": split.cache.fingerprint(),
            "tokenizer": type(tokenizer).__name__, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "compute_dtype": "bfloat16 autocast" if bf16 else "float32", "save_dtype": save_dtype,
            **settings}


def write_reference(path, prompt_ids, per_response, provenance, dtype=torch.float32):
    """Write a reference file atomically. ``per_response``: for each response field (chosen, rejected), a list of
    per-token log-prob tensors, one per pair, in the order of ``prompt_ids``."""
    def flat(parts):
        offsets = torch.zeros(len(parts) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.tensor([len(p) for p in parts], dtype=torch.long), 0)
        values = torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)
        return offsets, values
    (co, cv), (ro, rv) = (flat(parts) for parts in per_response)
    saved = {"format": FORMAT, "provenance": provenance, "prompt_ids": list(prompt_ids),
             "chosen_offsets": co, "chosen_logps": cv, "rejected_offsets": ro, "rejected_logps": rv}
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass
class ReferenceLogProbs:
    """The reference model's per-token log-probs of one split's samples, read from ``path``: ``columns`` holds one
    (values float32, offsets int64) per response field, aligned with the split's samples."""
    path: str
    provenance: dict
    columns: tuple

    def targets(self, indices):
        """(K,) float32 numpy: the log-probs of the samples ``indices`` in the order of a packed row's targets
        (response field by response field: every chosen response, then every rejected one)."""
        return np.concatenate([values[offsets[i]:offsets[i + 1]] for values, offsets in self.columns for i in indices])


def read_reference(cache_dir, split, tokenizer):
    """The ReferenceLogProbs of ``split`` (a ``utils.token_data.Split`` of a paired kind) in ``cache_dir``, checked
    to belong to its samples (the data fingerprint) and to have been computed by a model with ``tokenizer``; the
    pairs in the split's order whatever the file's. UsageError naming the file and what to do otherwise."""
    label = split.name if split.role == "test" else split.path
    path = reference_path(cache_dir, split)
    if not os.path.isfile(path):
        raise UsageError(f"no reference log-probs for {label}: {path} is missing (run get_logits.sh on this data)")
    cache = torch.load(path, weights_only=True)
    if not isinstance(cache, dict) or not str(cache.get("format", "")).startswith("llmtrainer-ref-logps"):
        raise UsageError(f"{path} is not a reference log-prob cache written by get_logits.py")
    if cache["format"] != FORMAT:
        raise UsageError(f"{path} was written by an older get_logits.py ({cache['format']}): re-run get_logits.sh")
    made_with = cache["provenance"].get("tokenizer_fingerprint")
    if made_with != tokenizer_fingerprint(tokenizer):
        raise UsageError(f"{path} was computed by {cache['provenance']['reference_model']}, whose tokenizer is not the "
                         f"policy's ({tokenizer.name_or_path})")
    data = split.cache
    if cache["provenance"]["data_fingerprint"] != data.fingerprint():
        cached, ours = set(cache["prompt_ids"]), set(data.prompt_id)
        detail = (f"{len(ours - cached)} prompt_id(s) missing from the cache, {len(cached - ours)} unknown to the data"
                  if cached != ours else "same prompt_ids but other token ids (re-tokenized, another max_length?)")
        raise UsageError(f"{path} was computed for other data than {label}: {detail}; re-run get_logits.sh")
    order = None if cache["prompt_ids"] == data.prompt_id else \
        np.array([{k: i for i, k in enumerate(cache["prompt_ids"])}[k] for k in data.prompt_id])
    columns = []
    for key in ("chosen", "rejected"):
        values, offsets = cache[f"{key}_logps"].float().numpy(), cache[f"{key}_offsets"].numpy()
        if order is not None:  # the cache lists the pairs in another order: gather them into the data's
            parts = [values[offsets[i]:offsets[i + 1]] for i in order]
            offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
            values = np.concatenate(parts)
        columns.append((values, offsets))
    return ReferenceLogProbs(path, cache["provenance"], tuple(columns))


def check_references_agree(references, bf16):
    """The reference log-prob files of a run (ReferenceLogProbs, one per split) come from one reference model (UsageError naming
    both files otherwise) and were computed in the policy's precision: returns a warning line when not (a float32
    reference for a --bf16 policy, or the reverse, starts DPO away from ln 2: SmolLM2, 2 processes: step-1 loss
    0.6957, accuracy 0.52), else None."""
    (first_path, first), *others = [(r.path, r.provenance) for r in references]
    for path, provenance in others:
        if provenance.get("reference_fingerprint") != first.get("reference_fingerprint"):
            raise UsageError(f"{path} and {first_path} were computed by different reference models "
                             f"({provenance.get('reference_model')}, {first.get('reference_model')}): re-run "
                             "get_logits.sh for all splits with one model")
    policy = "bfloat16 autocast" if bf16 else "float32"
    computed = {r.provenance.get("compute_dtype") for r in references}
    if computed != {policy}:
        return (f"warning: the reference log-probs in {os.path.dirname(first_path)} were computed in "
                f"{' and '.join(sorted(map(str, computed)))}, the policy computes in {policy}: step 1 starts away from "
                f"the policy = reference point (DPO loss ln 2) by their rounding; run get_logits.sh "
                f"{'with' if bf16 else 'without'} --bf16 for an exact start")
    return None


def read_references(cache_dir, splits, tokenizer, bf16, say=print):
    """Each split's reference log-probs from ``cache_dir`` (:func:`read_reference`, set as ``split.reference``),
    checked to come from one reference model (:func:`check_references_agree`); their origin and any precision
    warning said through ``say``."""
    for split in splits:
        split.reference = read_reference(cache_dir, split, tokenizer)
    if warning := check_references_agree([split.reference for split in splits], bf16):
        say(warning)
    say(f"reference log-probs of {splits[0].reference.provenance['reference_model']} from {cache_dir}")
