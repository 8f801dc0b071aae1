"""Attention over padding-free rows: each sequence of a packed row attends causally to itself only.

A micro-batch is one row of concatenated sequences (``utils.packing``). Its layout is known on the host
when the row is built, so :func:`packed_attention_kwargs` turns it into forward kwargs once per
micro-batch, and transformers hands them to every attention layer: ``cu_seq_lens_q/k`` and
``max_length_q/k`` (transformers' own names, which its ``flash_attention_2`` path reads too), plus what a
given implementation needs (a length grouping for ``segment_sdpa``, a block mask for ``segment_flex``).
Nothing inside the model reads tensor values on the host, so a CUDA step never waits for the device.

A row may also hold DPO pairs with their prompt once (``utils.packing.pack_shared_prompts``): ``[prompt]
[chosen][rejected]``, the rejected response attending to the prompt and to itself only. Every implementation
here attends so (:func:`attention_problems` splits such a row into causal problems, the rejected one with the
prompt as a prefix); transformers' own implementations cannot, and are refused for such rows.

Implementations, registered with transformers' public ``AttentionInterface`` (``--attn_implementation``):

* ``segment_sdpa``: causal ``scaled_dot_product_attention`` on each sequence, one call per distinct shape (a
  sequence's length; for a shared prompt's later response, its length and the prompt's), all problems of that
  shape at once. Exact on every device; the CPU default. On CUDA each new (count, length) shape can make cuDNN
  plan a new kernel, so it is not the GPU default.
* ``segment_varlen``: ``torch.nn.attention.varlen.varlen_attn``, the flash-attention kernel shipped with
  torch, driven by ``cu_seq_lens``: one call per layer, no extra package (a shared-prompt row gathers each
  response's keys after its prompt's). CUDA only.
* ``segment_flex``: ``torch.nn.attention.flex_attention`` with a document-causal ``BlockMask`` built once per
  micro-batch, compiled on CUDA (``dynamic=True``, so new row lengths do not recompile it); eager elsewhere.

``auto`` picks, on CUDA under ``--bf16``, ``segment_varlen`` when this torch's ``varlen_attn`` takes a
``window_size``, else ``flash_attention_2`` when flash-attn is installed; else ``segment_flex`` (also for fp32 on
CUDA: flash kernels have no fp32); ``segment_sdpa`` on CPU.
Any other transformers name (``sdpa``, ``eager``, ``flash_attention_2``, ...) is passed through: transformers
then finds the sequences itself from ``position_ids`` (``use_cache=False``), with a dense mask for sdpa/eager.
"""
import functools
import inspect

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from utils.errors import UsageError

SEGMENT_SDPA, SEGMENT_VARLEN, SEGMENT_FLEX = "segment_sdpa", "segment_varlen", "segment_flex"
IMPLEMENTATIONS = (SEGMENT_SDPA, SEGMENT_VARLEN, SEGMENT_FLEX)
NAME = SEGMENT_SDPA  # the default on CPU


# ----------------------------------------------------------------------------------------- layouts


def attention_problems(sequence_lengths, shared_prompts=None):
    """The row's attention as independent causal problems ``(q_start, q_length, prefix_start, prefix_length)``:
    the rows ``[q_start, q_start + q_length)`` attend to all of the prefix rows, then causally to themselves.

    A plain sequence is one problem without prefix. A sequence whose responses share the prompt
    (``shared_prompts``: its ``(prompt length, response lengths...)``, ``utils.packing.pack_shared_prompts``) is
    the problem prompt + first response, then one problem per further response with the prompt as its prefix.
    The query ranges cover the row once, in row order. Host ints only."""
    problems, start = [], 0
    for i, n in enumerate(sequence_lengths):
        if shared_prompts is None:
            problems.append((start, n, start, 0))
        else:
            prompt, first, *others = shared_prompts[i]
            problems.append((start, prompt + first, start, 0))
            row = start + prompt + first
            for r in others:
                problems.append((row, r, start, prompt))
                row += r
        start += n
    return problems


def _ranges(starts, lengths):
    """np.concatenate([np.arange(a, a + n) for a, n in zip(starts, lengths)]), vectorised (int64)."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))


def _key_rows(problems):
    """The key rows of ``problems`` in their order, each problem's prefix then its own rows: (sum of m + n,) long."""
    return torch.from_numpy(_ranges([x for q_start, _, k_start, _ in problems for x in (k_start, q_start)],
                                    [x for _, n, _, m in problems for x in (m, n)]))


