"""What one micro-batch contributes to the loss and to the logged metrics, for SFT and for DPO.

``micro_batch`` returns the micro-batch's *summed* loss (Σ token NLL for SFT, Σ pair losses for DPO) and
detached metric sums (tensors are left on the device, so a step costs no host synchronisation until it is
logged). The trainer divides the summed loss by the step's global normalizer (trained tokens
for SFT, pairs for DPO, over all micro-batches and ranks), which makes the step's gradient exactly that of
one big batch. ``finalize`` turns metric sums (all-reduced over ranks) into means.
"""
import math

import torch

from utils.losses import (needs_reference, pair_seed, preference_loss, preference_metrics, sampo_masks,
                          sequence_logps, sft_loss_sum)
from utils.packing import pack_sequences, sample_sequences


def _forward(model, batch, device):
    batch = batch.to(device)
    token_logps, correct = model(batch.input_ids, batch.position_ids, batch.target_positions, batch.target_ids)
    return batch, token_logps, correct


class Objective:
    SUM_KEYS = ()  # the metric sums micro_batch returns; every rank all-reduces the same keys

    def zero_sums(self):
        return dict.fromkeys(self.SUM_KEYS, 0.0)


class SFTObjective(Objective):
    training_type = "sft"
    SUM_KEYS = ("nll", "tokens", "correct_tokens", "exact_matches", "sequences", "processed_tokens")

    def micro_batch(self, model, records, indices, device, epoch=0):
        batch, token_logps, correct = _forward(model, pack_sequences(sample_sequences(records, indices, "sft")), device)
        wrong_per_sequence = sequence_logps((~correct).float(), batch.response_lengths)
        sums = {"nll": -token_logps.detach().sum(), "tokens": float(token_logps.numel()),
                "correct_tokens": correct.sum(), "exact_matches": (wrong_per_sequence == 0).sum(),
                "sequences": float(len(indices)), "processed_tokens": float(batch.num_tokens)}
        return sft_loss_sum(token_logps), sums

    @staticmethod
    def finalize(sums):
        loss = sums["nll"] / max(sums["tokens"], 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                "token_accuracy": sums["correct_tokens"] / max(sums["tokens"], 1.0),
                "exact_match": sums["exact_matches"] / max(sums["sequences"], 1.0)}


class DPOObjective(Objective):
    """DPO-family losses against cached reference log-probs (none for reference-free types: SimPO)."""
    training_type = "dpo"
    SUM_KEYS = ("loss", "pairs", "processed_tokens", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected")

    def __init__(self, loss_type, beta, label_smoothing, simpo_gamma, seed):
        self.loss_kwargs = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
        self.seed, self.uses_reference = seed, needs_reference(loss_type)

    def micro_batch(self, model, records, indices, device, epoch=0):
        batch, token_logps, _ = _forward(model, pack_sequences(sample_sequences(records, indices, "dpo")), device)
        n = len(indices)
        lengths = batch.response_lengths
        chosen_lengths, rejected_lengths = lengths[:n], lengths[n:]
        n_chosen = int(chosen_lengths.sum())
        policy_tokens = (token_logps[:n_chosen], token_logps[n_chosen:])
        ref_tokens = None
        if self.uses_reference:  # cached by get_logits.py, attached to the records (utils.reference_cache)
            ref_tokens = [torch.cat([records[i][key] for i in indices]).to(device) for key in
                          ("ref_chosen_logps", "ref_rejected_logps")]
        masks = (None, None)
        if self.loss_kwargs["loss_type"] == "sampo":
            seeds = [pair_seed(self.seed, records[i]["prompt_id"], epoch) for i in indices]
            masks = sampo_masks(chosen_lengths, rejected_lengths, seeds)
        policy = [sequence_logps(t, l, m) for t, l, m in zip(policy_tokens, (chosen_lengths, rejected_lengths), masks)]
        ref = [None, None] if ref_tokens is None else \
            [sequence_logps(t, l, m) for t, l, m in zip(ref_tokens, (chosen_lengths, rejected_lengths), masks)]
        out = preference_loss(policy[0], policy[1], ref[0], ref[1], chosen_lengths, rejected_lengths, **self.loss_kwargs)
        sums = {name: value.sum() for name, value in preference_metrics(out, *policy).items()}
        sums.update(loss=out.losses.detach().sum(), pairs=float(n), processed_tokens=float(batch.num_tokens))
        return out.losses.sum(), sums

    @staticmethod
    def finalize(sums):
        pairs = max(sums["pairs"], 1.0)
        return {k: v / pairs for k, v in sums.items() if k not in ("pairs", "processed_tokens")}
