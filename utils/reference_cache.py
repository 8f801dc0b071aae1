"""The reference model's per-token log-probs, computed once by get_logits.py and read by train.py.

One file per split in a folder: ``train.pt``, ``dev.pt``, ``test/<test file name>.pt``. Each is a
``torch.save``d dict::

    {"format": "llmtrainer-ref-logps-v1",
     "provenance": {"reference_model", "reference_fingerprint", "data_fingerprint", "tokenizer",
                    "tokenizer_fingerprint", ...},
     "prompt_ids": [...],                        # one per pair, in the data's order
     "chosen_offsets": LongTensor (P+1,), "chosen_logps": Tensor (sum of chosen lengths,),
     "rejected_offsets": LongTensor (P+1,), "rejected_logps": Tensor (...)}

Per-token (not per-sequence) log-probs, so losses that select tokens (SamPO) apply the same selection to
policy and reference. ``data_fingerprint`` hashes the token ids the log-probs belong to: train.py refuses a
cache made for other data (a re-tokenized cache, another max_length, a stale file).
"""
import hashlib
import json
import os

import torch

from utils.errors import UsageError
from utils.provenance import tokenizer_fingerprint

FORMAT = "llmtrainer-ref-logps-v1"


def records_fingerprint(records):
    """sha256 of the token ids of DPO records (prompt_id, prompt, chosen, rejected), in order."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r["prompt_id"], r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]]).encode())
    return h.hexdigest()


def model_fingerprint(model_dir):
    """sha256 over the model folder's config and weight files (names and contents)."""
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(model_dir)
                   if n == "config.json" or n.endswith((".safetensors", ".bin", ".gguf")))
    for name in names:
        h.update(name.encode())
        with open(os.path.join(model_dir, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def split_path(cache_dir, split, name=None):
    return os.path.join(cache_dir, "test", name + ".pt") if split == "test" else os.path.join(cache_dir, split + ".pt")


def pack_split(prompt_ids, chosen, rejected, provenance, dtype=torch.float32):
    """The saved dict from per-pair lists of per-token log-prob tensors."""
    def flat(parts):
        offsets = torch.zeros(len(parts) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.tensor([len(p) for p in parts], dtype=torch.long), 0)
        values = torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype)
        return offsets, values
    (co, cv), (ro, rv) = flat(chosen), flat(rejected)
    return {"format": FORMAT, "provenance": provenance, "prompt_ids": list(prompt_ids),
            "chosen_offsets": co, "chosen_logps": cv, "rejected_offsets": ro, "rejected_logps": rv}


def attach_reference_logps(cache_dir, label, split, records, tokenizer):
    """Load the cache of one split, check it belongs to ``records`` and was computed by a model with
    ``tokenizer``, and put each pair's per-token log-probs into its record (``ref_chosen_logps``,
    ``ref_rejected_logps``). Returns the provenance."""
    path = split_path(cache_dir, split, label if split == "test" else None)
    if not os.path.isfile(path):
        raise UsageError(f"no reference log-probs for {label}: {path} is missing (run get_logits.sh on this data)")
    cache = torch.load(path, weights_only=True)
    if not isinstance(cache, dict) or cache.get("format") != FORMAT:
        raise UsageError(f"{path} is not a reference log-prob cache written by get_logits.py")
    made_with = cache["provenance"].get("tokenizer_fingerprint")
    if made_with != tokenizer_fingerprint(tokenizer):
        raise UsageError(f"{path} was computed by {cache['provenance']['reference_model']}, whose tokenizer is not the "
                         f"policy's ({tokenizer.name_or_path})" if made_with else
                         f"{path} records no tokenizer (written by an older get_logits.py): re-run get_logits.sh")
    if cache["provenance"]["data_fingerprint"] != records_fingerprint(records):
        cached, data = set(cache["prompt_ids"]), {r["prompt_id"] for r in records}
        detail = (f"{len(data - cached)} prompt_id(s) missing from the cache, {len(cached - data)} unknown to the data"
                  if cached != data else "same prompt_ids but other token ids (re-tokenized, another max_length?)")
        raise UsageError(f"{path} was computed for other data than {label}: {detail}; re-run get_logits.sh")
    position = {prompt_id: i for i, prompt_id in enumerate(cache["prompt_ids"])}
    for r in records:
        i = position[r["prompt_id"]]
        a, b = cache["chosen_offsets"][i:i + 2].tolist()
        c, d = cache["rejected_offsets"][i:i + 2].tolist()
        r["ref_chosen_logps"] = cache["chosen_logps"][a:b].float()
        r["ref_rejected_logps"] = cache["rejected_logps"][c:d].float()
    return cache["provenance"]
