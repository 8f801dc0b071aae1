"""Attention over padding-free rows: each sequence of a packed row attends causally to itself only.

A micro-batch is one row of concatenated sequences (``utils.packing``). Its layout is known on the host
when the row is built, so :func:`packed_attention_kwargs` turns it into forward kwargs once per
micro-batch, and transformers hands them to every attention layer: ``cu_seq_lens_q/k`` and
``max_length_q/k`` (transformers' own names, which its ``flash_attention_2`` path reads too), plus what a
given implementation needs (a length grouping for ``segment_sdpa``, a block mask for ``segment_flex``).
Nothing inside the model reads tensor values on the host, so a CUDA step never waits for the device.

Implementations, registered with transformers' public ``AttentionInterface`` (``--attn_implementation``):

* ``segment_sdpa``: causal ``scaled_dot_product_attention`` on each sequence, one call per distinct sequence
  length (all sequences of that length at once). Exact on every device; the CPU default. On CUDA each new
  (count, length) shape can make cuDNN plan a new kernel, so it is not the GPU default.
* ``segment_varlen``: ``torch.nn.attention.varlen.varlen_attn``, the flash-attention kernel shipped with
  torch, driven by ``cu_seq_lens``: one call per layer, no extra package. CUDA only.
* ``segment_flex``: ``torch.nn.attention.flex_attention`` with a document-causal ``BlockMask`` built once per
  micro-batch, compiled on CUDA (``dynamic=True``, so new row lengths do not recompile it); eager elsewhere.

``auto`` picks ``segment_varlen`` on CUDA when this torch's ``varlen_attn`` can be causal, else
``flash_attention_2`` when flash-attn is installed, else ``segment_flex``; ``segment_sdpa`` on CPU.
Any other transformers name (``sdpa``, ``eager``, ``flash_attention_2``, ...) is passed through: transformers
then finds the sequences itself from ``position_ids`` (``use_cache=False``), with a dense mask for sdpa/eager.
"""
import functools
import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SEGMENT_SDPA, SEGMENT_VARLEN, SEGMENT_FLEX = "segment_sdpa", "segment_varlen", "segment_flex"
IMPLEMENTATIONS = (SEGMENT_SDPA, SEGMENT_VARLEN, SEGMENT_FLEX)
NAME = SEGMENT_SDPA  # the default on CPU


# ----------------------------------------------------------------------------------------- layouts


class SegmentGroups:
    """The row's sequences grouped by length, for ``segment_sdpa``: ``perm`` (L,) long reorders the row so
    that the sequences of each length are contiguous, ``inverse`` undoes it, ``sizes`` lists
    ``(length, count)`` per group in that order (host ints: the shapes of the SDPA calls)."""

    def __init__(self, sequence_lengths, device="cpu"):
        starts, groups = 0, {}
        for n in sequence_lengths:
            groups.setdefault(n, []).append(starts)
            starts += n
        self.sizes = tuple((n, len(group)) for n, group in groups.items())
        self.single = len(sequence_lengths) == 1
        if self.single:
            self.perm = self.inverse = None
            return
        perm = torch.cat([torch.arange(a, a + n) for n, group in groups.items() for a in group])
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(len(perm))
        self.perm, self.inverse = (_to_device(t, device) for t in (perm, inverse))

    @classmethod
    def from_position_ids(cls, position_ids, device):
        """From a row's position_ids (restarting at 0 per sequence). Reads them on the host: for callers that
        did not pass the layout (e.g. a plain ``model(input_ids, position_ids=...)``)."""
        starts = torch.nonzero(position_ids == 0).flatten().tolist()
        bounds = ([0] if not starts or starts[0] != 0 else []) + starts + [len(position_ids)]
        return cls([b - a for a, b in zip(bounds[:-1], bounds[1:])], device)


def _to_device(tensor, device):
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def document_block_mask(sequence_lengths, device):
    """A flex-attention ``BlockMask``: position q attends to k iff both are in the same sequence and k <= q."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = sum(sequence_lengths)
    document = torch.repeat_interleave(_to_device(torch.arange(len(sequence_lengths)), device),
                                       _to_device(torch.tensor(sequence_lengths), device), output_size=length)

    def document_causal(b, h, q, k):
        return (document[q] == document[k]) & (q >= k)

    return create_block_mask(document_causal, None, None, length, length, device=device)


def packed_attention_kwargs(implementation, batch):
    """Forward kwargs describing ``batch``'s sequences (a ``PackedBatch`` already on its device)."""
    kwargs = dict(cu_seq_lens_q=batch.cu_seq_lens, cu_seq_lens_k=batch.cu_seq_lens,
                  max_length_q=batch.max_length, max_length_k=batch.max_length)
    if implementation == SEGMENT_SDPA:
        kwargs["segment_groups"] = SegmentGroups(batch.sequence_lengths, batch.input_ids.device)
    elif implementation == SEGMENT_FLEX:
        kwargs["block_mask"] = document_block_mask(batch.sequence_lengths, batch.input_ids.device)
    return kwargs


