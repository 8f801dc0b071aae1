"""What a sample is: the training kinds (one table row each) and the layout a run packs their samples in.

Every other module asks this one. Entry scripts build one :class:`SampleLayout` from their arguments
(:func:`sample_layout`) and hand it down; nothing below them takes a kind's name.

A kind names the text fields of a raw record and the token-id fields of a cache record, the sequences a sample
puts into a packed row (one per response: prompt + that response), its trained tokens and its loss weight (what
the step's loss is normalised by). The layout adds how a run lays the samples into rows (a paired kind's prompt
once, before all its responses, or once per response) and with it each sample's token cost.

========== ================================== ==================================================================
kind       raw record / cache record          sequences, cost, trained tokens, loss weight
========== ================================== ==================================================================
``sft``    prompt, response (or a             (prompt, response); cost P + R; trained R (R - 1 when P = 0: the
           conversation) /                    first token has nothing to be predicted from) less the tokens in
           prompt_ids, response_ids           ``response_untrained`` (a multi-turn conversation's turns between its
           [, response_untrained]             assistant turns); weight = trained
``dpo``    prompt, chosen, rejected /         (prompt, chosen), (prompt, rejected); cost 2P + C + R, or P + C + R
           prompt_ids, chosen_ids, rejected   with the prompt shared (one row sequence [prompt][chosen][rejected],
                                              ``utils.packing.pack_shared_prompts``); trained C + R (less the same
                                              for P = 0); weight 1 (the loss is a pair mean)
========== ================================== ==================================================================

Lengths are numpy arrays over the samples (``lengths[field][i]``), so every rule is one vectorised expression.
A kind's optional *untrained-span* field (``Kind.untrained``) holds, per sample, flat end-exclusive ranges
``[s0, e0, s1, e1, ...]`` of its response's tokens that are in the row but not trained; its length entry is the
number of tokens those ranges cover. A cache without the column (every single-turn record) trains every response
token.
"""
from dataclasses import dataclass

import numpy as np

from utils.errors import UsageError


@dataclass(frozen=True)
class Kind:
    """One training kind. ``response_fields``: the raw text fields of its responses, in the order their sequences
    are packed; ``weight``: its per-sample loss normaliser, ``"trained_tokens"`` (a token mean) or ``"one"`` (a
    sample mean); ``unit``: what its samples are called (samples, pairs); ``help``: one line for the parsers."""
    name: str
    response_fields: tuple
    weight: str
    unit: str
    help: str
    untrained: tuple = ()  # ((response id field, its untrained-span field), ...)

    @property
    def text_fields(self):
        return ("prompt",) + self.response_fields

    @property
    def response_id_fields(self):
        return tuple(f + "_ids" for f in self.response_fields)

    @property
    def id_fields(self):
        return ("prompt_ids",) + self.response_id_fields

    @property
    def paired(self):
        """Whether a sample compares responses (a preference pair): one whose responses are equal says nothing
        and is dropped, its prompt can be shared, and the preference options apply."""
        return len(self.response_fields) > 1

    def span_field(self, field):
        """The untrained-span field of response id ``field``, or None."""
        return dict(self.untrained).get(field)

    @property
    def span_fields(self):
        return tuple(span for _, span in self.untrained)

    def trained_tokens(self, lengths, field):
        """Trained tokens of each sample's sequence of response ``field`` (int64): every response token is
        predicted from the one before it, the first from the prompt's last; without a prompt the first has nothing
        before it; tokens in the field's untrained spans (``lengths[span field]``, when the cache has them) are
        not trained."""
        trained = lengths[field] - (lengths["prompt_ids"] == 0)
        span = self.span_field(field)
        return trained - lengths[span] if span in lengths else trained

    def loss_weights(self, lengths):
        """The per-sample normaliser of the loss (int64): trained tokens (a token mean) or 1 (a sample mean)."""
        if self.weight == "trained_tokens":
            return sum(self.trained_tokens(lengths, f) for f in self.response_id_fields)
        return np.ones(len(lengths["prompt_ids"]), dtype=np.int64)


