"""Attention over packed rows (utils/attention.py) equals attention on each sequence alone, forward and backward,
and a training forward+backward reads nothing from the device on the host (no per-layer synchronisation)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from tests.launching import MODEL_DIR, demo_model_dir
from utils import attention
from utils.modeling import ResponseLogProbs, load_causal_lm
from utils.packing import pack_sequences, pack_shared_prompts

LENGTHS = [7, 1, 19, 7, 3, 19, 2, 7]  # repeated lengths (one SDPA call per length), a 1-token sequence
HEADS, KV_HEADS, DIM = 6, 2, 16
FUNCTIONS = {attention.SEGMENT_SDPA: attention.segment_sdpa_attention,
             attention.SEGMENT_VARLEN: attention.segment_varlen_attention,
             attention.SEGMENT_FLEX: attention.segment_flex_attention}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def skip_if_unavailable(implementation):
    if implementation == attention.SEGMENT_VARLEN and not attention.segment_varlen_available():
        pytest.skip("this torch has no varlen_attn with a window_size")


class Layer(torch.nn.Module):  # what an attention function receives as ``module``
    pass


WINDOW = 4  # a sliding window shorter than most sequences


def causal_attention(q, k, v, window=None):
    """Plain causal SDPA on one sequence (1, H, n, D); with a window, query i sees keys i - window < j <= i."""
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    i = torch.arange(q.shape[2], device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(i[None] <= i[:, None]) & (i[:, None] - i[None] < window))


def per_sequence_attention(q, k, v, window=None, lengths=LENGTHS):
    """Independent reference: plain causal SDPA on each sequence's slice, GQA by repeating the kv heads."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(causal_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], window))
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)  # (1, L, H, D)


def qkv(device, dtype, seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    length = sum(lengths)
    return [torch.randn(1, h, length, DIM, generator=g).to(device, dtype).requires_grad_()
            for h in (HEADS, KV_HEADS, KV_HEADS)]


def packed_batch(device, lengths=LENGTHS):
    return pack_sequences([([1] * (n - 1), [2]) if n > 1 else ([], [2]) for n in lengths]).to(device)


def check_against_reference(implementation, device, dtype, atol, backward=True, window=None, lengths=LENGTHS):
    layer = Layer().train()
    q, k, v = (t.requires_grad_(backward) for t in qkv(device, dtype, lengths=lengths))
    kwargs = attention.packed_attention_kwargs(implementation, packed_batch(device, lengths), window)
    out, _ = FUNCTIONS[implementation](layer, q, k, v, None, scaling=DIM ** -0.5, sliding_window=window, **kwargs)
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    expected = per_sequence_attention(q2, k2, v2, window, lengths)
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=0)
    if backward:
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        expected_grads = torch.autograd.grad(expected, (q2, k2, v2), grad_out.float())
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)


@pytest.mark.parametrize("window", [None, WINDOW])
def test_segment_sdpa_equals_per_sequence_cpu(window):
    check_against_reference(attention.SEGMENT_SDPA, "cpu", torch.float32, 1e-5, window=window)


@pytest.mark.parametrize("window", [None, WINDOW])
def test_segment_flex_forward_equals_per_sequence_cpu(window):
    """torch's flex attention has no backward on CPU: the forward (reference log-probs) is checked here."""
    check_against_reference(attention.SEGMENT_FLEX, "cpu", torch.float32, 1e-5, backward=False, window=window)


@CUDA
@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("implementation", attention.IMPLEMENTATIONS)
def test_packed_attention_equals_per_sequence_cuda(implementation, window):
    skip_if_unavailable(implementation)
    check_against_reference(implementation, "cuda", torch.bfloat16, 2e-2, window=window)


@CUDA
@pytest.mark.parametrize("window", [None, 200])
@pytest.mark.parametrize("implementation", attention.IMPLEMENTATIONS)
def test_long_rows_cuda(implementation, window):
    """Rows of many 128-position tiles: flex's full and skipped tiles, varlen's blocks, windows across tiles."""
    skip_if_unavailable(implementation)
    check_against_reference(implementation, "cuda", torch.bfloat16, 2e-2, window=window, lengths=[700, 1, 300, 129, 45])