# ----------------------------------------------------------------------------------------- kernels


def _not_packed(attention_mask, query, key):
    """Calls that are not a packed training row (generation with a cache, a padded batch): plain sdpa."""
    return attention_mask is not None or query.shape[0] != 1 or key.shape[2] != query.shape[2]


@torch.compiler.disable  # a Python loop over the row's lengths: under --torch_compile it runs eagerly between graphs
def segment_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           segment_groups=None, position_ids=None, **kwargs):
    """query (1, H, L, D), key/value (1, H_kv, L, D) -> (1, L, H, D): causal attention within each segment."""
    if _not_packed(attention_mask, query, key) or (segment_groups is None and position_ids is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    groups = segment_groups or SegmentGroups.from_position_ids(position_ids[0], query.device)
    gqa = query.shape[1] != key.shape[1]
    drop = dropout if module.training else 0.0
    if groups.single:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=drop, scale=scaling,
                                             enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    # q, k and v are regrouped with ONE index_select each (its backward is one index_add) instead of one slice
    # per segment: every slice's backward allocates and fills a zero tensor of the whole row.
    q, k, v = (t[0].transpose(0, 1).index_select(0, groups.perm) for t in (query, key, value))  # (L, heads, D)
    outs, offset = [], 0
    for n, m in groups.sizes:
        block = [t[offset:offset + m * n].view(m, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)]
        o = F.scaled_dot_product_attention(*block, is_causal=True, dropout_p=drop, scale=scaling, enable_gqa=gqa)
        outs.append(o.transpose(1, 2).reshape(m * n, o.shape[1], o.shape[3]))
        offset += m * n
    return torch.cat(outs).index_select(0, groups.inverse).unsqueeze(0), None  # (1, L, heads, D)


@functools.lru_cache(maxsize=1)
def _varlen():
    """(varlen_attn, its causal keyword arguments, whether it takes enable_gqa), or None when this torch's
    varlen_attn is missing or cannot be told to be causal."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


def segment_varlen_available():
    return torch.cuda.is_available() and _varlen() is not None


def _same_dtype(*tensors):
    """Under autocast, q and k come out of the rotary embedding in fp32 while v is in the autocast dtype; kernels
    that autocast does not know (varlen_attn, flex_attention) get all three in the autocast dtype."""
    device_type = tensors[0].device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else tensors[0].dtype
    return [t.to(dtype) for t in tensors]


def _no_dropout(module, dropout, name):
    if dropout and module.training:
        raise ValueError(f"{name} has no attention dropout: set the model's attention_dropout to 0 or use segment_sdpa")


def segment_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """query (1, H, L, D), key/value (1, H_kv, L, D) -> (1, L, H, D) through torch's varlen flash kernel."""
    if _not_packed(attention_mask, query, key) or cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    _no_dropout(module, dropout, SEGMENT_VARLEN)
    varlen_attn, causal, takes_gqa = _varlen()
    q, k, v = (t[0].transpose(0, 1) for t in _same_dtype(query, key, value))  # (L, heads, D)
    gqa = {}
    if q.shape[1] != k.shape[1]:
        if takes_gqa:
            gqa = {"enable_gqa": True}
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                      **causal, **gqa)
    return out.unsqueeze(0), None


@functools.lru_cache(maxsize=None)
def _flex(device_type):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if device_type == "cuda" else flex_attention


def segment_flex_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, block_mask=None,
                           **kwargs):
    """query (1, H, L, D), key/value (1, H_kv, L, D) -> (1, L, H, D) through flex_attention and the row's
    document-causal block mask."""
    if _not_packed(attention_mask, query, key) or block_mask is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    _no_dropout(module, dropout, SEGMENT_FLEX)
    out = _flex(query.device.type)(*_same_dtype(query, key, value), block_mask=block_mask, scale=scaling,
                                   enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


# Registered without a mask function (AttentionMaskInterface): transformers then builds no mask for these names
# and skips its search for packed sequences in position_ids, which reads them on the host. The sequences come
# from the layout kwargs instead.
for _name, _function in ((SEGMENT_SDPA, segment_sdpa_attention), (SEGMENT_VARLEN, segment_varlen_attention),
                         (SEGMENT_FLEX, segment_flex_attention)):
    AttentionInterface.register(_name, _function)


def resolve(implementation, device):
    """The attention to use for ``--attn_implementation`` on ``device`` (see the module docstring)."""
    if implementation != "auto":
        return implementation
    if torch.device(device).type != "cuda":
        return SEGMENT_SDPA
    if segment_varlen_available():
        return SEGMENT_VARLEN
    from transformers.utils import is_flash_attn_2_available
    return "flash_attention_2" if is_flash_attn_2_available() else SEGMENT_FLEX
