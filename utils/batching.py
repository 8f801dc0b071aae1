"""Token-budget batching: pack variable-length samples into padding-free micro-batches.

Every function here is pure (numpy only, no torch.distributed): each rank calls
:func:`token_budget_batches` with the same arguments, gets the same plan for all ranks, and takes its
own column (``step.micro_batches[rank]``).

Vocabulary
----------
* cost of a sample: the tokens it puts into a micro-batch. SFT: ``len(prompt_ids) + len(response_ids)``;
  DPO: a pair is fed as two sequences (prompt+chosen, prompt+rejected) that always stay together, so
  ``2*len(prompt_ids) + len(chosen_ids) + len(rejected_ids)``, or with its prompt shared (the default where
  the attention allows it, ``utils.packing.pack_shared_prompts``) ``len(prompt_ids) + len(chosen_ids) +
  len(rejected_ids)``. The planner only sees the costs.
* ``T`` = ``max_tokens`` (the ``--per_device_train_batch_max_tokens`` flag), ``d`` = batch_tokens_divider,
  ``h`` = gradient accumulation steps, ``W`` = world size, ``G = W*h*d`` bins per optimizer step.
* bin: a set of samples whose costs sum to at most ``T // d`` tokens.
* micro-batch: ``d`` bins concatenated (so at most ``T`` tokens); one forward/backward on one rank.
* step: one optimizer step = ``G`` bins = ``W*h`` micro-batches, ``h`` per rank.

Algorithm of :func:`token_budget_batches`
-----------------------------------------
1. Shuffle. ``rng = numpy.random.default_rng([seed, epoch])``; the samples are permuted with it, so
   everything below is deterministic for one (seed, epoch) and changes from one epoch to the next.
2. Pack, by default in stream order (``group_by_length=False``): each bin takes the shuffled samples in
   turn while they fit, and fills its remaining room with the first of the next ``LOOKAHEAD`` (16) samples
   that fits (:func:`_stream_bins`). Every bin, hence every step, is then a random subset of the epoch,
   as from a shuffled loader, and the bins are still ~99% full (``bench/mixing_bench.py``).
   With ``group_by_length=True`` (TrainingArguments' name: group samples of similar length, the most
   tightly filled bins) the packing is best-fit decreasing: the shuffled samples are stably sorted by
   decreasing cost (equal costs therefore come in random order) and each goes into the open bin with the
   least room that still fits it, or into a new bin. Costs are integers, so the packer works on distinct
   costs, not samples: for a cost ``L`` with ``k`` samples it walks the buckets of bins keyed by free room
   ``r >= L`` in increasing order; under best fit every bin of bucket ``r`` takes ``r // L`` of them in a
   row (after one placement that bin is again the best fit), so a whole bucket is placed with one
   vectorized assignment. Leftovers open new bins of ``cap // L`` samples each. The Python loop runs over
   (distinct cost, bucket) pairs, a few thousand for real data, so 1M samples pack in a fraction of a
   second. Its bins hold samples of similar length, so a step is far from a random batch.
3. Make the bin count divisible by ``G``: the bin with the most samples is split in two halves by count
   (a heap over the few largest bins), repeated until the count is a multiple of ``G``. No sample is
   dropped or duplicated. Fewer than ``G`` samples cannot fill one step: :class:`UsageError`. (In the
   rare tiny case where nearly every sample needs its own bin and the next multiple of ``G`` exceeds the
   sample count, splitting cannot help either: :class:`UsageError` as well.)
4. Group into steps. The bins are sorted by sample count (descending, random tie-break) and dealt to the
   ``S = bins / G`` steps in snake order (0..S-1, S-1..0, ...), which evens out the number of samples
   per step; then the step order is shuffled with the same RNG.
5. Inside a step, the ``G`` bins are sorted by tokens and snake-dealt into ``W*h`` groups of ``d`` bins
   (one micro-batch each, at most ``T`` tokens), then the micro-batches are sorted by tokens and
   snake-dealt to the ``W`` ranks, ``h`` each, which balances the tokens per rank.

Samples per step vary: a bin holds about ``T // d / (mean cost in the bin)`` samples. In stream order a
bin's mean cost is that of a random run of samples, so the spread is modest and step 4 evens it further;
best-fit decreasing packs the shortest samples last, so on long-tailed data a few bins hold many short
samples and a step holding one of them has many more samples than the mean (``auto_get_size.py`` prints
the min and max). Tokens per bin, on the other hand, are almost constant (fill > 99% on realistic data),
which is what a token-level loss normalization cares about.

Each :class:`Step` carries ``loss_weight_total``: the sum of the per-sample loss weights over the whole
step on all ranks (SFT: trained tokens; DPO: pairs), which is the denominator exact loss normalization
needs: each rank sums its per-token (per-pair) losses and divides by that total, and the gradient
all-reduce (a sum over ranks and accumulation steps) then gives exactly the mean over the step.

:func:`token_budget_plan` runs the same pipeline without building the per-rank objects (the arrays only);
``auto_get_size.py`` searches budgets with it. :func:`eval_batches` packs evaluation data (no shuffle,
no divisibility).
"""
import bisect
import heapq
from dataclasses import dataclass, field

