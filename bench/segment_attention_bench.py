"""Per-sequence attention of a packed row: the first ``segment_sdpa_attention`` (one q/k/v slice and one SDPA
call per sequence, before commit de9a106) vs the current ``utils.attention.segment_sdpa_attention`` (equal-length
sequences batched into one SDPA call, q/k/v regrouped with one index_select: bench/PROPOSED_segment_sdpa.diff,
applied in de9a106). Checks that both give the same outputs and gradients, and times forward + backward of
one attention layer.

    python bench/segment_attention_bench.py

Why: slicing q, k and v once per sequence makes the backward of every slice (SliceBackward) allocate a zero
tensor of the WHOLE row and add the slice's gradient into it, so a row of S sequences and L tokens costs
O(S * L) memory traffic per layer on top of S SDPA calls: with the demo's ~65-130 sequences of 12 tokens per
row this was most of the attention time (see bench/README.md, profile).
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn.functional as F

from utils.attention import segment_sdpa_attention  # (current)


def sliced_segment_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                        **kwargs):
    """The implementation before de9a106, for packed rows: one slice and one SDPA call per sequence."""
    length = query.shape[2]
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    bounds = ([0] if not starts or starts[0] != 0 else []) + starts + [length]
    gqa = query.shape[1] != key.shape[1]
    parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                            dropout_p=dropout if module.training else 0.0, scale=scaling,
                                            enable_gqa=gqa)
             for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


class _Module(torch.nn.Module):
    pass


def row(lengths, heads=8, kv_heads=4, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = sum(lengths)
    q = torch.randn(1, heads, L, dim, generator=g, requires_grad=True)
    k = torch.randn(1, kv_heads, L, dim, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, L, dim, generator=g, requires_grad=True)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return q, k, v, pos


def run(fn, q, k, v, pos, grad_out):
    for t in (q, k, v):
        t.grad = None
    out, _ = fn(_Module().train(), q, k, v, None, scaling=q.shape[-1] ** -0.5, position_ids=pos)
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


def timed(fn, q, k, v, pos, grad_out, reps=5):
    run(fn, q, k, v, pos, grad_out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run(fn, q, k, v, pos, grad_out)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main():
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rng = torch.Generator().manual_seed(1)
    cases = {
        "demo-like: 66 x ~12 tokens (SFT row of 814)": [int(x) for x in torch.randint(10, 15, (66,), generator=rng)],
        "demo DPO-like: 128 x ~12 tokens": [int(x) for x in torch.randint(10, 15, (128,), generator=rng)],
        "long-tailed: 30 short + 1 x 700": [int(x) for x in torch.randint(20, 60, (30,), generator=rng)] + [700],
        "one sequence of 1400": [1400],
    }
    ok = True
    print(f"{'row':48} {'sliced ms':>10} {'current ms':>11} {'speed-up':>9} {'max |diff|':>11}")
    for name, lengths in cases.items():
        q, k, v, pos = row(lengths)
        grad_out = torch.randn(1, q.shape[2], q.shape[1], q.shape[3], generator=torch.Generator().manual_seed(2))
        o1, g1 = run(sliced_segment_sdpa, q, k, v, pos, grad_out)
        o2, g2 = run(segment_sdpa_attention, q, k, v, pos, grad_out)
        diff = max((o1 - o2).abs().max().item(), *((a - b).abs().max().item() for a, b in zip(g1, g2)))
        ok &= diff < 1e-5
        t1 = timed(sliced_segment_sdpa, q, k, v, pos, grad_out)
        t2 = timed(segment_sdpa_attention, q, k, v, pos, grad_out)
        print(f"{name:48} {1e3 * t1:10.2f} {1e3 * t2:11.2f} {t1 / t2:8.2f}x {diff:11.2e}")
    print("PASS: same outputs and gradients" if ok else "FAIL: outputs or gradients differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
