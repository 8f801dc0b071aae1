"""What one micro-batch contributes to the loss and to the logged metrics, for SFT and for DPO.

A micro-batch goes ``collate`` (host: the packed row and everything the loss needs, e.g. the cached reference
log-probs) -> ``PackedBatch.to(device)`` -> ``loss`` (forward and loss on the device). ``loss`` returns the
micro-batch's *summed* loss (Σ token NLL for SFT, Σ pair losses for DPO) and detached metric sums (tensors
left on the device, so a step costs no host synchronisation until it is logged). The trainer divides the
summed loss by the step's global normalizer (trained tokens for SFT, pairs for DPO, over all micro-batches
and ranks), which makes the step's gradient exactly that of one big batch. ``finalize`` turns metric sums
(all-reduced over ranks) into means.
"""
import math
from dataclasses import replace

import numpy as np
import torch

from utils.loss_config import needs_reference
from utils.losses import pair_seed, preference_loss, preference_metrics, sampo_masks, sequence_logps, sft_loss_sum
from utils.packing import pack_sequences, pack_shared_prompts
from utils.reference_cache import REFERENCE_FIELDS


class Objective:
    SUM_KEYS = ()  # the metric sums ``loss`` returns; every rank all-reduces the same keys
    share_prompt = False  # whether a sample's responses follow one prompt in its row sequence (DPO: optional)

    def zero_sums(self):
        return dict.fromkeys(self.SUM_KEYS, 0.0)

    def costs(self, data):
        """Tokens each sample of ``data`` (a TokenCache) puts into a micro-batch as ``collate`` packs it (int64)."""
        return data.costs()

    def micro_batch(self, model, data, indices, device, epoch=0):
        """collate -> device -> loss in one call (evaluation, tests)."""
        return self.loss(model, self.collate(data, indices, epoch).to(device))


class SFTObjective(Objective):
    training_type = "sft"
    SUM_KEYS = ("nll", "tokens", "correct_tokens", "exact_matches", "sequences", "processed_tokens")

    def collate(self, data, indices, epoch=0):
        """The packed row of the samples ``indices`` of ``data`` (a TokenCache)."""
        return pack_sequences(data.sequences(indices))

    def loss(self, model, batch):
        token_logps, correct = model(batch)
        wrong_per_sequence = sequence_logps((~correct).float(), batch.response_lengths)
        sums = {"nll": -token_logps.detach().sum(), "tokens": float(token_logps.numel()),
                "correct_tokens": correct.sum(), "exact_matches": (wrong_per_sequence == 0).sum(),
                "sequences": float(batch.num_samples), "processed_tokens": float(batch.num_tokens)}
        return sft_loss_sum(token_logps), sums

    @staticmethod
    def finalize(sums):
        loss = sums["nll"] / max(sums["tokens"], 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "token_accuracy": sums["correct_tokens"] / max(sums["tokens"], 1.0),
                "exact_match": sums["exact_matches"] / max(sums["sequences"], 1.0)}


class DPOObjective(Objective):
    """DPO-family losses against cached reference log-probs (none for reference-free types: SimPO).

    A micro-batch's row holds each pair as ``[prompt][chosen][rejected]`` with ``share_prompt``
    (``utils.packing.pack_shared_prompts``), else the chosen sequences of its pairs, then their rejected ones;
    either way the targets come chosen first, so per-sequence sums split into the chosen half and the rejected
    half, and the log-probs are the same."""
    training_type = "dpo"
    SUM_KEYS = ("loss", "pairs", "processed_tokens", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected")

    def __init__(self, loss_type, beta, label_smoothing, simpo_gamma, seed, share_prompt):
        self.loss_kwargs = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
        self.seed, self.uses_reference, self.share_prompt = seed, needs_reference(loss_type), share_prompt

    def costs(self, data):
        return data.costs(self.share_prompt)

    def collate(self, data, indices, epoch=0):
        """The packed row of the pairs ``indices`` of ``data`` (a TokenCache; with reference log-probs attached
        by utils.reference_cache when the loss needs them), their reference log-probs and SamPO masks."""
        batch = pack_pairs(data, indices, self.share_prompt)
        extra = {}
        if self.uses_reference:  # cached by get_logits.py, aligned with the targets: chosen, then rejected
            extra["ref_logps"] = torch.from_numpy(np.concatenate(
                [data.gather(field, indices) for field in REFERENCE_FIELDS]))
        if self.loss_kwargs["loss_type"] == "sampo":  # one seeded draw per pair, shared by policy and reference
            n = len(indices)
            seeds = [pair_seed(self.seed, data.prompt_id[i], epoch) for i in indices]
            extra["target_mask"] = torch.cat(sampo_masks(batch.response_lengths[:n], batch.response_lengths[n:], seeds))
        return replace(batch, **extra)

    def loss(self, model, batch):
        token_logps, _ = model(batch)
        n, lengths = batch.num_samples, batch.response_lengths
        policy = sequence_logps(token_logps, lengths, batch.target_mask)
        ref = None if batch.ref_logps is None else sequence_logps(batch.ref_logps, lengths, batch.target_mask)
        out = preference_loss(policy[:n], policy[n:], None if ref is None else ref[:n],
                              None if ref is None else ref[n:], lengths[:n], lengths[n:], **self.loss_kwargs)
        sums = {name: value.sum() for name, value in preference_metrics(out, policy[:n], policy[n:]).items()}
        sums.update(loss=out.losses.detach().sum(), pairs=float(n), processed_tokens=float(batch.num_tokens))
        return out.losses.sum(), sums

    @staticmethod
    def finalize(sums):
        pairs = max(sums["pairs"], 1.0)
        return {k: v / pairs for k, v in sums.items() if k not in ("pairs", "processed_tokens")}


def pack_pairs(data, indices, share_prompt):
    """The packed row of the pairs ``indices`` of ``data`` (a DPO TokenCache): each prompt once with
    ``share_prompt``, else once per response. The targets and log-probs are the same either way."""
    if share_prompt:
        return pack_shared_prompts(data.shared_prompt_samples(indices))
    return pack_sequences(data.sequences(indices), num_samples=len(indices))
