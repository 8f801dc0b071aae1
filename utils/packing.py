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

:func:`pack_shared_prompts` lays a DPO pair out with its prompt once: ``[prompt][chosen][rejected]``, both
responses at positions continuing from the prompt's end, the rejected one attending to the prompt and to
itself but not to the chosen one (``PackedBatch.shared_prompts`` tells the attention, ``utils.attention``).
Every token then sees exactly what it sees in its own ``prompt + response`` sequence, so the log-probs are
those of :func:`pack_sequences` while the prompt is computed once: a pair costs P + C + R tokens, not
2P + C + R. The targets keep the same order (all first responses, then all second ones).
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
    num_samples: int                # SFT samples or DPO pairs (a pair is two sequences, or one with a shared prompt)
    # A shared-prompt row's sequences are its pairs (S = pairs, response_lengths has 2S entries); cu_seq_lens and
    # max_length then bound the pairs, not the attention problems (utils.attention.attention_problems).
    # per row sequence, (prompt length, response lengths...) when its responses share the prompt
    # (pack_shared_prompts); None: every sequence is plain causal
    shared_prompts: Optional[tuple] = None
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


def pack_sequences(sequences, num_samples=None, untrained=None):
    """Pack ``[(prompt_ids, response_ids), ...]`` (lists or 1-D integer arrays) into one padding-free row.
    ``untrained``: None, or per sequence a flat ``[s0, e0, s1, e1, ...]`` of end-exclusive response-token ranges
    that stay in the row (the model sees them) but are not targets: a multi-turn conversation's turns between its
    assistant turns."""
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
    if untrained is not None and any(len(u) for u in untrained):
        masked = np.zeros(int(cu[-1]) + 1, dtype=np.int64)  # +1 at each span's first row, -1 after its last
        for start, spans in zip((cu[:-1] + prompt_lengths).tolist(), untrained):
            np.add.at(masked, start + np.asarray(spans[0::2], dtype=np.int64), 1)
            np.add.at(masked, start + np.asarray(spans[1::2], dtype=np.int64), -1)
        keep = np.cumsum(masked[:-1])[target_rows] == 0
        trained = trained - np.bincount(np.repeat(np.arange(len(sequences)), trained)[~keep],
                                        minlength=len(sequences))
        target_rows = target_rows[keep]
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids)[None], position_ids=torch.from_numpy(position_ids)[None],
        target_positions=torch.from_numpy(target_rows - 1), target_ids=torch.from_numpy(input_ids[target_rows]),
        response_lengths=torch.from_numpy(trained), cu_seq_lens=torch.from_numpy(cu.astype(np.int32)),
        sequence_lengths=tuple(lengths.tolist()),
        num_samples=len(sequences) if num_samples is None else num_samples)


def pack_shared_prompts(samples):
    """Pack ``[(prompt_ids, (response_ids, ...)), ...]`` into one padding-free row, each prompt once.

    A sample's row sequence is ``[prompt][response 1][response 2]...``; every response's positions run from
    ``len(prompt)`` on, and (told by ``shared_prompts``) the attention lets a response's tokens see the prompt
    and the response's own earlier tokens only. Targets come response slot by response slot (every sample's
    first response, then every sample's second: DPO's chosen then rejected), each response's first token
    predicted from the prompt's last row, as in :func:`pack_sequences`, whose batch this equals in
    ``target_ids``, ``response_lengths`` and the log-probs a model computes from it.
    """
    prompt_lengths = [len(p) for p, _ in samples]
    response_lengths = [[len(r) for r in rs] for _, rs in samples]
    lengths = [p + sum(rs) for p, rs in zip(prompt_lengths, response_lengths)]
    cu = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    input_ids = np.concatenate([np.asarray(part, dtype=np.int64) for p, rs in samples for part in (p, *rs)])
    slots = len(response_lengths[0])
    if any(len(rs) != slots for rs in response_lengths):
        raise ValueError("every sample of a shared-prompt row needs the same number of responses")
    position_ids = np.empty(int(cu[-1]), dtype=np.int64)
    trained = [[] for _ in range(slots)]     # per response slot, per sample: rows of the trained tokens
    predicting = [[] for _ in range(slots)]  # and the rows whose next-token prediction they are
    for start, p, rs in zip(cu[:-1].tolist(), prompt_lengths, response_lengths):
        position_ids[start:start + p] = np.arange(p)
        row = start + p
        for slot, r in enumerate(rs):
            position_ids[row:row + r] = np.arange(p, p + r)
            rows = np.arange(row if p else row + 1, row + r)  # without a prompt the first token is not trained
            before = rows - 1
            if p and r:
                before[0] = start + p - 1  # every response's first token is predicted from the prompt's last
            trained[slot].append(rows)
            predicting[slot].append(before)
            row += r
    trained = [rows for slot in trained for rows in slot]
    target_rows = np.concatenate(trained)
    target_positions = np.concatenate([before for slot in predicting for before in slot])
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids)[None], position_ids=torch.from_numpy(position_ids)[None],
        target_positions=torch.from_numpy(target_positions), target_ids=torch.from_numpy(input_ids[target_rows]),
        response_lengths=torch.tensor([len(rows) for rows in trained], dtype=torch.int64),
        cu_seq_lens=torch.from_numpy(cu.astype(np.int32)), sequence_lengths=tuple(lengths), num_samples=len(samples),
        shared_prompts=tuple((p, *rs) for p, rs in zip(prompt_lengths, response_lengths)))