def _offsets(lengths, device):
    return _to_device(torch.from_numpy(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)), device)


class SegmentGroups:
    """The row's attention problems (:func:`attention_problems`) grouped by shape, for ``segment_sdpa``:
    ``q_perm`` (L,) long reorders the row's query rows so that the problems of each shape are contiguous,
    ``inverse`` undoes it, ``k_perm`` gathers each problem's key rows (its prefix, then its own rows; None when
    no problem has a prefix: the keys are the queries), ``sizes`` lists ``(q_length, prefix_length, count)`` per
    group in that order (host ints: the shapes of the SDPA calls) and ``masks[window]`` the bool mask of each group
    (None: plain causal) for ``window`` None (query i sees the prefix and its own rows up to i: a causal mask aligned
    to the lower right) and for ``sliding_window`` (besides, only the last ``window`` positions up to itself)."""

    def __init__(self, sequence_lengths, device="cpu", shared_prompts=None, sliding_window=None):
        problems = attention_problems(sequence_lengths, shared_prompts)
        groups = {}
        for problem in problems:
            groups.setdefault((problem[1], problem[3]), []).append(problem)
        self.sizes = tuple((n, m, len(group)) for (n, m), group in groups.items())
        self.single = len(problems) == 1 and problems[0][3] == 0

        def mask(n, m, window):
            if m == 0 and (window is None or n <= window):
                return None
            keep = torch.ones(n, n + m, dtype=torch.bool, device=device).tril(m)
            return keep if window is None else keep.triu(m - window + 1)

        self.masks = {w: tuple(mask(n, m, w) for n, m, _ in self.sizes) for w in {None, sliding_window}}
        if self.single:
            self.q_perm = self.inverse = self.k_perm = None
            return
        ordered = [problem for group in groups.values() for problem in group]
        q_perm = torch.from_numpy(_ranges([p[0] for p in ordered], [p[1] for p in ordered]))
        inverse = torch.empty_like(q_perm)
        inverse[q_perm] = torch.arange(len(q_perm))
        self.q_perm, self.inverse = (_to_device(t, device) for t in (q_perm, inverse))
        self.k_perm = _to_device(_key_rows(ordered), device) if any(m for _, m, _ in self.sizes) else None

    @classmethod
    def from_position_ids(cls, position_ids, device, sliding_window=None):
        """From a row's position_ids (restarting at 0 per sequence). Reads them on the host: for callers that
        did not pass the layout (e.g. a plain ``model(input_ids, position_ids=...)``). ValueError for positions
        that neither continue nor restart at 0 (a shared-prompt row: its layout must be passed)."""
        steps = position_ids[1:] - position_ids[:-1]
        if bool(((steps != 1) & (position_ids[1:] != 0)).any()):
            raise ValueError("position_ids neither continue nor restart at 0: pass the row's layout "
                             "(utils.attention.packed_attention_kwargs)")
        starts = torch.nonzero(position_ids == 0).flatten().tolist()
        bounds = ([0] if not starts or starts[0] != 0 else []) + starts + [len(position_ids)]
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        return cls(lengths, device, sliding_window=binding_window(sliding_window, max(lengths)))


