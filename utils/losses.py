"""SFT and DPO-family preference losses as pure functions of log-prob tensors.

Layout: the trainer computes per-token log-probs of RESPONSE tokens only and keeps them flat (1-D) with a
segment layout: ``lengths[i]`` consecutive entries belong to sequence ``i``. For P preference pairs there are
two flat tensors (chosen, rejected) with ``chosen_lengths`` / ``rejected_lengths``; ``sequence_logps`` turns
them into per-pair sums, which is what :func:`preference_loss` takes. Losses are returned unreduced (one value
per pair) so the trainer can sum them and divide by the GLOBAL pair count of the optimizer step.

Option names follow TRL's ``DPOConfig`` (``beta``, ``loss_type``, ``label_smoothing``, ``simpo_gamma``); the
settings are checked by ``utils.loss_config`` (torch-free): a loss that silently differs from the configured one
is worse than a stopped run, and a warning would repeat every step.
"""
import hashlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from utils.loss_config import check_loss_settings


class PreferenceOutput(NamedTuple):
    losses: torch.Tensor            # (P,) per-pair loss, differentiable, unreduced
    chosen_rewards: torch.Tensor    # (P,) detached implicit reward of the chosen response
    rejected_rewards: torch.Tensor  # (P,) detached implicit reward of the rejected response
    logits: torch.Tensor            # (P,) detached h: the chosen-minus-rejected quantity inside the loss