import numpy as np

from utils.errors import UsageError


@dataclass
class MicroBatch:
    """One forward/backward on one rank: ``indices`` into the original sample arrays (at most
    ``max_tokens`` tokens in all; for DPO an index is a pair, fed as two sequences). ``loss_weight_total``
    is a copy of the step's total (all ranks)."""
    indices: list
    num_tokens: int
    loss_weight_total: float = 0


@dataclass
class Step:
    """One optimizer step. ``micro_batches[rank]`` is that rank's list of ``h`` micro-batches, in the
    order to run them. ``loss_weight_total`` sums the loss weights of every sample of the step (all
    ranks, all accumulation micro-batches)."""
    micro_batches: list
    num_samples: int
    num_tokens: int
    loss_weight_total: float = 0


@dataclass
class BatchPlan:
    """The arrays behind a list of steps (see :func:`token_budget_plan`).

    ``order`` lists every sample index once, step by step, rank by rank, micro-batch by micro-batch;
    ``mb_bounds`` (length ``num_micro_batches + 1``) cuts it into micro-batches in that order, which is
    ``[step][rank][j]`` flattened. ``step_num_samples`` / ``step_num_tokens`` / ``step_loss_weight`` are
    per step.
    """
    num_samples: int
    num_bins: int
    num_steps: int
    group_size: int
    bin_capacity: int
    world_size: int
    h_accumulation_steps: int
    order: np.ndarray = field(repr=False)
    mb_bounds: np.ndarray = field(repr=False)
    mb_tokens: np.ndarray = field(repr=False)
    step_num_samples: np.ndarray = field(repr=False)
    step_num_tokens: np.ndarray = field(repr=False)
    step_loss_weight: np.ndarray = field(repr=False)

    @property
    def mean_samples_per_step(self):
        return self.num_samples / self.num_steps


# ------------------------------------------------------------------------------ packing


def _check_costs(costs):
    costs = np.asarray(costs)
    if costs.ndim != 1:
        raise UsageError(f"costs must be a 1-D array, got shape {costs.shape}")
    if costs.size == 0:
        raise UsageError("no samples to batch")
    if not np.issubdtype(costs.dtype, np.integer):
        raise UsageError(f"costs must be integers, got {costs.dtype}")
    costs = costs.astype(np.int64, copy=False)
    if costs.min() < 1:
        i = int(np.argmin(costs))
        raise UsageError(f"sample {i} has cost {int(costs[i])}: every sample needs at least one token")
    return costs


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_fits(costs, cap, d, what="max_tokens"):
    worst = int(np.argmax(costs))
    if costs[worst] > cap:
        c = int(costs[worst])
        hint = f"{what} // batch_tokens_divider = {cap}" if d > 1 else f"{what} = {cap}"
        raise UsageError(
            f"sample {worst} costs {c} tokens, more than a bin holds ({hint}); "
            f"the smallest {what} that fits it is {c * d}")


def _stable_argsort(keys):
    """Stable argsort of non-negative integer keys, by 16-bit radix passes (numpy sorts uint16 in
    linear time; a general stable sort of 1M int64 keys is several times slower)."""
    keys = np.asarray(keys, dtype=np.int64)
    top = int(keys.max()) if keys.size else 0
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    shift = 16
    while top >> shift:
        digit = ((keys[order] >> shift) & 0xFFFF).astype(np.uint16)
        order = order[np.argsort(digit, kind="stable")]
        shift += 16
    return order


