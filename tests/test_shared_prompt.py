"""DPO pairs with their prompt once ([prompt][chosen][rejected], utils.packing.pack_shared_prompts) give the
per-token log-probs and the gradient of the unshared rows (prompt+chosen, prompt+rejected), for every loss type,
with uneven micro-batches; the reference pass too. The end-to-end checks (2 processes, ZeRO-2, accumulation,
against an independent pair-mean gradient; reference caches against independent forwards) run train.py and
get_logits.py with the default (shared) in tests/test_dpo.py."""
import numpy as np
import pytest
import torch

from tests.launching import MODEL_DIR, demo_model_dir
from utils import attention
from utils.loss_config import LOSS_TYPES
from utils.modeling import ResponseLogProbs, load_causal_lm
from utils.objectives import DPOObjective
from utils.packing import pack_sequences, pack_shared_prompts
from utils.reference_cache import ReferenceLogProbs
from utils.schema import KINDS, SampleLayout, sample_layout
from utils.token_cache import TokenCache
from utils.token_data import Split

# (prompt, chosen, rejected): an empty prompt (its responses' first tokens are not trained), 1-token responses
SAMPLES = [([1, 5, 6], ([7, 8, 9], [10, 2])), ([], ([3, 4], [5, 6, 7])), ([1, 4, 4, 9], ([11], [12, 13])),
           ([1, 2], ([20, 2], [21]))]


def test_layout():
    batch = pack_shared_prompts(SAMPLES)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 8, 9, 10, 2, 3, 4, 5, 6, 7, 1, 4, 4, 9, 11, 12, 13, 1, 2, 20, 2, 21]]
    # both responses continue from the prompt's end
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 0, 1, 0, 1, 2, 0, 1, 2, 3, 4, 4, 5, 0, 1, 2, 3, 2]]
    assert batch.shared_prompts == ((3, 3, 2), (0, 2, 3), (4, 1, 2), (2, 2, 1))
    assert batch.sequence_lengths == (8, 5, 7, 5) and batch.num_tokens == 25 and batch.num_samples == 4
    # a rejected response's first token is predicted from the prompt's last row, like the chosen one's
    assert batch.target_positions.tolist() == [2, 3, 4, 8, 16, 21, 22, 2, 6, 10, 11, 16, 18, 21]
    unshared = pack_sequences([(p, c) for p, (c, _) in SAMPLES] + [(p, r) for p, (_, r) in SAMPLES])
    assert torch.equal(batch.target_ids, unshared.target_ids)
    assert torch.equal(batch.response_lengths, unshared.response_lengths)


def test_costs_count_the_prompt_once():
    records = [{"prompt_id": i, "prompt_ids": list(p), "chosen_ids": list(c), "rejected_ids": list(r)}
               for i, (p, (c, r)) in enumerate(SAMPLES)]
    cache = TokenCache.from_records(records, KINDS["dpo"])
    shared, _ = sample_layout("dpo", share_prompt=True)
    assert shared.costs(cache).tolist() == [pack_shared_prompts([s]).num_tokens for s in SAMPLES]
    assert sample_layout("dpo")[0].costs(cache).tolist() == [pack_sequences([(p, c), (p, r)]).num_tokens
                                                             for p, (c, r) in SAMPLES]
    sft, _ = sample_layout("sft", share_prompt=True)  # one response: nothing to share, the prompt counts once
    sft_cache = TokenCache.from_records([{"prompt_id": 0, "prompt_ids": [1, 2, 3], "response_ids": [4, 5]}], KINDS["sft"])
    assert sft.costs(sft_cache).tolist() == [5]


def pack_pairs(data, indices, share_prompt):
    """The packed row of the pairs ``indices`` of ``data`` (a Split), its prompts shared or not."""
    return SampleLayout(KINDS["dpo"], share_prompt).pack(data.cache, indices)


