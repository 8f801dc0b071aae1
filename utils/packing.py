"""Padding-free micro-batches: many sequences concatenated in one row.

``position_ids`` restart at 0 for every sequence and no attention mask is passed, so transformers
(sdpa/eager with ``use_cache=False``, or flash-attention's varlen path) keeps each sequence attending to
itself only. Real tokens == processed tokens: nothing is padded.

The targets are only the trained (response) tokens: ``target_positions[k]`` is the row position whose
next-token prediction is ``target_ids[k]``. Sequence order in a row is the order of ``sequences``; for
DPO all chosen sequences come first, then all rejected ones, so the flat per-token log-probs split into a
chosen part and a rejected part (see ``utils.losses``).
"""
from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor         # (1, L) long
    position_ids: torch.Tensor      # (1, L) long
    target_positions: torch.Tensor  # (K,) long, row positions predicting a trained token
    target_ids: torch.Tensor        # (K,) long
    response_lengths: torch.Tensor  # (S,) trained tokens per sequence; sums to K

    @property
    def num_tokens(self):
        return self.input_ids.shape[1]

    def to(self, device):
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.target_positions,
                                                      self.target_ids, self.response_lengths)))


def pack_sequences(sequences):
    """Pack ``[(prompt_ids, response_ids), ...]`` into one padding-free row."""
    input_ids, position_ids, target_positions, target_ids, response_lengths = [], [], [], [], []
    for prompt, response in sequences:
        start, n_prompt, n_response = len(input_ids), len(prompt), len(response)
        input_ids += prompt
        input_ids += response
        position_ids += range(n_prompt + n_response)
        # the token at row position p is predicted from position p - 1; the first response token from the
        # prompt's last token (a response with no prompt before it cannot learn its first token)
        first = start + max(n_prompt, 1)
        target_positions += range(first - 1, start + n_prompt + n_response - 1)
        target_ids += input_ids[first:start + n_prompt + n_response]
        response_lengths.append(start + n_prompt + n_response - first)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedBatch(as_long([input_ids]), as_long([position_ids]), as_long(target_positions),
                       as_long(target_ids), as_long(response_lengths))


def sample_sequences(records, indices, training_type):
    """The sequences of the samples ``indices``: one per SFT sample; for DPO chosen ones, then rejected."""
    if training_type == "sft":
        return [(records[i]["prompt_ids"], records[i]["response_ids"]) for i in indices]
    return ([(records[i]["prompt_ids"], records[i]["chosen_ids"]) for i in indices]
            + [(records[i]["prompt_ids"], records[i]["rejected_ids"]) for i in indices])