# shared-prompt pairs (prompt, chosen, rejected): equal shapes (one SDPA group), no prompt, 1-token responses
PAIRS = [(5, 3, 4), (5, 3, 4), (0, 2, 3), (9, 1, 6), (2, 7, 1), (5, 4, 3)]


def shared_reference(q, k, v, window=None):
    """Independent reference for a shared-prompt row: each response runs as its own plain causal sequence
    prompt + response (rows gathered by hand); the prompt rows take their output from the first."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out = [None] * q.shape[2]
    start = 0
    for p, c, r in PAIRS:
        prompt = list(range(start, start + p))
        for rows, keep in ((prompt + list(range(start + p, start + p + c)), None),
                           (prompt + list(range(start + p + c, start + p + c + r)), p)):
            o = causal_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], window)
            for j, row in enumerate(rows[keep:] if keep is not None else rows):
                out[row] = o[0, :, (keep or 0) + j]
        start += p + c + r
    return torch.stack(out)[None]  # (1, L, H, D)


def shared_batch(device):
    return pack_shared_prompts([([1] * p, ([2] * c, [3] * r)) for p, c, r in PAIRS]).to(device)


def check_shared_against_reference(implementation, device, dtype, atol, backward=True, window=None):
    length = sum(map(sum, PAIRS))
    g = torch.Generator().manual_seed(1)
    q, k, v = [torch.randn(1, h, length, DIM, generator=g).to(device, dtype).requires_grad_(backward)
               for h in (HEADS, KV_HEADS, KV_HEADS)]
    kwargs = attention.packed_attention_kwargs(implementation, shared_batch(device), window)
    out, _ = FUNCTIONS[implementation](Layer().train(), q, k, v, None, scaling=DIM ** -0.5, sliding_window=window,
                                       **kwargs)
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    expected = shared_reference(q2, k2, v2, window)
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=0)
    if backward:
        grad_out = torch.randn_like(out)
        for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                             torch.autograd.grad(expected, (q2, k2, v2), grad_out.float())):
            torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)


@pytest.mark.parametrize("window", [None, WINDOW])
def test_shared_prompt_segment_sdpa_equals_separate_sequences_cpu(window):
    groups = attention.SegmentGroups(shared_batch("cpu").sequence_lengths, "cpu", shared_batch("cpu").shared_prompts)
    assert (8, 0, 2) in groups.sizes and (4, 5, 2) in groups.sizes  # equal shapes share one call
    check_shared_against_reference(attention.SEGMENT_SDPA, "cpu", torch.float32, 1e-5, window=window)


@pytest.mark.parametrize("window", [None, WINDOW])
def test_shared_prompt_segment_flex_forward_equals_separate_sequences_cpu(window):
    check_shared_against_reference(attention.SEGMENT_FLEX, "cpu", torch.float32, 1e-5, backward=False, window=window)


def dense_document_mask(sequence_lengths, shared_prompts, window=None):
    """Independent reference: (L, L) bool, q attends to k iff same sequence, k <= q, (shared prompts) k is in the
    prompt or in q's own response, and (window) their positions differ by less than the window (a later response's
    positions continue from its prompt's end)."""
    sequence = torch.repeat_interleave(torch.arange(len(sequence_lengths)), torch.tensor(sequence_lengths))
    parts = shared_prompts or [(n,) for n in sequence_lengths]
    branch = torch.repeat_interleave(torch.tensor([j for sizes in parts for j in range(len(sizes))]),
                                     torch.tensor([n for sizes in parts for n in sizes]))
    positions = torch.cat([torch.cat([torch.arange(sum(sizes[:2]))] + [torch.arange(sizes[0], sizes[0] + r)
                                                                    for r in sizes[2:]]) for sizes in parts])
    q, k = torch.arange(len(sequence))[:, None], torch.arange(len(sequence))[None]
    mask = (sequence[q] == sequence[k]) & (k <= q) & ((branch[k] == 0) | (branch[k] == branch[q]))
    if window is not None:
        mask &= positions[q] - positions[k] < window
    return mask


