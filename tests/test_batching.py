"""utils/batching.py: property tests over random lengths and settings, plus the error messages."""
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from utils.batching import (
    MicroBatch,
    Step,
    _best_fit_decreasing,
    eval_batches,
    token_budget_batches,
    token_budget_plan,
)
from utils.errors import DataError, UsageError
from utils.record_io import load_records, save_records
from utils.schema import KINDS, sample_layout
from utils.token_cache import TokenCache

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def setups(draw):
    """(costs, max_tokens, d, h, W, weights) with every sample fitting a bin and at least G samples."""
    d = draw(st.integers(1, 3))
    h = draw(st.integers(1, 3))
    W = draw(st.integers(1, 4))
    G = W * h * d
    n = draw(st.integers(G, 120))
    top = draw(st.sampled_from([3, 20, 200]))
    tail = draw(st.booleans())
    costs = draw(st.lists(st.integers(1, top), min_size=n, max_size=n))
    if tail:  # a few long samples
        costs[: n // 10] = [c * 10 for c in costs[: n // 10]]
    cap = max(costs) + draw(st.integers(0, 3 * max(costs)))
    weights = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    return np.array(costs), cap * d + draw(st.integers(0, d - 1)), d, h, W, np.array(weights)


def run(costs, T, d, h, W, weights=None, seed=0, epoch=0):
    try:
        return token_budget_batches(costs, T, batch_tokens_divider=d, h_accumulation_steps=h, world_size=W,
                                    seed=seed, epoch=epoch, loss_weights=weights)
    except UsageError as err:
        # the one legitimate refusal with >= G samples: nearly every sample needs its own bin and the
        # next multiple of G exceeds the sample count (documented in the module)
        assert "cannot be split into a multiple" in str(err)
        assume(False)


def as_tuple(steps):
    return [[[tuple(mb.indices) for mb in rank] for rank in s.micro_batches] for s in steps]


@FAST
@given(setups(), st.integers(0, 3), st.integers(0, 3))
def test_plan_invariants(setup, seed, epoch):
    costs, T, d, h, W, weights = setup
    steps = run(costs, T, d, h, W, weights, seed, epoch)
    n = costs.size
    seen = []
    for s in steps:
        assert isinstance(s, Step)
        assert len(s.micro_batches) == W                                  # every rank ...
        assert all(len(rank) == h for rank in s.micro_batches)            # ... gets exactly h micro-batches
        idx = [i for rank in s.micro_batches for mb in rank for i in mb.indices]
        for rank in s.micro_batches:
            for mb in rank:
                assert isinstance(mb, MicroBatch)
                assert mb.indices, "no empty micro-batch"
                assert mb.num_tokens == int(costs[mb.indices].sum()) <= T
                assert mb.loss_weight_total == s.loss_weight_total
        assert s.num_samples == len(idx)
        assert s.num_tokens == int(costs[idx].sum())
        assert s.loss_weight_total == sum(int(weights[i]) for i in idx)   # independent sum
        seen += idx
    assert sorted(seen) == list(range(n))                                 # every sample exactly once
    plan = token_budget_plan(costs, T, batch_tokens_divider=d, h_accumulation_steps=h, world_size=W,
                             seed=seed, epoch=epoch, loss_weights=weights)
    G = W * h * d
    assert plan.num_bins % G == 0 and plan.num_bins == len(steps) * G   # bins divisible by G
    assert len(plan.mb_bounds) - 1 == len(steps) * W * h
    counts = [s.num_samples for s in steps]
    assert (int(plan.step_num_samples.min()), int(plan.step_num_samples.max())) == (min(counts), max(counts))
    # deterministic for (seed, epoch)
    assert as_tuple(run(costs, T, d, h, W, weights, seed, epoch)) == as_tuple(steps)


@FAST
@given(setups())
def test_bins_respect_divided_budget(setup):
    """Each of the d bins of a micro-batch holds at most T // d tokens: check through the plan with
    divider 1 and world size G, which must give the same steps (auto_get_size relies on it)."""
    costs, T, d, h, W, _ = setup
    steps = run(costs, T, d, h, W)
    same = token_budget_plan(costs, T // d, world_size=W * h * d)
    assert [s.num_samples for s in steps] == same.step_num_samples.tolist()
    assert [s.num_tokens for s in steps] == same.step_num_tokens.tolist()
    assert same.mb_tokens.max() <= T // d


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=40, max_size=150), st.integers(1, 3))
def test_epochs_differ(lengths, W):
    costs = np.array(lengths)
    T = 2 * int(costs.max()) + 20
    plans = [as_tuple(run(costs, T, 1, 1, W, epoch=e)) for e in range(4)]
    assume(len(plans[0]) >= 4)  # a non-trivial plan: several steps to reorder
    assert any(p != plans[0] for p in plans[1:])
    assert as_tuple(run(costs, T, 1, 1, W, seed=1)) != plans[0] or len(plans[0]) < 4