def dpo_split(n=12, seed=0):
    """A Split of ``n`` random pairs with uneven prompts (some empty) and responses, and made-up reference
    log-probs."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        prompt = rng.integers(3, 250, int(rng.integers(0, 30)) if i % 5 else 0).tolist()
        records.append({"prompt_id": i, "prompt_ids": prompt,
                        **{f: rng.integers(3, 250, int(rng.integers(2, 12))).tolist() for f in ("chosen_ids", "rejected_ids")}})
    cache = TokenCache.from_records(records, KINDS["dpo"])
    lengths = cache.lengths()
    columns = []
    for response in ("chosen_ids", "rejected_ids"):
        trained = KINDS["dpo"].trained_tokens(lengths, response)
        offsets = np.concatenate(([0], np.cumsum(trained)))
        columns.append((-rng.random(int(offsets[-1])).astype(np.float32) * 5, offsets))
    return Split("train", "x", "x", cache, reference=ReferenceLogProbs("x", {}, tuple(columns)))


@pytest.fixture(scope="module")
def model():
    demo_model_dir()
    return load_causal_lm(MODEL_DIR, attention.SEGMENT_SDPA)


def test_log_probs_equal_unshared(model):
    data = dpo_split()
    indices = list(range(len(data.cache)))
    with torch.no_grad():
        shared, shared_hits = ResponseLogProbs(model.eval())(pack_pairs(data, indices, True))
        unshared, unshared_hits = ResponseLogProbs(model)(pack_pairs(data, indices, False))
    model.train()
    torch.testing.assert_close(shared, unshared, atol=1e-5, rtol=0)
    assert torch.equal(shared_hits, unshared_hits)


def test_flex_forward_equals_unshared_cpu():
    demo_model_dir()
    data, indices = dpo_split(seed=1), list(range(8))
    with torch.no_grad():
        flex = ResponseLogProbs(load_causal_lm(MODEL_DIR, attention.SEGMENT_FLEX, training=False).eval())
        sdpa = ResponseLogProbs(load_causal_lm(MODEL_DIR, attention.SEGMENT_SDPA).eval())
        torch.testing.assert_close(flex(pack_pairs(data, indices, True))[0], sdpa(pack_pairs(data, indices, False))[0],
                                   atol=1e-5, rtol=0)


def step_gradient(model, data, micro_batches, loss_type, share_prompt):
    """The summed-loss gradient of one step made of ``micro_batches`` (lists of pair indices), divided by its pairs,
    as train.py computes it; and the step's loss."""
    objective = DPOObjective(SampleLayout(KINDS["dpo"], share_prompt), loss_type, beta=0.3,
                             label_smoothing=0.1 if loss_type != "ipo" else 0.0,
                             simpo_gamma=0.5 if loss_type == "simpo" else 0.0, seed=3)
    wrapped = ResponseLogProbs(model)
    wrapped.zero_grad()
    pairs = sum(len(m) for m in micro_batches)
    total = 0.0
    for indices in micro_batches:
        batch = objective.collate(data, indices, epoch=1).to("cpu")
        token_logps, correct = wrapped(batch)
        loss_sum, _ = objective.loss(batch, token_logps, correct)
        (loss_sum / pairs).backward()
        total += loss_sum.item() / pairs
    return torch.cat([p.grad.flatten() for p in wrapped.parameters()]), total


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_equals_unshared_for_every_loss_type(model, loss_type):
    """Shared rows, in uneven micro-batches, against the unshared rows of one big batch."""
    data = dpo_split(seed=2)
    shared, shared_loss = step_gradient(model, data, [[0, 1, 2, 3, 4], [5], [6, 7, 8, 9, 10, 11]], loss_type, True)
    unshared, unshared_loss = step_gradient(model, data, [list(range(12))], loss_type, False)
    assert abs(shared_loss - unshared_loss) < 1e-5
    assert unshared.norm() > 0
    assert (shared - unshared).abs().max() <= 1e-5 * max(1.0, unshared.abs().max().item()), \
        (shared - unshared).abs().max()


def test_only_segment_attentions_share_prompts():
    assert attention.shares_prompts("auto", "cpu") and attention.shares_prompts(attention.SEGMENT_FLEX, "cpu")
    assert not attention.shares_prompts("sdpa", "cpu") and not attention.shares_prompts("eager", "cpu")


def test_planned_costs_are_the_packed_row_lengths():
    data = dpo_split(seed=3)
    for share in (True, False):
        objective = DPOObjective(SampleLayout(KINDS["dpo"], share), "sigmoid", 0.1, 0.0, 0.0, seed=0)
        for indices in ([0], [1, 4, 7], list(range(12))):
            assert objective.collate(data, indices).num_tokens == objective.costs(data)[indices].sum()


def test_share_prompt_is_a_dpo_setting():
    from utils.arguments import parse_arguments
    from utils.errors import UsageError

    for flag in (["--share_prompt", "false"], ["--no_share_prompt"]):
        with pytest.raises(UsageError, match="only applies to --training_type dpo"):
            parse_arguments(["--train_data_path", "x.arrow", *flag])


def test_checkpoints_from_before_the_setting_resume_only_unshared():
    """A checkpoint written before --share_prompt existed was planned with a prompt per response."""
    from utils.provenance import PLAN_SETTINGS, RESTORED_SETTINGS, identity_differences

    current = {"model": "m", "model_identity": "i", "train_data": "d", "train_data_sha256": "s",
               **SampleLayout(KINDS["dpo"], share_prompt=True).identity(),
               **dict.fromkeys(PLAN_SETTINGS + RESTORED_SETTINGS, 1), "group_by_length": False}
    assert current["share_prompt"] is True
    old = {k: v for k, v in current.items() if k != "share_prompt"}
    assert identity_differences(old, current) == ["share_prompt False there, True here"]
    assert identity_differences(old, dict(current, share_prompt=False)) == []
