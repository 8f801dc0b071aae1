"""What one micro-batch contributes to the loss and to the logged metrics: one objective per training kind.

A micro-batch goes ``collate`` (host: the packed row of ``utils.schema.SampleLayout.pack`` and everything the loss
needs, e.g. the split's reference log-probs) -> ``PackedBatch.to(device)`` -> the model's forward (per-token
log-probs of the targets, ``utils.modeling.ResponseLogProbs``) -> ``loss``. ``loss`` returns the micro-batch's
*summed* loss (Σ token NLL for SFT, Σ pair losses for DPO) and detached metric sums (tensors left on the device, so
a step costs no host synchronisation until it is logged). The trainer divides the summed loss by the step's global
normalizer (trained tokens for SFT, pairs for DPO, over all micro-batches and ranks), which makes the step's
gradient exactly that of one big batch. ``finalize`` turns metric sums (all-reduced over ranks) into means.

A new kind is a row of ``utils.schema.KINDS`` and an Objective here, registered in ``OBJECTIVES`` under its name.
"""
import math
from dataclasses import replace

import torch

from utils.loss_config import needs_reference
from utils.losses import pair_seed, preference_loss, preference_metrics, sampo_masks, sequence_logps, sft_loss_sum


class Objective:
    """The loss of one kind's samples, laid out by ``layout`` (a ``utils.schema.SampleLayout``)."""
    SUM_KEYS = ()  # the metric sums ``loss`` returns; every rank all-reduces the same keys
    uses_reference = False  # whether collate needs the splits' reference log-probs

    def __init__(self, layout):
        self.layout = layout

    def zero_sums(self):
        return dict.fromkeys(self.SUM_KEYS, 0.0)

    def costs(self, split):
        """Tokens each sample of ``split`` puts into a micro-batch as ``collate`` packs it (int64)."""
        return self.layout.costs(split.cache)

    def collate(self, split, indices, epoch=0):
        """The packed row of the samples ``indices`` of ``split`` (a ``utils.token_data.Split``), host tensors."""
        return self.layout.pack(split.cache, indices)

    def describe(self):
        """The objective's settings, for the run's first lines ("" when it has none)."""
        return ""


class SFTObjective(Objective):
    """Token-mean NLL of the responses."""
    SUM_KEYS = ("nll", "tokens", "correct_tokens", "exact_matches", "sequences", "processed_tokens")

    @classmethod
    def from_args(cls, layout, args):
        return cls(layout)

    def loss(self, batch, token_logps, correct):
        """(Σ token NLL, metric sums) of a micro-batch from the model's forward: ``token_logps`` (K,) float32 and
        ``correct`` (K,) bool, whether each target is the argmax prediction."""
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
    """DPO-family losses against the splits' reference log-probs (none for reference-free types: SimPO).

    A micro-batch's row holds each pair as ``[prompt][chosen][rejected]`` with a shared prompt
    (``utils.packing.pack_shared_prompts``), else the chosen sequences of its pairs, then their rejected ones;
    either way the targets come chosen first, so per-sequence sums split into the chosen half and the rejected
    half, and the log-probs are the same."""
    SUM_KEYS = ("loss", "pairs", "processed_tokens", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected")

    def __init__(self, layout, loss_type, beta, label_smoothing, simpo_gamma, seed):
        super().__init__(layout)
        self.loss_kwargs = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
        self.seed, self.uses_reference = seed, needs_reference(loss_type)

    @classmethod
    def from_args(cls, layout, args):
        return cls(layout, args.loss_type, args.beta, args.label_smoothing, args.simpo_gamma, args.seed)

    def describe(self):
        return f"loss_type {self.loss_kwargs['loss_type']}, beta {self.loss_kwargs['beta']}"

    def collate(self, split, indices, epoch=0):
        """The packed row of the pairs ``indices`` of ``split``, their reference log-probs (``split.reference``,
        when the loss needs them) and SamPO masks."""
        batch = super().collate(split, indices, epoch)
        extra = {}
        if self.uses_reference:  # cached by get_logits.py, aligned with the targets: chosen, then rejected
            extra["ref_logps"] = torch.from_numpy(split.reference.targets(indices))
        if self.loss_kwargs["loss_type"] == "sampo":  # one seeded draw per pair, shared by policy and reference
            n = len(indices)
            seeds = [pair_seed(self.seed, split.cache.prompt_id[i], epoch) for i in indices]
            extra["target_mask"] = torch.cat(sampo_masks(batch.response_lengths[:n], batch.response_lengths[n:], seeds))
        return replace(batch, **extra)

    def loss(self, batch, token_logps, correct=None):
        """(Σ pair losses, metric sums) of a micro-batch from the model's per-token log-probs ``token_logps``
        (K,) float32 (``correct`` is not used)."""
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


OBJECTIVES = {"sft": SFTObjective, "dpo": DPOObjective}  # a kind's name (utils.schema.KINDS) -> its objective


def build_objective(layout, args):
    """The objective of ``layout``'s kind, with its settings from the parsed ``args`` (TrainArguments)."""
    return OBJECTIVES[layout.kind.name].from_args(layout, args)