def _best_fit_decreasing(costs, order, cap):
    """Pack ``costs[order]`` into bins of ``cap`` by best-fit decreasing (ties keep ``order``).

    Returns ``(items, bin_of_item, num_bins)``: ``items`` are the sample indices in decreasing-cost
    order and ``bin_of_item[i]`` the bin of ``items[i]``.
    """
    c = costs[order]
    srt = _stable_argsort(int(c.max()) - c)  # decreasing cost, ties in ``order``
    items, cs = order[srt], c[srt]
    n = cs.size
    starts = np.concatenate(([0], np.flatnonzero(cs[1:] != cs[:-1]) + 1))
    ends = np.append(starts[1:], n)
    bin_of = np.empty(n, dtype=np.int64)
    buckets = {}     # free room -> list of bin ids with exactly that room
    rooms = []       # sorted free-room values with a non-empty bucket
    num_bins = 0
    for L, pos, end in zip(cs[starts].tolist(), starts.tolist(), ends.tolist()):
        k = end - pos
        moved = []   # (new room, bins) to file after this cost is placed
        i = j = bisect.bisect_left(rooms, L)
        while k and j < len(rooms):
            r = rooms[j]
            bins = buckets[r]
            q = r // L
            if len(bins) * q <= k:  # the whole bucket fills up with samples of cost L
                take = len(bins) * q
                bin_of[pos:pos + take] = np.repeat(bins, q)
                pos += take
                k -= take
                del buckets[r]
                moved.append((r - q * L, bins))
                j += 1
                continue
            full, rem = divmod(k, q)
            used = full + (rem > 0)
            if full:
                bin_of[pos:pos + full * q] = np.repeat(bins[:full], q)
                pos += full * q
                moved.append((r - q * L, bins[:full]))
            if rem:
                bin_of[pos:pos + rem] = bins[full]
                pos += rem
                moved.append((r - rem * L, [bins[full]]))
            k = 0
            if used == len(bins):
                del buckets[r]
                j += 1
            else:
                buckets[r] = bins[used:]
        del rooms[i:j]
        if k:  # open new bins: each takes cap // L samples of cost L
            q = cap // L
            full, rem = divmod(k, q)
            nb = full + (rem > 0)
            new = np.arange(num_bins, num_bins + nb)
            bin_of[pos:pos + k] = np.repeat(new, q)[:k]
            if full:
                moved.append((cap - q * L, new[:full].tolist()))
            if rem:
                moved.append((cap - rem * L, [num_bins + full]))
            num_bins += nb
        for room, bins in moved:
            if room <= 0:
                continue
            if room in buckets:
                buckets[room].extend(bins)
            else:
                buckets[room] = list(bins)
                bisect.insort(rooms, room)
    return items, bin_of, num_bins


def _segments(costs, order, cap):
    """Pack and lay the bins out contiguously: (flat sample order, bin starts, bin sizes)."""
    items, bin_of, num_bins = _best_fit_decreasing(costs, order, cap)
    by_bin = _stable_argsort(bin_of)
    flat = items[by_bin]
    sizes = np.bincount(bin_of, minlength=num_bins)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return flat, starts, sizes


LOOKAHEAD = 16  # samples of the stream a bin may take out of turn to fill its room (_stream_bins)


def _stream_bins(costs, order, cap, lookahead=LOOKAHEAD):
    """Pack the shuffled stream ``order`` in turn (next fit): a bin takes the stream's next samples while they
    fit; when the next does not, the first of the following ``lookahead`` samples that fits the room left is
    swapped in (the sample it passes moves to its place, at most ``lookahead`` positions later), until none
    fits. So every bin is a random run of the stream, nearly full. Returns (flat sample order, bin starts, bin
    sizes), bins in stream order. One searchsorted per bin and O(lookahead) numpy work per swap."""
    seq = np.array(order, dtype=np.int64)
    c = costs[seq]
    csum = np.cumsum(c)
    n = seq.size
    starts, pos = [], 0
    while pos < n:
        starts.append(pos)
        base = int(csum[pos - 1]) if pos else 0
        end = int(np.searchsorted(csum, base + cap, side="right"))
        room = base + cap - int(csum[end - 1])
        while lookahead and end < n and room > 0:
            fits = np.flatnonzero(c[end + 1:end + 1 + lookahead] <= room)
            if not fits.size:
                break
            k = end + 1 + int(fits[0])
            csum[end:k] += c[k] - c[end]
            seq[[end, k]], c[[end, k]] = seq[[k, end]], c[[k, end]]
            room -= int(c[end])
            end += 1
        pos = end
    starts = np.array(starts, dtype=np.int64)
    return seq, starts, np.diff(np.append(starts, n))


