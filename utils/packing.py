"""Padding-free micro-batches: many sequences concatenated in one row, built on the host.

``position_ids`` restart at 0 for every sequence and no attention mask is passed; the row's layout
(``cu_seq_lens``: where each sequence starts, and ``sequence_lengths`` on the host) is known here, once per
micro-batch, and handed to every attention layer (``utils.attention``), so the model never re-derives it
from the tokens (no host synchronisation inside the model). Real tokens == processed tokens: nothing is
padded.

The targets are only the trained (response) tokens: ``target_positions[k]`` is the row position whose
next-token prediction is ``target_ids[k]``. Sequence order in a row is the order of ``sequences``; for
DPO all chosen sequences come first, then all rejected ones, so the flat per-token log-probs split into a
chosen part and a rejected part (see ``utils.losses``).
"""
from dataclasses import dataclass, fields, replace
from typing import Optional

import numpy as np
import torch


@dataclass
class PackedBatch:
    """One micro-batch. Tensors are CPU tensors until :meth:`to`; the ints and tuples stay on the host."""
    input_ids: torch.Tensor         # (1, L) long
    position_ids: torch.Tensor      # (1, L) long
    target_positions: torch.Tensor  # (K,) long, row positions predicting a trained token
    target_ids: torch.Tensor        # (K,) long
    response_lengths: torch.Tensor  # (S,) long, trained tokens per sequence; sums to K
    cu_seq_lens: torch.Tensor       # (S+1,) int32, row offsets of the sequences: 0, n_0, n_0+n_1, ..., L
    sequence_lengths: tuple         # (S,) ints on the host: tokens of each sequence
    num_samples: int                # SFT samples or DPO pairs (a pair is two sequences)
    ref_logps: Optional[torch.Tensor] = None    # (K,) float32, DPO: the reference's log-prob of each target
    target_mask: Optional[torch.Tensor] = None  # (K,) bool, SamPO: the targets that enter the sums

    @property
    def num_tokens(self):
        return self.input_ids.shape[1]

    @property
    def max_length(self):
        return max(self.sequence_lengths)

    def to(self, device):
        """The batch on ``device``. On CUDA the host tensors are pinned and copied with ``non_blocking``, so
        the copy queues behind the device's current work instead of waiting for it."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        pin = device.type == "cuda"
        moved = {f.name: (getattr(self, f.name).pin_memory() if pin else getattr(self, f.name)).to(
                     device, non_blocking=pin)
                 for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def pack_sequences(sequences, num_samples=None):
    """Pack ``[(prompt_ids, response_ids), ...]`` (lists or 1-D integer arrays) into one padding-free row."""
    prompt_lengths = np.fromiter((len(p) for p, _ in sequences), dtype=np.int64, count=len(sequences))
    response_lengths = np.fromiter((len(r) for _, r in sequences), dtype=np.int64, count=len(sequences))
    lengths = prompt_lengths + response_lengths
    cu = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    input_ids = np.concatenate([np.asarray(part, dtype=np.int64) for p, r in sequences for part in (p, r)])
    position_ids = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths)
    # the token at row position p is predicted from position p - 1; the first response token from the
    # prompt's last token (a response with no prompt before it cannot learn its first token)
    first = cu[:-1] + np.maximum(prompt_lengths, 1)
    trained = cu[1:] - first
    target_rows = np.arange(trained.sum()) - np.repeat(np.cumsum(trained) - trained - first, trained)
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids)[None], position_ids=torch.from_numpy(position_ids)[None],
        target_positions=torch.from_numpy(target_rows - 1), target_ids=torch.from_numpy(input_ids[target_rows]),
        response_lengths=torch.from_numpy(trained), cu_seq_lens=torch.from_numpy(cu.astype(np.int32)),
        sequence_lengths=tuple(lengths.tolist()),
        num_samples=len(sequences) if num_samples is None else num_samples)