def _to_device(tensor, device):
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _block_layout(problems, length, block_size, window=None):
    """Which (query block, key block) tiles of the row's attention (:func:`attention_problems`) are partial (some
    but not all pairs attend) and which are full: two (n_blocks, n_blocks) bool arrays, from the problems alone in
    O(L + n_blocks^2) on the host. Each query attends to at most two key intervals (its problem's prefix and its
    own rows up to itself; with a ``window``, only keys less than ``window`` positions back); a tile is touched if
    any of its queries' intervals meets it and full if every one of its ``block_size`` queries covers it with one
    interval (tiles past the row's end are never full: their padding does not attend). A prefix ends at least one
    row before its queries (responses are not empty), so no tile is covered by the two intervals together only; a
    partial tile would be exact anyway (the mask function runs in it)."""
    blocks = -(-length // block_size)
    q_starts, q_lengths, k_starts, prefixes = (np.array(column, dtype=np.int64) for column in zip(*problems))
    queries = _ranges(q_starts, q_lengths)
    own_start, prefix_start, prefix_length = (np.repeat(column, q_lengths) for column in (q_starts, k_starts, prefixes))
    prefix_end = prefix_start + prefix_length
    if window is not None:  # a query's position is its problem's prefix length + its offset in the problem
        prefix_start = np.maximum(prefix_start, prefix_end + (queries - own_start) - window + 1)
        own_start = np.maximum(own_start, queries - window + 1)
    touched = np.zeros((blocks, blocks + 1), dtype=np.int64)
    covered = np.zeros((blocks, blocks + 1), dtype=np.int64)
    rows = queries // block_size
    for start, end, keep in ((prefix_start, prefix_end, prefix_end > prefix_start),
                             (own_start, queries + 1, np.ones_like(queries, dtype=bool))):
        first, last = start // block_size, (end - 1) // block_size  # tiles the interval meets
        np.add.at(touched, (rows[keep], first[keep]), 1)
        np.add.at(touched, (rows[keep], last[keep] + 1), -1)
        first, last = -(-start // block_size), end // block_size - 1  # tiles inside it
        keep = keep & (first <= last)
        np.add.at(covered, (rows[keep], first[keep]), 1)
        np.add.at(covered, (rows[keep], last[keep] + 1), -1)
    full = np.cumsum(covered, axis=1)[:, :blocks] == block_size
    return (np.cumsum(touched, axis=1)[:, :blocks] > 0) & ~full, full


def _ordered(tiles, device):
    """(count, indices) of a (n, n) bool tile array as a BlockMask holds them: (1, 1, n) and (1, 1, n, n) int32,
    each row's set tiles first, in increasing order."""
    order = np.argsort(~tiles, axis=1, kind="stable")
    counts = tiles.sum(axis=1)
    return tuple(_to_device(torch.from_numpy(a.astype(np.int32)[None, None]), device) for a in (counts, order))


def document_block_mask(sequence_lengths, device, shared_prompts=None, block_size=128, sliding_window=None):
    """A flex-attention ``BlockMask``: row q attends to row k iff both are in the same sequence, k <= q and, for a
    shared-prompt sequence, k is in the prompt or in q's own response; with a ``sliding_window``, also their
    positions differ by less than the window (a later response's positions continue from its prompt's end). Its
    tiles are classified on the host from the row's layout (:func:`_block_layout`), not by evaluating the mask over
    all L x L pairs as ``create_block_mask`` does (2.5 GB and 1.7 s on CPU for a 16k row); the mask function runs
    only inside partial tiles."""
    from torch.nn.attention.flex_attention import BlockMask

    length = sum(sequence_lengths)
    document = torch.repeat_interleave(_to_device(torch.arange(len(sequence_lengths)), device),
                                       _to_device(torch.tensor(sequence_lengths), device), output_size=length)
    if shared_prompts is None:
        def mask_mod(b, h, q, k):
            return (document[q] == document[k]) & (q >= k)
    else:  # branch 0: a prompt, j: the j-th response of its sequence
        parts = [n for sizes in shared_prompts for n in sizes]
        ids = [j for sizes in shared_prompts for j in range(len(sizes))]
        branch = torch.repeat_interleave(_to_device(torch.tensor(ids), device), _to_device(torch.tensor(parts), device),
                                         output_size=length)

        def mask_mod(b, h, q, k):
            return (document[q] == document[k]) & (q >= k) & ((branch[k] == 0) | (branch[k] == branch[q]))

    problems = attention_problems(sequence_lengths, shared_prompts)
    if sliding_window is not None:  # a row's position: its problem's prefix length + its offset in the problem
        positions = torch.from_numpy(_ranges([m for _, _, _, m in problems], [n for _, n, _, _ in problems]))
        positions = _to_device(positions, device)
        layout_mask = mask_mod

        def mask_mod(b, h, q, k):
            return layout_mask(b, h, q, k) & (positions[q] - positions[k] < sliding_window)

    partial, full = _block_layout(problems, length, block_size, sliding_window)
    return BlockMask.from_kv_blocks(*_ordered(partial, device), *_ordered(full, device), BLOCK_SIZE=block_size,
                                    mask_mod=mask_mod, seq_lengths=(length, length))


def packed_attention_kwargs(implementation, batch, sliding_window=None):
    """Forward kwargs describing ``batch``'s sequences (a ``PackedBatch`` already on its device), for layers with
    full causal attention and, when the model has one (its config's ``sliding_window``), for layers with that
    sliding window. ValueError for a shared-prompt batch and an implementation that cannot attend as it needs (one
    not of this module)."""
    device, shared = batch.input_ids.device, batch.shared_prompts
    if shared is None:
        kwargs = dict(cu_seq_lens_q=batch.cu_seq_lens, cu_seq_lens_k=batch.cu_seq_lens,
                      max_length_q=batch.max_length, max_length_k=batch.max_length)
    else:  # queries: the problems' ranges, in row order; keys: each problem's prefix and own rows (key_rows)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"rows with shared prompts need one of {', '.join(IMPLEMENTATIONS)}, not {implementation}")
        problems = attention_problems(batch.sequence_lengths, shared)
        q_lengths, k_lengths = [n for _, n, _, _ in problems], [n + m for _, n, _, m in problems]
        kwargs = dict(cu_seq_lens_q=_offsets(q_lengths, device), cu_seq_lens_k=_offsets(k_lengths, device),
                      max_length_q=max(q_lengths), max_length_k=max(k_lengths))
        if implementation == SEGMENT_VARLEN:
            kwargs["key_rows"] = _to_device(_key_rows(problems), device)
    window = binding_window(sliding_window, kwargs["max_length_k"])
    if implementation == SEGMENT_SDPA:
        kwargs["segment_groups"] = SegmentGroups(batch.sequence_lengths, device, shared, window)
    elif implementation == SEGMENT_FLEX:
        kwargs["block_masks"] = {w: document_block_mask(batch.sequence_lengths, device, shared, sliding_window=w)
                                 for w in {None, window}}
    return kwargs


def binding_window(sliding_window, max_key_length):
    """``sliding_window`` if it hides some key from some query of a row whose attention problems have at most
    ``max_key_length`` keys, else None (a window of W positions: a query sees keys less than W positions back)."""
    return sliding_window if sliding_window is not None and sliding_window < max_key_length else None


# What transformers' decoder layers hand an attention function besides q, k, v and the mask that changes nothing
# here, or that these functions read themselves. Surveyed in transformers 5.24 (tiny models, one forward each):
# Llama, Llama 4, Mistral, Ministral, Mixtral, Qwen 2/3 (MoE), Gemma 1-3, Cohere 1-2, OLMo 2/3, OLMoE, Granite (MoE),
# GPT-2, GPT-NeoX, OPT, Phi 1-3, StableLM, Starcoder2, GLM 4 (MoE), Exaone 4, SmolLM3, Helium, Arcee, Apertus,
# ERNIE 4.5, Hunyuan, Seed-OSS, JetMoE, BitNet, Nemotron, DeepSeek V2, gpt-oss (sinks), VaultGemma (soft-capping).
KNOWN_LAYER_KWARGS = {"position_ids", "use_cache", "output_attentions", "output_router_logits", "cache_position",
                      "past_key_values", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
                      "segment_groups", "block_masks", "key_rows", "sliding_window"}
FEATURE_NAMES = {"softcap": "attention logit soft-capping", "s_aux": "attention sinks", "sinks": "attention sinks"}


def _features(name, **kwargs):
    """ValueError when a layer asks the attention for something this module does not implement: a keyword with a
    value that is not in KNOWN_LAYER_KWARGS (soft-capping, sinks, a position bias, ...)."""
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in KNOWN_LAYER_KWARGS)
    if unknown:
        what = ", ".join(f"{FEATURE_NAMES.get(k, 'an attention argument')} ({k})" for k in unknown)
        raise ValueError(f"{name} does not implement what this model's attention layers ask for: {what}; use "
                         "--attn_implementation eager")


def _pick(artifacts, window, name):
    try:
        return artifacts[window]
    except KeyError:
        raise ValueError(f"{name}: a layer asks for sliding window {window}, the row was laid out for "
                         f"{sorted(w for w in artifacts if w)}: pass the model's sliding_window to "
                         "packed_attention_kwargs") from None


# ----------------------------------------------------------------------------------------- kernels


def _not_packed(attention_mask, query, key):
    """Calls that are not a packed training row (generation with a cache, a padded batch): plain sdpa."""
    return attention_mask is not None or query.shape[0] != 1 or key.shape[2] != query.shape[2]


def _plain_sdpa(module, query, key, value, attention_mask, sliding_window=None, **kwargs):
    """transformers' sdpa for calls that are not a packed row; ValueError if the layer's sliding window would be
    lost (no mask function is registered for these names, so transformers built no windowed mask)."""
    if attention_mask is None and sliding_window is not None and key.shape[2] > sliding_window:
        raise ValueError(f"a call that is not a packed row cannot apply this layer's sliding window of "
                         f"{sliding_window}")
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.compiler.disable  # a Python loop over the row's lengths: under --torch_compile it runs eagerly between graphs
def segment_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           segment_groups=None, position_ids=None, sliding_window=None, max_length_k=None, **kwargs):
    """query (1, H, L, D), key/value (1, H_kv, L, D) -> (1, L, H, D): causal attention within each segment (a
    shared prompt's later responses: after the prompt, with a lower-right-aligned causal mask), within the layer's
    ``sliding_window`` if it has one. Without the row's layout (``segment_groups``), the segments are read from
    ``position_ids`` (on the host: a device sync per layer)."""
    _features(SEGMENT_SDPA, **kwargs)
    if _not_packed(attention_mask, query, key) or (segment_groups is None and position_ids is None):
        return _plain_sdpa(module, query, key, value, attention_mask, sliding_window, dropout=dropout,
                           scaling=scaling, position_ids=position_ids, **kwargs)
    if segment_groups is None:
        segment_groups = SegmentGroups.from_position_ids(position_ids[0], query.device, sliding_window)
        max_length_k = max(n for n, _, _ in segment_groups.sizes)
    groups = segment_groups
    masks = _pick(groups.masks, binding_window(sliding_window, max_length_k), SEGMENT_SDPA)
    gqa = query.shape[1] != key.shape[1]
    drop = dropout if module.training else 0.0
    if groups.single:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=masks[0], is_causal=masks[0] is None,
                                             dropout_p=drop, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    # q, k and v are regrouped with ONE index_select each (its backward is one index_add) instead of one slice
    # per segment: every slice's backward allocates and fills a zero tensor of the whole row.
    q = query[0].transpose(0, 1).index_select(0, groups.q_perm)  # (L, heads, D)
    k_perm = groups.q_perm if groups.k_perm is None else groups.k_perm
    k, v = (t[0].transpose(0, 1).index_select(0, k_perm) for t in (key, value))
    outs, q_offset, k_offset = [], 0, 0
    for (n, m, count), mask in zip(groups.sizes, masks):
        q_block = q[q_offset:q_offset + count * n].view(count, n, q.shape[1], q.shape[2]).transpose(1, 2)
        k_block, v_block = (t[k_offset:k_offset + count * (n + m)].view(count, n + m, t.shape[1], t.shape[2])
                            .transpose(1, 2) for t in (k, v))
        o = F.scaled_dot_product_attention(q_block, k_block, v_block, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=drop, scale=scaling, enable_gqa=gqa)
        outs.append(o.transpose(1, 2).reshape(count * n, o.shape[1], o.shape[3]))
        q_offset += count * n
        k_offset += count * (n + m)
    return torch.cat(outs).index_select(0, groups.inverse).unsqueeze(0), None  # (1, L, heads, D)


