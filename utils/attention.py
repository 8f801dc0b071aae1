"""Per-sequence attention for padding-free rows, registered with transformers' public interfaces.

transformers' sdpa path handles a packed row (position_ids restarting at 0, no attention mask) by
building a dense (L x L) block-diagonal mask: attention then costs (sum n_i)^2 for the whole row instead
of sum n_i^2, plus the mask itself. ``segment_sdpa`` runs causal SDPA on each sequence of the row
separately (segments start where position_ids is 0) and needs no mask at all. On GPU, flash-attention's
varlen kernel does the same from position_ids when it is installed.
"""
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "segment_sdpa"


def segment_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           position_ids=None, **kwargs):
    """query (1, H, L, D), key/value (1, H_kv, L, D) -> (1, L, H, D): causal attention within each segment."""
    length = query.shape[2]
    if attention_mask is not None or position_ids is None or query.shape[0] != 1 or key.shape[2] != length:
        # not a packed training row (e.g. generation with a cache): plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    bounds = ([0] if not starts or starts[0] != 0 else []) + starts + [length]
    gqa = query.shape[1] != key.shape[1]
    drop = dropout if module.training else 0.0
    if len(bounds) == 2:  # a single sequence: no gathering
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=drop, scale=scaling,
                                             enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    # One SDPA call per distinct segment length, on all segments of that length at once. q, k and v are
    # regrouped with ONE index_select each (its backward is one index_add) instead of one slice per segment:
    # every slice's backward allocates and fills a zero tensor of the whole row, O(segments x row) per layer.
    groups = {}  # segment length -> starts of the segments of that length
    for a, b in zip(bounds[:-1], bounds[1:]):
        groups.setdefault(b - a, []).append(a)
    perm = torch.cat([torch.arange(a, a + n) for n, group in groups.items() for a in group]).to(query.device)
    q, k, v = (t[0].transpose(0, 1).index_select(0, perm) for t in (query, key, value))  # (L, heads, D), grouped
    outs, offset = [], 0
    for n, group in groups.items():
        m = len(group)
        block = [t[offset:offset + m * n].view(m, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)]
        o = F.scaled_dot_product_attention(*block, is_causal=True, dropout_p=drop, scale=scaling, enable_gqa=gqa)
        outs.append(o.transpose(1, 2).reshape(m * n, o.shape[1], o.shape[3]))
        offset += m * n
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return torch.cat(outs).index_select(0, inverse).unsqueeze(0), None  # (1, L, heads, D)


def _mask(*args, **kwargs):
    """No mask for packed training rows (the segments are the mask); sdpa's own mask otherwise."""
    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, segment_sdpa_attention)
AttentionMaskInterface.register(NAME, _mask)