def test_block_mask_from_layout_equals_create_block_mask():
    """The flex BlockMask built from the row's layout on the host has exactly the tiles (partial and full, in both
    directions) of torch's create_block_mask evaluated over the whole mask; rows that do not fill their last tile,
    prompts and responses crossing tile edges, tiles of 4 to 16 positions, sliding windows of 1 to 40 positions."""
    from torch.nn.attention.flex_attention import create_block_mask

    rng = np.random.default_rng(0)
    layouts = [([5], None, 4), ([8, 8], None, 4), ([3, 9], [(1, 1, 1), (4, 3, 2)], 4), ([12], [(4, 4, 4)], 4)]
    for _ in range(60):
        if rng.random() < 0.5:
            layouts.append(([int(n) for n in rng.integers(1, 40, rng.integers(1, 6))], None, int(rng.choice([4, 8, 16]))))
        else:
            shared = [tuple(int(n) for n in rng.integers(1, 30, rng.integers(2, 4))) for _ in range(rng.integers(1, 5))]
            layouts.append(([sum(sizes) for sizes in shared], shared, int(rng.choice([4, 8, 16]))))
    for (lengths, shared, block), window in zip(layouts, [None, 1, 4, 5] + [None, int(rng.integers(1, 40))] * 30):
        dense = dense_document_mask(lengths, shared, window)
        want = create_block_mask(lambda b, h, q, k: dense[q, k], None, None, len(dense), len(dense), "cpu",
                                 BLOCK_SIZE=block)
        got = attention.document_block_mask(lengths, "cpu", shared, block_size=block, sliding_window=window)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (lengths, shared, block, window, name)
        q, k = torch.arange(len(dense))[:, None], torch.arange(len(dense))[None]
        assert torch.equal(got.mask_mod(0, 0, q, k), dense)


@CUDA
@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("implementation", attention.IMPLEMENTATIONS)
def test_shared_prompt_attention_equals_separate_sequences_cuda(implementation, window):
    skip_if_unavailable(implementation)
    check_shared_against_reference(implementation, "cuda", torch.bfloat16, 2e-2, window=window)


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """A CPU stand-in for torch's varlen_attn with flash attention's semantics: sequence i is q[cu_q[i]:cu_q[i+1]]
    against k[cu_k[i]:cu_k[i+1]], window (left, 0) = causal aligned to the lower right, keys at most ``left`` rows
    before the query's aligned row (-1: all)."""
    left, right = window_size
    assert right == 0 and left >= -1
    outs = []
    for i in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        n, m = qs.stop - qs.start, ks.stop - ks.start
        assert n <= max_q and m <= max_k
        mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)
        if left >= 0:
            mask = mask.triu(m - n - left)
        o = F.scaled_dot_product_attention(*(t[s].transpose(0, 1)[None] for t, s in ((q, qs), (k, ks), (v, ks))),
                                           attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("shared", [False, True])
def test_segment_varlen_layout_with_a_reference_kernel_cpu(monkeypatch, shared, window):
    """What segment_varlen hands the kernel (query ranges, gathered keys, offsets, window), checked on CPU with a
    stand-in for torch's varlen_attn; the real kernel runs in the CUDA tests."""
    import torch.nn.attention.varlen

    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn", reference_varlen)
    attention._varlen.cache_clear()
    monkeypatch.setattr(attention, "_varlen", attention._varlen.__wrapped__)  # not cached: the stand-in goes away
    if shared:
        check_shared_against_reference(attention.SEGMENT_VARLEN, "cpu", torch.float32, 1e-5, window=window)
    else:
        check_against_reference(attention.SEGMENT_VARLEN, "cpu", torch.float32, 1e-5, window=window)


@pytest.mark.parametrize("implementation", [attention.SEGMENT_SDPA, attention.SEGMENT_FLEX])
def test_layers_asking_for_what_the_row_was_not_laid_out_for_are_refused(implementation):
    q, k, v = (t.detach() for t in qkv("cpu", torch.float32))
    kwargs = attention.packed_attention_kwargs(implementation, packed_batch("cpu"))  # no window
    with pytest.raises(ValueError, match="sliding window 4"):
        FUNCTIONS[implementation](Layer().eval(), q, k, v, None, sliding_window=WINDOW, **kwargs)
    with pytest.raises(ValueError, match="soft-capping"):
        FUNCTIONS[implementation](Layer().eval(), q, k, v, None, softcap=30.0, **kwargs)
    with pytest.raises(ValueError, match="sinks"):
        FUNCTIONS[implementation](Layer().eval(), q, k, v, None, s_aux=torch.zeros(HEADS), **kwargs)
    with pytest.raises(ValueError, match="an attention argument .position_bias."):
        FUNCTIONS[implementation](Layer().eval(), q, k, v, None, position_bias=torch.zeros(1), **kwargs)
    # a window no sequence is longer than changes nothing: the plain layout serves it
    out, _ = FUNCTIONS[implementation](Layer().eval(), q, k, v, None, sliding_window=max(LENGTHS), **kwargs)
    torch.testing.assert_close(out, per_sequence_attention(q, k, v), atol=1e-5, rtol=0)


def test_position_fallback_refuses_shared_prompt_rows():
    with pytest.raises(ValueError, match="neither continue nor restart"):
        attention.SegmentGroups.from_position_ids(shared_batch("cpu").position_ids[0], "cpu")


def test_shared_prompt_rows_refuse_other_attentions():
    with pytest.raises(ValueError, match="shared prompts"):
        attention.packed_attention_kwargs("sdpa", shared_batch("cpu"))


def test_segment_groups_from_position_ids_equal_layout():
    """The fallback that reads position_ids (callers without a layout) groups the row as the packer does."""
    batch = packed_batch("cpu")
    from_layout = attention.SegmentGroups(batch.sequence_lengths)
    from_positions = attention.SegmentGroups.from_position_ids(batch.position_ids[0], "cpu")
    assert from_layout.sizes == from_positions.sizes == ((7, 0, 3), (1, 0, 1), (19, 0, 2), (3, 0, 1), (2, 0, 1))
    assert torch.equal(from_layout.q_perm, from_positions.q_perm)
    assert torch.equal(from_layout.q_perm[from_layout.inverse], torch.arange(sum(LENGTHS)))


def test_auto_picks_segment_sdpa_on_cpu():
    assert attention.resolve("auto", "cpu") == attention.SEGMENT_SDPA
    assert attention.resolve("sdpa", "cpu") == "sdpa"


# ops that read a tensor's value on the host: each one waits for the device on CUDA
HOST_READS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::masked_select",
              "aten::unique", "aten::_unique2"}