@functools.lru_cache(maxsize=1)
def _varlen():
    """(varlen_attn, whether it takes enable_gqa), or None when this torch has no varlen_attn with a
    ``window_size`` (flash attention's (left, right): query q sees keys q - left .. q + right; (-1, 0): causal)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return (varlen_attn, "enable_gqa" in params) if "window_size" in params else None


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
                             cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                             key_rows=None, sliding_window=None, **kwargs):
    """query (1, H, L, D), key/value (1, H_kv, L, D) -> (1, L, H, D) through torch's varlen flash kernel. In a
    shared-prompt row, ``key_rows`` gathers each attention problem's keys (its prompt, then its own rows) and the
    kernel's causal mask, aligned to the lower right when a problem has more keys than queries (flash attention's
    convention, ``window_size=(-1, 0)``), lets a later response's rows see the prompt and themselves. A layer's
    ``sliding_window`` W is the window ``(W - 1, 0)``: the gathered keys' offsets are their position differences."""
    _features(SEGMENT_VARLEN, **kwargs)
    if _not_packed(attention_mask, query, key) or cu_seq_lens_q is None:  # e.g. a model that drops the layout
        return segment_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    _no_dropout(module, dropout, SEGMENT_VARLEN)
    q, k, v = (t[0].transpose(0, 1) for t in _same_dtype(query, key, value))  # (L, heads, D)
    if q.dtype == torch.float32 and q.is_cuda:  # outside autocast (load-time probes): flash has no fp32
        return segment_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, max_length_k=max_length_k, **kwargs)
    varlen_attn, takes_gqa = _varlen()
    gqa = {}
    if q.shape[1] != k.shape[1]:
        if takes_gqa:
            gqa = {"enable_gqa": True}
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if key_rows is not None:
        k, v = (t.index_select(0, key_rows) for t in (k, v))
    else:
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    window = binding_window(sliding_window, max_length_k)
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling,
                      window_size=(-1 if window is None else window - 1, 0), **gqa)
    return out.unsqueeze(0), None