KINDS = {kind.name: kind for kind in (
    Kind("sft", ("response",), "trained_tokens", "samples",
         "sft: records prompt, response (or a conversation: every assistant turn trained); the token-mean NLL of "
         "the trained tokens", untrained=(("response_ids", "response_untrained"),)),
    Kind("dpo", ("chosen", "rejected"), "one", "pairs",
         "dpo: records prompt, chosen, rejected; a DPO-family loss (a pair mean)"),
)}
KIND_HELP = "; ".join(kind.help for kind in KINDS.values())


@dataclass(frozen=True)
class SampleLayout:
    """How a run lays the samples of ``kind`` into packed rows: with ``share_prompt`` (paired kinds only) a sample
    is one row sequence ``[prompt][response 1][response 2]``, else one sequence per response. Decides each sample's
    token cost and builds the rows (:meth:`pack`)."""
    kind: Kind
    share_prompt: bool = False

    def costs(self, cache):
        """Tokens each sample of ``cache`` (a TokenCache) puts into a micro-batch as :meth:`pack` lays it (int64):
        its prompt once per response, or once in all with ``share_prompt``."""
        lengths = cache.lengths()
        prompts = 1 if self.share_prompt else len(self.kind.response_fields)
        return prompts * lengths["prompt_ids"] + sum(lengths[f] for f in self.kind.response_id_fields)

    def loss_weights(self, cache):
        """Each sample's loss normaliser (int64, :meth:`Kind.loss_weights`)."""
        return self.kind.loss_weights(cache.lengths())

    def pack(self, cache, indices):
        """The packed row (``utils.packing.PackedBatch``, host tensors) of the samples ``indices`` of ``cache``.
        The targets come response field by response field (DPO: every chosen response, then every rejected one),
        with the same log-probs whether the prompt is shared or not."""
        from utils.packing import pack_sequences, pack_shared_prompts  # torch: only where rows are built

        if self.share_prompt:
            return pack_shared_prompts(cache.shared_prompt_samples(indices))
        return pack_sequences(cache.sequences(indices), num_samples=len(indices), untrained=cache.untrained(indices))

    def cost_formula(self):
        """How a sample's cost is counted, in words."""
        if not self.kind.paired:
            return "prompt+" + "+".join(self.kind.response_fields)
        responses = "+".join(self.kind.response_fields)
        return f"prompt+{responses}, the prompt shared" if self.share_prompt else \
            f"{len(self.kind.response_fields)}*prompt+{responses}"

    def describe(self):
        """The layout's setting, for the run's first lines ("" for a kind with one response)."""
        return f"share_prompt {self.share_prompt}" if self.kind.paired else ""

    def identity(self):
        """What the run identity (``utils.provenance.run_identity``) records of the layout: it decides the plan."""
        return {"training_type": self.kind.name, "share_prompt": self.share_prompt}


# what a checkpoint written before a layout setting was recorded did
IDENTITY_DEFAULTS = {"share_prompt": False}


def sample_layout(kind_name, share_prompt=False, attention_can_share=True, attention="the attention"):
    """(the run's SampleLayout, a note or None) for the kind named ``kind_name`` (UsageError for an unknown one):
    prompts shared when requested (``--share_prompt``), the kind has several responses and the attention can mask
    such a row (``attention_can_share``; the note says so when it cannot)."""
    if kind_name not in KINDS:
        raise UsageError(f"training type must be one of {', '.join(KINDS)}, not {kind_name!r}")
    kind = KINDS[kind_name]
    share = share_prompt and kind.paired and attention_can_share
    note = None
    if share_prompt and kind.paired and not attention_can_share:
        note = (f"note: prompts not shared (--share_prompt): attention {attention} cannot mask a shared-prompt row; "
                "a segment_* attention can")
    return SampleLayout(kind, share), note