def naive_bfd_loads(costs, cap):
    loads = []
    for c in sorted(costs, reverse=True):
        fits = [i for i, load in enumerate(loads) if load + c <= cap]
        if fits:
            best = min(fits, key=lambda i: cap - loads[i])
            loads[best] += c
        else:
            loads.append(c)
    return sorted(loads)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=200), st.integers(0, 60), st.integers(0, 5))
def test_packer_is_best_fit_decreasing(lengths, extra, seed):
    costs = np.array(lengths)
    cap = int(costs.max()) + extra
    order = np.random.default_rng(seed).permutation(costs.size)
    items, bin_of, num_bins = _best_fit_decreasing(costs, order, cap)
    assert sorted(items.tolist()) == list(range(costs.size))
    loads = np.bincount(bin_of, weights=costs[items], minlength=num_bins).astype(int)
    assert loads.max() <= cap
    assert sorted(loads.tolist()) == naive_bfd_loads(lengths, cap)  # bins with equal room are interchangeable


def test_packing_is_tight_and_fast():
    rng = np.random.default_rng(0)
    costs = np.clip(rng.lognormal(5.0, 1.0, 200_000).astype(np.int64) + 1, 1, 4096)
    t0 = time.perf_counter()
    steps = token_budget_batches(costs, 8192, h_accumulation_steps=2, world_size=4)
    took = time.perf_counter() - t0
    bins = sum(len(r) for s in steps for r in s.micro_batches)
    assert costs.sum() / (bins * 8192) > 0.99  # fill
    assert took < 5, took                      # ~0.1 s here; generous for a loaded machine


def test_too_long_sample_names_index_and_budget():
    costs = np.array([5, 7, 300, 9])
    with pytest.raises(UsageError) as err:
        token_budget_batches(costs, 100)
    assert "sample 2 costs 300 tokens" in str(err.value)
    assert "smallest max_tokens that fits it is 300" in str(err.value)
    with pytest.raises(UsageError) as err:
        token_budget_batches(costs, 400, batch_tokens_divider=2)  # bins of 200 tokens
    assert "sample 2" in str(err.value) and "is 600" in str(err.value) and "200" in str(err.value)
    with pytest.raises(UsageError, match="sample 2 costs 300"):
        eval_batches(costs, 100)


def test_fewer_samples_than_bins_per_step():
    with pytest.raises(UsageError, match=r"only 3 samples.*2\*2\*1 = 4"):
        token_budget_batches(np.array([1, 2, 3]), 10, h_accumulation_steps=2, world_size=2)


@pytest.mark.parametrize("bad", [[], [0, 1], [[1, 2]], [1.5]])
def test_bad_costs(bad):
    with pytest.raises(UsageError):
        token_budget_batches(np.array(bad), 10)


def test_split_keeps_every_sample():
    # 7 samples that pack into one bin, 4 bins per step: split, never drop or duplicate
    steps = token_budget_batches(np.ones(7, dtype=int), 100, world_size=4)
    assert len(steps) == 1
    sizes = sorted(len(mb.indices) for r in steps[0].micro_batches for mb in r)
    assert sizes == [1, 2, 2, 2]
    assert sorted(i for r in steps[0].micro_batches for mb in r for i in mb.indices) == list(range(7))


def test_loss_weight_total_defaults_to_sample_count():
    steps = token_budget_batches(np.arange(1, 50), 100, world_size=2)
    assert all(s.loss_weight_total == s.num_samples for s in steps)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=100), st.integers(1, 4))
def test_eval_batches_cover_once(lengths, W):
    costs = np.array(lengths)
    T = int(costs.max()) + 10
    got = [eval_batches(costs, T, world_size=W, rank=r) for r in range(W)]
    flat = sorted(i for batches in got for b in batches for i in b)
    assert flat == list(range(costs.size))
    assert all(costs[b].sum() <= T for batches in got for b in batches)
    assert max(map(len, got)) - min(map(len, got)) <= 1
    assert got == [eval_batches(costs, T, world_size=W, rank=r) for r in range(W)]


SFT = [{"prompt_id": 0, "prompt_ids": [1, 2, 3], "response_ids": [4, 5]},
       {"prompt_id": "x", "prompt_ids": [], "response_ids": [6, 7]}]  # no prompt: its first token is not trained