@functools.lru_cache(maxsize=None)
def _flex(device_type):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if device_type == "cuda" else flex_attention


def segment_flex_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, block_masks=None,
                           sliding_window=None, max_length_k=None, **kwargs):
    """query (1, H, L, D), key/value (1, H_kv, L, D) -> (1, L, H, D) through flex_attention and the row's
    document-causal block mask (the one for the layer's ``sliding_window`` if it has one)."""
    _features(SEGMENT_FLEX, **kwargs)
    if _not_packed(attention_mask, query, key) or block_masks is None:  # e.g. a model that drops the layout
        return segment_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, max_length_k=max_length_k, **kwargs)
    _no_dropout(module, dropout, SEGMENT_FLEX)
    block_mask = _pick(block_masks, binding_window(sliding_window, max_length_k), SEGMENT_FLEX)
    out = _flex(query.device.type)(*_same_dtype(query, key, value), block_mask=block_mask, scale=scaling,
                                   enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


# Registered without a mask function (AttentionMaskInterface): transformers then builds no mask for these names
# and skips its search for packed sequences in position_ids, which reads them on the host. The sequences come
# from the layout kwargs instead.
for _name, _function in ((SEGMENT_SDPA, segment_sdpa_attention), (SEGMENT_VARLEN, segment_varlen_attention),
                         (SEGMENT_FLEX, segment_flex_attention)):
    AttentionInterface.register(_name, _function)


def shares_prompts(implementation, device, half_precision=True):
    """Whether a DPO pair can go into a row with its prompt once (``utils.packing.pack_shared_prompts``): only
    this module's implementations attend as such a row needs; arguments as for :func:`resolve`."""
    return resolve(implementation, device, half_precision) in IMPLEMENTATIONS


def resolve(implementation, device, half_precision=True):
    """The attention to use for ``--attn_implementation`` on ``device`` (see the module docstring); flash kernels
    (segment_varlen, flash_attention_2) only when the model computes in half precision (``--bf16``)."""
    if implementation != "auto":
        return implementation
    if torch.device(device).type != "cuda":
        return SEGMENT_SDPA
    if half_precision and segment_varlen_available():
        return SEGMENT_VARLEN
    from transformers.utils import is_flash_attn_2_available
    return "flash_attention_2" if half_precision and is_flash_attn_2_available() else SEGMENT_FLEX


def choose(requested, device, bf16, training=True, attention_dropout=None, say=print):
    """The attention a model loads with for ``--attn_implementation`` ``requested`` (:func:`resolve`), checked to
    run there: UsageError for segment_varlen without its kernel, a flash kernel without ``bf16``, segment_flex
    training on CPU (no CPU backward). A model trained with attention dropout (``attention_dropout``: its config's
    non-zero rates by name) is not given an attention without it (segment_varlen, segment_flex: their kernels would
    raise at the first training forward): auto takes segment_sdpa (said through ``say``), an explicit choice is
    refused."""
    resolved = resolve(requested, device, bf16)
    if resolved == SEGMENT_VARLEN and not segment_varlen_available():
        raise UsageError(f"--attn_implementation {SEGMENT_VARLEN} needs a CUDA GPU and a torch whose varlen_attn "
                         "takes a window_size")
    if (resolved == SEGMENT_VARLEN or resolved.startswith("flash_attention")) and not bf16:
        raise UsageError(f"--attn_implementation {resolved} computes in bfloat16 only: add --bf16, or "
                         f"use {SEGMENT_FLEX} or {SEGMENT_SDPA} for fp32")
    if resolved == SEGMENT_FLEX and training and torch.device(device).type == "cpu":
        raise UsageError(f"--attn_implementation {SEGMENT_FLEX} cannot train on CPU (torch's flex "
                         f"attention has no CPU backward): use {SEGMENT_SDPA}")
    if not attention_dropout or resolved not in (SEGMENT_VARLEN, SEGMENT_FLEX):
        return resolved
    what = ", ".join(f"{k} {v}" for k, v in attention_dropout.items())
    if requested != "auto":
        raise UsageError(f"--attn_implementation {resolved} has no attention dropout and this model's config sets "
                         f"{what}: use {SEGMENT_SDPA}, or --disable_dropout")
    say(f"note: attention {SEGMENT_SDPA}, not {resolved}: the model's config sets {what}, which the "
        "flash kernels do not implement")
    return SEGMENT_SDPA