def test_training_forward_backward_reads_no_device_values():
    demo_model_dir()
    model = ResponseLogProbs(load_causal_lm(MODEL_DIR, attention.SEGMENT_SDPA))
    batch = pack_sequences([([1, 5, 6], [7, 8, 9]), ([1, 2], [3]), ([1, 4, 4, 4, 9], [10, 11, 2]), ([1, 7], [20, 2])])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        token_logps, _ = model(batch)
        token_logps.sum().backward()
    ops = {event.key for event in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in ops  # the profile does see the model's ops
    assert not ops & HOST_READS, sorted(ops & HOST_READS)


@CUDA
def test_cuda_training_step_never_synchronises():
    """The whole micro-batch path on CUDA with torch's sync debug mode set to error: collate, copy, forward,
    loss, backward."""
    from utils.objectives import SFTObjective
    from utils.schema import KINDS, SampleLayout
    from utils.token_cache import TokenCache
    from utils.token_data import Split

    demo_model_dir()
    model = ResponseLogProbs(load_causal_lm(MODEL_DIR, "auto", torch.float32, "cuda", bf16=True))
    records = [{"prompt_id": 0, "prompt_ids": [1, 5, 6], "response_ids": [7, 8, 9]},
               {"prompt_id": 1, "prompt_ids": [1, 2], "response_ids": [3]}]
    split = Split("train", "x", "x", TokenCache.from_records(records, KINDS["sft"]))
    objective = SFTObjective(SampleLayout(KINDS["sft"]))
    with torch.autocast("cuda", dtype=torch.bfloat16):  # warm-up: lazy initialisation may synchronise
        batch = objective.collate(split, [0, 1]).to("cuda")
        objective.loss(batch, *model(batch))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            batch = objective.collate(split, [0, 1]).to("cuda")
            loss, _ = objective.loss(batch, *model(batch))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