DPO = [{"prompt_id": 0, "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
       {"prompt_id": 1, "prompt_ids": [7], "chosen_ids": [8, 9], "rejected_ids": [9]}]


def costs_and_weights(records, kind_name):
    """(costs, loss weights) of cache records as the run's layout of ``kind_name`` counts them."""
    layout, _ = sample_layout(kind_name)
    cache = TokenCache.from_records(records, KINDS[kind_name])
    return layout.costs(cache).tolist(), layout.loss_weights(cache).tolist()


def file_cache(record_file, kind_name):
    """The TokenCache of a RecordFile's records (validated: DataError naming the file, line and field)."""
    return TokenCache.from_records(record_file.records, KINDS[kind_name], record_file.path, record_file.locations)


def test_costs_and_weights():
    assert costs_and_weights(SFT, "sft") == ([5, 2], [2, 1])
    assert costs_and_weights(DPO, "dpo") == ([2 * 2 + 1 + 3, 2 * 1 + 2 + 1], [1, 1])
    with pytest.raises(UsageError):
        sample_layout("ppo")


def test_bad_records_name_file_line_and_field(tmp_path):
    path = tmp_path / "cache.jsonl"
    save_records(path, SFT + [{"prompt_id": 2, "prompt_ids": [1], "response_ids": []}])
    with pytest.raises(DataError) as err:
        file_cache(load_records(path), "sft")
    assert str(err.value) == f"{path}: line 3: field 'response_ids': is empty: the sample has nothing to train on"
    with pytest.raises(DataError, match="line 1: field 'chosen_ids': missing"):
        file_cache(load_records(path), "dpo")
    with pytest.raises(DataError, match="record 0: field 'prompt_ids': expected a list of token ids, found str"):
        TokenCache.from_records([{"prompt_id": 0, "prompt_ids": "abc", "response_ids": [1]}], KINDS["sft"])


# --- well-mixed steps: the default packing (bins from the shuffled stream) ------------------------------------

def lognormal_costs(n, seed=0, sigma=0.8):
    return np.clip(np.rint(np.random.default_rng(seed).lognormal(np.log(300), sigma, n)), 5, 4000).astype(np.int64)


def between_step_share(costs, order, counts):
    """The share of the samples' length variance that lies between steps (eta squared): near 0 when every step
    mixes lengths like the data, near 1 when each step holds samples of one length."""
    bounds = np.concatenate(([0], np.cumsum(counts)))
    x = costs[order].astype(float)
    between = sum((b - a) * (x[a:b].mean() - x.mean()) ** 2 for a, b in zip(bounds[:-1], bounds[1:]))
    return between / ((x - x.mean()) ** 2).sum()


@pytest.mark.parametrize("group_by_length", [False, True])
@given(setups(), st.integers(0, 3))
@FAST
def test_every_sample_once_within_budget_both_packings(group_by_length, setup, seed):
    costs, T, d, h, W, _ = setup
    try:
        plan = token_budget_plan(costs, T // d, world_size=W * h * d, seed=seed, group_by_length=group_by_length)
    except UsageError as err:
        assert "cannot be split into a multiple" in str(err)
        assume(False)
    assert sorted(plan.order.tolist()) == list(range(costs.size))
    assert plan.mb_tokens.max() <= T // d


@pytest.mark.parametrize("G", [2, 4, 8])
def test_random_steps_hold_similar_sample_counts(G):
    """With the token budget as the hard limit, a step's sample count stays within 2x of any other's (>= 8 per
    step), where grouping by length spreads it far more."""
    costs = lognormal_costs(20_000)
    for per_step in (16, 64):
        budget = max(int(costs.max()), int(costs.mean() * per_step / G * 1.02))  # a bin holds the longest sample
        random_plan = token_budget_plan(costs, budget, world_size=G, seed=1)
        counts = random_plan.step_num_samples
        assert counts.min() >= 8 and counts.max() / counts.min() <= 2, (per_step, counts.min(), counts.max())
        assert costs.sum() / (budget * random_plan.num_bins) > 0.95  # and the bins stay full
        grouped = token_budget_plan(costs, budget, world_size=G, seed=1, group_by_length=True).step_num_samples
        assert grouped.max() / grouped.min() > counts.max() / counts.min()


def test_random_steps_mix_lengths_like_random_batches():
    """Steps mix sample lengths as random batches of the same sizes do (the share of length variance between steps
    is no larger than theirs, within 2x), unlike length-grouped bins (most of it)."""
    costs = lognormal_costs(6_000, seed=2)
    for G in (1, 2, 4):
        for per_step in (16, 64):
            budget = max(int(costs.max()), int(costs.mean() * per_step / G * 1.02))
            ours = token_budget_plan(costs, budget, world_size=G, seed=3)
            random_batches = np.random.default_rng(5).permutation(costs.size)  # with our steps' sample counts
            reference = between_step_share(costs, random_batches, ours.step_num_samples)
            assert between_step_share(costs, ours.order, ours.step_num_samples) < 2 * reference, (G, per_step)
            if G == 1:  # the measure tells length-grouped steps apart (with more bins a step mixes grouped bins)
                grouped = token_budget_plan(costs, budget, world_size=G, seed=3, group_by_length=True)
                assert between_step_share(costs, grouped.order, grouped.step_num_samples) > 5 * reference