def _split_to_multiple(starts, sizes, group, n):
    """Split the bins with most samples in halves until the bin count is a multiple of ``group``."""
    num_bins = starts.size
    extra = (-num_bins) % group
    if not extra:
        return starts, sizes
    if num_bins + extra > n:
        raise UsageError(
            f"{n} samples pack into {num_bins} bins, which cannot be split into a multiple of "
            f"{group} (= world_size * h_accumulation_steps * batch_tokens_divider) bins; "
            f"lower that product or raise the token budget")
    top = np.argpartition(-sizes, extra - 1)[:extra] if extra < num_bins else np.arange(num_bins)
    heap = [(-int(sizes[b]), int(starts[b])) for b in top]
    heapq.heapify(heap)
    cuts = []
    for _ in range(extra):
        neg, start = heapq.heappop(heap)
        m = -neg
        if m < 2:  # cannot happen when bins + extra <= n, kept as a guard
            raise UsageError(f"cannot split bins into a multiple of {group}")
        half = m - m // 2
        cuts.append(start + half)
        heapq.heappush(heap, (-half, start))
        heapq.heappush(heap, (-(m // 2), start + half))
    new_starts = np.sort(np.concatenate((starts, cuts)))
    new_sizes = np.diff(np.append(new_starts, n))
    return new_starts, new_sizes


def _snake(p, m):
    """Snake dealing: position ``p`` of a sorted list goes to group ``snake(p, m)`` of ``m``."""
    t, u = np.divmod(p, m)
    return np.where(t % 2 == 0, u, m - 1 - u)


def _gather(flat, starts, sizes, seq):
    """Concatenate the segments ``seq`` of ``flat`` (vectorized)."""
    lens = sizes[seq]
    total = int(lens.sum())
    offs = np.cumsum(lens) - lens
    idx = np.repeat(starts[seq] - offs, lens) + np.arange(total)
    return flat[idx]


def token_budget_plan(costs, max_tokens, *, batch_tokens_divider=1, h_accumulation_steps=1, world_size=1,
                      seed=0, epoch=0, loss_weights=None, group_by_length=False):
    """The plan of :func:`token_budget_batches` as arrays (see :class:`BatchPlan`); same arguments.

    Cheap enough to call many times (``auto_get_size.py`` does, to search budgets).
    """
    costs = _check_costs(costs)
    T = _positive_int("max_tokens", max_tokens)
    d = _positive_int("batch_tokens_divider", batch_tokens_divider)
    h = _positive_int("h_accumulation_steps", h_accumulation_steps)
    W = _positive_int("world_size", world_size)
    for name, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise UsageError(f"{name} must be a non-negative integer, got {value!r}")
    cap = T // d
    if cap < 1:
        raise UsageError(f"max_tokens ({T}) must be at least batch_tokens_divider ({d})")
    G = W * h * d
    n = costs.size
    if n < G:
        raise UsageError(
            f"only {n} samples, but one optimizer step needs at least world_size * h_accumulation_steps * "
            f"batch_tokens_divider = {W}*{h}*{d} = {G} (one per bin); use fewer GPUs/accumulation steps/"
            f"a smaller divider, or more data")
    _check_fits(costs, cap, d)
    if loss_weights is None:
        weights = np.ones(n, dtype=np.int64)
    else:
        weights = np.asarray(loss_weights)
        if weights.shape != (n,):
            raise UsageError(f"loss_weights has shape {weights.shape}, expected ({n},)")

    rng = np.random.default_rng([int(seed), int(epoch)])
    pack = _segments if group_by_length else _stream_bins
    flat, starts, sizes = pack(costs, rng.permutation(n), cap)
    starts, sizes = _split_to_multiple(starts, sizes, G, n)
    B = starts.size
    S = B // G
    bin_tokens = np.add.reduceat(costs[flat], starts)

    # steps: bins by sample count (descending, random ties), snake-dealt over the S steps
    perm = rng.permutation(B)
    by_count = perm[np.argsort(-sizes[perm], kind="stable")]
    p = np.arange(B)
    step_bins = np.empty((S, G), dtype=np.int64)
    step_bins[_snake(p, S), p // S] = by_count
    step_bins = step_bins[rng.permutation(S)]

    # micro-batches: in each step, bins by tokens snake-dealt into M = W*h groups of d bins
    M = W * h
    tok = bin_tokens[step_bins]
    srt = np.argsort(-tok, axis=1, kind="stable")
    step_bins = np.take_along_axis(step_bins, srt, axis=1)
    g = np.arange(G)
    mb_of = _snake(g, M)                                   # micro-batch of each sorted position
    slot = g // M                                          # position inside the micro-batch
    mb_bins = np.empty((S, M, d), dtype=np.int64)
    mb_bins[:, mb_of, slot] = step_bins
    mb_tok = bin_tokens[mb_bins].sum(axis=2)               # (S, M)
    # ranks: micro-batches by tokens snake-dealt over W ranks, h each
    srt = np.argsort(-mb_tok, axis=1, kind="stable")
    m = np.arange(M)
    rank_mb = np.empty((S, W, h), dtype=np.int64)
    rows = np.arange(S)[:, None]
    rank_mb[rows, _snake(m, W)[None, :], (m // W)[None, :]] = srt
    ordered = np.take_along_axis(mb_bins, rank_mb.reshape(S, M)[:, :, None], axis=1)  # (S, M, d)
    mb_tokens = np.take_along_axis(mb_tok, rank_mb.reshape(S, M), axis=1).reshape(-1)

    seq = ordered.reshape(-1)
    order = _gather(flat, starts, sizes, seq)
    mb_sizes = sizes[ordered].sum(axis=2).reshape(-1)
    mb_bounds = np.concatenate(([0], np.cumsum(mb_sizes)))
    step_sizes = mb_sizes.reshape(S, M).sum(axis=1)
    step_bounds = np.concatenate(([0], np.cumsum(step_sizes)[:-1]))
    step_weight = np.add.reduceat(weights[order], step_bounds)
    return BatchPlan(
        num_samples=n, num_bins=B, num_steps=S, group_size=G, bin_capacity=cap, world_size=W,
        h_accumulation_steps=h, order=order, mb_bounds=mb_bounds, mb_tokens=mb_tokens,
        step_num_samples=step_sizes, step_num_tokens=mb_tokens.reshape(S, M).sum(axis=1),
        step_loss_weight=step_weight)


def token_budget_batches(costs, max_tokens, *, batch_tokens_divider=1, h_accumulation_steps=1, world_size=1,
                         seed=0, epoch=0, loss_weights=None, group_by_length=False):
    """Plan one epoch of training as a list of :class:`Step` (see the module docstring).

    ``costs``: per-sample token costs (:func:`sample_costs`); ``max_tokens``: tokens per micro-batch
    (``--per_device_train_batch_max_tokens``); bins hold ``max_tokens // batch_tokens_divider``;
    every step has ``world_size * h_accumulation_steps * batch_tokens_divider`` bins, i.e.
    ``h_accumulation_steps`` micro-batches for each of ``world_size`` ranks. ``loss_weights``
    (:func:`loss_weights`; default 1 per sample) feed ``Step.loss_weight_total``.

    Every sample appears exactly once. Deterministic for (seed, epoch); another epoch gives another
    packing and step order. Raises :class:`UsageError` for a sample over the bin size (naming it and
    the smallest ``max_tokens`` that fits), or fewer samples than bins in one step.
    """
    plan = token_budget_plan(costs, max_tokens, batch_tokens_divider=batch_tokens_divider,
                             h_accumulation_steps=h_accumulation_steps, world_size=world_size,
                             seed=seed, epoch=epoch, loss_weights=loss_weights, group_by_length=group_by_length)
    W, h = plan.world_size, plan.h_accumulation_steps
    order = plan.order.tolist()
    bounds = plan.mb_bounds.tolist()
    mb_tokens = plan.mb_tokens.tolist()
    steps = []
    k = 0
    for s in range(plan.num_steps):
        total = plan.step_loss_weight[s].item()
        ranks = []
        for _ in range(W):
            mbs = []
            for _ in range(h):
                mbs.append(MicroBatch(order[bounds[k]:bounds[k + 1]], mb_tokens[k], total))
                k += 1
            ranks.append(mbs)
        steps.append(Step(ranks, int(plan.step_num_samples[s]), int(plan.step_num_tokens[s]), total))
    return steps


def eval_batches(costs, max_tokens, world_size=1, rank=0):
    """Evaluation batches of this rank: a list of index lists, each at most ``max_tokens`` tokens.

    No shuffle and no divisibility: the samples are packed best-fit decreasing (ties by index) and
    the bins dealt round-robin to the ranks, so ranks may get different numbers of batches (one more
    at most), possibly none. Raises :class:`UsageError` for a sample over ``max_tokens``.
    """
    costs = _check_costs(costs)
    T = _positive_int("max_tokens", max_tokens)
    W = _positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < W:
        raise UsageError(f"rank must be in 0..{W - 1}, got {rank!r}")
    _check_fits(costs, T, 1, what="eval max_tokens")
    flat, starts, sizes = _segments(costs, np.arange(costs.size), T)
    flat = flat.tolist()
    return [flat[a:a + m] for a, m in zip(starts[rank::W].tolist(), sizes[rank::W].tolist())]
