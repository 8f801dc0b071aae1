"""The DPO-family loss settings, checked without torch (train.py's argument parsing uses them, so ``--help`` and
setting errors answer before torch loads). Option names follow TRL's ``DPOConfig`` (the old flag spellings are
mapped by ``utils.arguments``). Inconsistent settings (e.g. ``label_smoothing`` for IPO, which
TRL silently ignores) raise :class:`LossConfigError`, both a ``ValueError`` and the project's ``UsageError``.
"""
from utils.errors import UsageError

LOSS_TYPES = ("sigmoid", "ipo", "ln_dpo", "simpo", "sampo")
LABEL_SMOOTHING_TYPES = ("sigmoid", "ln_dpo", "simpo", "sampo")  # IPO has no such term
LEGACY_LOSS_FLAGS = {"norm_by_len": "ln_dpo", "use_sampo": "sampo"}  # boolean flags -> loss_type


class LossConfigError(UsageError, ValueError):
    """An invalid or contradictory loss setting."""


def resolve_loss_type(loss_type="sigmoid", norm_by_len=False, use_sampo=False):
    """Fold the legacy flags into a TRL-style ``loss_type``; a flag with a different non-default type is an error."""
    flagged = [LEGACY_LOSS_FLAGS[name] for name, on in (("norm_by_len", norm_by_len), ("use_sampo", use_sampo)) if on]
    if len(flagged) > 1 or (flagged and loss_type not in ("sigmoid", flagged[0])):
        raise LossConfigError(f"loss_type={loss_type!r} contradicts legacy flags norm_by_len={norm_by_len}, "
                              f"use_sampo={use_sampo}")
    loss_type = flagged[0] if flagged else loss_type
    if loss_type not in LOSS_TYPES:
        raise LossConfigError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    return loss_type


def needs_reference(loss_type):
    """Whether ``loss_type`` uses reference-model log-probs (all but the reference-free SimPO)."""
    return resolve_loss_type(loss_type) != "simpo"


def check_loss_settings(loss_type, beta, label_smoothing=0.0, simpo_gamma=0.0):
    """Raise LossConfigError for an invalid setting or one the loss type would ignore; returns the type."""
    loss_type = resolve_loss_type(loss_type)
    if beta <= 0:
        raise LossConfigError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise LossConfigError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing and loss_type not in LABEL_SMOOTHING_TYPES:
        raise LossConfigError(f"label_smoothing={label_smoothing} has no effect with loss_type={loss_type!r}")
    if simpo_gamma and loss_type != "simpo":
        raise LossConfigError(f"simpo_gamma={simpo_gamma} only applies to loss_type='simpo', not {loss_type!r}")
    return loss_type