def sequence_logps(token_logps, lengths, mask=None):
    """Per-sequence sums of a flat per-token tensor: ``out[i] = sum_{t in segment i} token_logps[t]``.

    ``lengths`` is a 1-D long tensor with ``lengths.sum() == token_logps.numel()`` (checked for CPU lengths;
    on an accelerator the check would wait for the device); empty segments give 0.
    ``mask`` (bool, same shape as ``token_logps``) keeps only the selected tokens (SamPO). Differentiable.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=token_logps.device)
    if token_logps.dim() != 1 or (lengths.device.type == "cpu" and int(lengths.sum()) != token_logps.numel()):
        raise ValueError(f"lengths sum to {int(lengths.sum())} but token_logps has shape {tuple(token_logps.shape)}")
    if mask is not None:
        token_logps = token_logps.masked_fill(~mask.to(token_logps.device, torch.bool), 0.0)
    # output_size: no host read of the lengths (a device synchronisation on CUDA)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths,
                                      output_size=token_logps.numel())
    return token_logps.new_zeros(len(lengths)).index_add(0, segment, token_logps)


def sft_loss_sum(token_logps):
    """Summed negative log-likelihood ``sum_t -log p(y_t | y_<t, x)`` over the given response tokens.

    The exact SFT objective is ``sum NLL / N_tokens`` where ``N_tokens`` counts ALL trained tokens of the whole
    optimizer step (every micro-batch, every rank). The trainer divides by that global count itself; averaging
    per micro-batch would over-weight tokens of short micro-batches.
    """
    return -token_logps.sum()


def pair_seed(run_seed, prompt_id, epoch=0):
    """A stable 63-bit seed for one pair from the run seed and its prompt id (``hash()`` is salted per process).

    Pass the epoch to draw a fresh SamPO subset every epoch (as the paper does per forward pass); a fixed epoch
    keeps the subset of each pair fixed for the whole run.
    """
    digest = hashlib.blake2b(f"{run_seed}\x00{epoch}\x00{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sampo_masks(chosen_lengths, rejected_lengths, seeds):
    """SamPO token down-sampling (Lu et al. 2024): boolean masks over the flat chosen / rejected layouts.

    For pair i with lengths (Lc, Lr), all tokens of the shorter response are kept and ``min(Lc, Lr)`` positions
    of the longer one are drawn uniformly without replacement by a ``torch.Generator`` seeded with ``seeds[i]``
    (see :func:`pair_seed`), so the draw is independent of batch composition, device and rank. Both sides then
    sum the same number of tokens, which removes the length bias of summed DPO rewards.

    Apply the SAME masks to the policy and to the reference per-token log-probs
    (``sequence_logps(tok, lengths, mask)``), then call ``preference_loss(..., loss_type="sampo")``. This is why
    SamPO needs PER-TOKEN reference log-probs rather than cached per-sequence sums: the implicit reward
    ``log pi(y|x) - log ref(y|x)`` is only a log-ratio if both sums cover the same tokens. Summing the reference
    over all (or a differently drawn subset of) tokens adds the log-probs of tokens the policy term does not
    contain, a length-dependent offset that is exactly the bias SamPO is meant to remove (the reference
    implementation draws the two subsets independently).
    Returns ``(chosen_mask, rejected_mask)``, bool tensors on the device of ``chosen_lengths``.
    """
    device = chosen_lengths.device if torch.is_tensor(chosen_lengths) else None
    lc, lr = torch.as_tensor(chosen_lengths).tolist(), torch.as_tensor(rejected_lengths).tolist()
    seeds = torch.as_tensor(seeds).tolist()
    if not len(lc) == len(lr) == len(seeds):
        raise ValueError(f"{len(lc)} chosen, {len(lr)} rejected lengths and {len(seeds)} seeds")
    chosen, rejected = [], []
    for n_c, n_r, seed in zip(lc, lr, seeds):
        keep_c, keep_r = torch.ones(n_c, dtype=torch.bool), torch.ones(n_r, dtype=torch.bool)
        if n_c != n_r:
            longer = keep_c if n_c > n_r else keep_r
            generator = torch.Generator().manual_seed(int(seed))
            longer[torch.randperm(len(longer), generator=generator)[min(n_c, n_r):]] = False
        chosen.append(keep_c)
        rejected.append(keep_r)
    empty = torch.zeros(0, dtype=torch.bool)
    return torch.cat(chosen or [empty]).to(device), torch.cat(rejected or [empty]).to(device)


def _sigmoid_loss(x, label_smoothing):
    """``-logsigmoid(x)(1-eps) - logsigmoid(-x) eps``: DPO / cDPO on the scaled logit x."""
    return -F.logsigmoid(x) * (1 - label_smoothing) - F.logsigmoid(-x) * label_smoothing


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_lengths=None,
                    rejected_lengths=None, *, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.0):
    """Per-pair preference loss from per-pair SUMMED log-probs (each a (P,) tensor).

    Notation: pc, pr = policy log-probs of chosen / rejected; rc, rr = reference ones; Lc, Lr = response
    lengths in tokens; b = beta; e = label_smoothing; g = simpo_gamma; sig = sigmoid.

    * ``sigmoid`` (DPO, Rafailov et al. 2023; cDPO, Mitchell 2023, with e > 0):
      h = (pc - rc) - (pr - rr);  loss = -log sig(b h)(1 - e) - log sig(-b h) e   (= ln 2 when policy == ref).
    * ``ipo`` (Azar et al. 2023): loss = (h - 1/(2b))^2 with h computed on log-probs AVERAGED per token
      (each sum divided by its length, as TRL does): h = (pc - rc)/Lc - (pr - rr)/Lr. No label smoothing.
    * ``ln_dpo`` (length-normalised DPO, legacy ``norm_by_len``): the sigmoid loss with
      h = (pc - rc)/Lc - (pr - rr)/Lr.
    * ``simpo`` (Meng et al. 2024, reference-free; ref_* may be None): h = pc/Lc - pr/Lr;
      loss = -log sig(b h - g)(1 - e) - log sig(-(b h - g)) e   (label smoothing as in TRL).
    * ``sampo`` (Lu et al. 2024): the sigmoid loss on sums over the tokens kept by :func:`sampo_masks`
      (the caller passes those masked sums for policy AND reference).

    Rewards (detached, what TRL logs) are b times the per-response quantity entering h: b (p - r) for
    sigmoid / sampo, b (p - r)/L for ipo / ln_dpo, b p/L for simpo. ``logits`` is h (before b and g).
    label_smoothing must be in [0, 0.5]; it or simpo_gamma set for a type that ignores it raises LossConfigError.
    """
    loss_type = check_loss_settings(loss_type, beta, label_smoothing, simpo_gamma)

    if loss_type == "simpo":
        chosen, rejected = policy_chosen, policy_rejected
    else:
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f"loss_type={loss_type!r} needs reference log-probs")
        chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type in ("ipo", "ln_dpo", "simpo"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths")
        lc = torch.as_tensor(chosen_lengths, device=chosen.device).to(chosen.dtype)
        lr = torch.as_tensor(rejected_lengths, device=chosen.device).to(chosen.dtype)
        if lc.device.type == "cpu" and bool((lc <= 0).any() or (lr <= 0).any()):  # (a host read: CPU only)
            raise ValueError("response lengths must be >= 1 for length-normalised losses")
        chosen, rejected = chosen / lc, rejected / lr

    h = chosen - rejected
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "simpo":
        losses = _sigmoid_loss(beta * h - simpo_gamma, label_smoothing)
    else:  # sigmoid, ln_dpo, sampo
        losses = _sigmoid_loss(beta * h, label_smoothing)
    return PreferenceOutput(losses, beta * chosen.detach(), beta * rejected.detach(), h.detach())


def preference_metrics(output, policy_chosen, policy_rejected):
    """Per-pair metrics under TRL's names, to be summed by the caller and divided by the global pair count.

    ``rewards/accuracies`` is 1 where the chosen reward is strictly larger. ``logps/*`` are the policy
    log-probs as passed to :func:`preference_loss` (per-pair sums, or masked sums for SamPO).
    """
    return {
        "rewards/chosen": output.chosen_rewards,
        "rewards/rejected": output.rejected_rewards,
        "rewards/accuracies": (output.chosen_rewards > output.rejected_rewards).to(output.chosen_rewards.dtype),
        "rewards/margins": output.chosen_rewards - output.rejected_rewards,
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }
