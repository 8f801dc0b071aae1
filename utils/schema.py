"""What a sample of each training type is. Every other module asks this one.

A training type names the text fields of a raw record, the token-id fields of a cache record, the sequences a
sample puts into a packed row (one per response: prompt + that response), its token cost (the tokens those
sequences take in a micro-batch), its trained tokens and its loss weight (what the step's loss is normalised by).

========== ================================== ==================================================================
type       raw record / cache record          sequences, cost, trained tokens, loss weight
========== ================================== ==================================================================
``sft``    prompt, response /                 (prompt, response); cost P + R; trained R (R - 1 when P = 0: the
           prompt_ids, response_ids           first token has nothing to be predicted from); weight = trained
``dpo``    prompt, chosen, rejected /         (prompt, chosen), (prompt, rejected); cost 2P + C + R, or P + C + R
           prompt_ids, chosen_ids, rejected   with the prompt shared (one row sequence [prompt][chosen][rejected],
                                              ``utils.packing.pack_shared_prompts``); trained C + R (less the same
                                              for P = 0); weight 1 (the loss is a pair mean)
========== ================================== ==================================================================

Lengths are numpy arrays over the samples (``lengths[field][i]``), so every rule is one vectorised expression.
"""
from dataclasses import dataclass

import numpy as np

from utils.errors import UsageError

TRAINING_TYPES = ("sft", "dpo")


@dataclass(frozen=True)
class Schema:
    training_type: str
    response_fields: tuple  # raw text fields of the responses, in the order their sequences are packed

    @property
    def text_fields(self):
        return ("prompt",) + self.response_fields

    @property
    def response_id_fields(self):
        return tuple(f + "_ids" for f in self.response_fields)

    @property
    def id_fields(self):
        return ("prompt_ids",) + self.response_id_fields

    def costs(self, lengths, share_prompt=False):
        """Tokens each sample puts into a micro-batch (int64): its prompt once per response, or once in all with
        ``share_prompt`` (its responses after one prompt)."""
        prompts = 1 if share_prompt else len(self.response_fields)
        return prompts * lengths["prompt_ids"] + sum(lengths[f] for f in self.response_id_fields)

    def trained_tokens(self, lengths, field):
        """Trained tokens of each sample's sequence of response ``field``: every response token is predicted from
        the one before it, the first from the prompt's last; without a prompt the first has nothing before it."""
        return lengths[field] - (lengths["prompt_ids"] == 0)

    def loss_weights(self, lengths):
        """The per-sample normaliser of the loss (int64): SFT trained tokens (a token mean), DPO 1 (a pair mean)."""
        if self.training_type == "sft":
            return self.trained_tokens(lengths, "response_ids")
        return np.ones(len(lengths["prompt_ids"]), dtype=np.int64)


SCHEMAS = {"sft": Schema("sft", ("response",)), "dpo": Schema("dpo", ("chosen", "rejected"))}


def schema(training_type):
    """The Schema of ``training_type``; UsageError for an unknown one."""
    if training_type not in SCHEMAS:
        raise UsageError(f"training type must be one of {', '.join(TRAINING_TYPES)}, not {training_type!r}")
    return SCHEMAS[training_type]
