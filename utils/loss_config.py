"""The DPO-family loss settings, checked without torch (train.py's argument parsing uses them, so ``--help`` and
setting errors answer before torch loads). Option names follow TRL's ``DPOConfig``; :data:`LEGACY_ALIASES` /
:func:`translate_legacy_options` map the old names. Inconsistent settings (e.g. ``label_smoothing`` for IPO, which
TRL silently ignores) raise :class:`LossConfigError`, both a ``ValueError`` and the project's ``UsageError``.
"""
from utils.errors import UsageError

LOSS_TYPES = ("sigmoid", "ipo", "ln_dpo", "simpo", "sampo")
LABEL_SMOOTHING_TYPES = ("sigmoid", "ln_dpo", "simpo", "sampo")  # IPO has no such term
LEGACY_ALIASES = {"po_beta": "beta", "po_gamma": "simpo_gamma"}  # plain renames
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


def translate_legacy_options(options):
    """Return a copy of a config dict with legacy names (po_beta, po_gamma, norm_by_len, use_sampo) replaced."""
    out = {k: v for k, v in options.items() if k not in LEGACY_ALIASES and k not in LEGACY_LOSS_FLAGS}
    for old, new in LEGACY_ALIASES.items():
        if old in options:
            if new in options and options[new] != options[old]:
                raise LossConfigError(f"both {old}={options[old]!r} and {new}={options[new]!r} are set")
            out[new] = options[old]
    if any(flag in options for flag in LEGACY_LOSS_FLAGS):
        out["loss_type"] = resolve_loss_type(options.get("loss_type", "sigmoid"), bool(options.get("norm_by_len")),
                                             bool(options.get("use_sampo")))
    return out


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
