"""Padding-free rows: the layout of pack_sequences, and packed log-probs equal to each sequence's own."""
import pytest
import torch

from tests.launching import MODEL_DIR, demo_model_dir
from utils.modeling import ResponseLogProbs, load_causal_lm
from utils.packing import pack_sequences
from utils.schema import KINDS, SampleLayout
from utils.token_cache import TokenCache

SEQUENCES = [([1, 5, 6], [7, 8, 9]), ([1, 2], [3]), ([1, 4, 4, 4, 9, 10, 11], [10, 11, 12, 13, 2]), ([1], [20, 2])]


def test_layout():
    batch = pack_sequences(SEQUENCES)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 8, 9, 1, 2, 3, 1, 4, 4, 4, 9, 10, 11, 10, 11, 12, 13, 2, 1, 20, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2]]
    # each target is the next token of the row; only response tokens are targets
    row = batch.input_ids[0]
    assert torch.equal(row[batch.target_positions + 1], batch.target_ids)
    assert batch.target_ids.tolist() == [7, 8, 9, 3, 10, 11, 12, 13, 2, 20, 2]
    assert batch.response_lengths.tolist() == [3, 1, 5, 2]
    assert batch.num_tokens == sum(len(p) + len(r) for p, r in SEQUENCES)


def test_dpo_order_is_chosen_then_rejected():
    records = [{"prompt_id": 0, "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
               {"prompt_id": 1, "prompt_ids": [1, 6], "chosen_ids": [7, 8], "rejected_ids": [9]}]
    sequences = TokenCache.from_records(records, KINDS["dpo"]).sequences([1, 0])
    assert [(p.tolist(), r.tolist()) for p, r in sequences] == [([1, 6], [7, 8]), ([1, 2], [3]), ([1, 6], [9]),
                                                                ([1, 2], [4, 5])]


@pytest.mark.parametrize("attn", ["segment_sdpa", "sdpa", "eager"])
def test_packed_logps_equal_separate_forwards(attn):
    demo_model_dir()
    model = load_causal_lm(MODEL_DIR, attn).eval()
    reference = load_causal_lm(MODEL_DIR, "eager").eval()
    batch = pack_sequences(SEQUENCES)
    with torch.no_grad():
        packed, correct = ResponseLogProbs(model)(batch)
        expected, argmax_hits = [], []
        for prompt, response in SEQUENCES:
            logits = reference(input_ids=torch.tensor([prompt + response])).logits[0]
            rows = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
            logps = torch.log_softmax(logits.float(), -1)[rows]
            expected.append(logps[torch.arange(len(response)), torch.tensor(response)])
            argmax_hits.append(logps.argmax(-1) == torch.tensor(response))
    torch.testing.assert_close(packed, torch.cat(expected), atol=1e-5, rtol=0)
    assert torch.equal(correct, torch.cat(argmax_hits))


def test_segment_attention_gradients_equal_eager():
    """Training through per-sequence SDPA gives the gradients of separate eager forwards."""
    demo_model_dir()
    batch = pack_sequences(SEQUENCES)
    grads = {}
    for attn in ("segment_sdpa", "eager"):
        model = load_causal_lm(MODEL_DIR, attn)
        if attn == "segment_sdpa":
            logps, _ = ResponseLogProbs(model)(batch)
            logps.sum().backward()
        else:
            for prompt, response in SEQUENCES:
                logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
                rows = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
                torch.log_softmax(logits.float(), -1)[rows, torch.tensor(response)].sum().backward()
        grads[attn] = torch.cat([p.grad.flatten() for p in model.parameters()])
    error = (grads["segment_sdpa"] - grads["eager"]).norm() / grads["eager"].norm()
    assert error < 1e-5, error


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_packed_targets_are_the_schemas_trained_tokens(kind):
    """The packer's targets per sequence are what utils.schema counts as trained (it normalises the loss by them),
    empty prompts included."""
    import numpy as np

    rng = np.random.default_rng(0)
    fields = KINDS[kind].id_fields
    records = [{"prompt_id": i, **{f: rng.integers(1, 50, int(rng.integers(0 if f == "prompt_ids" else 2, 6))).tolist()
                                   for f in fields}} for i in range(30)]
    cache = TokenCache.from_records(records, KINDS[kind])
    layout = SampleLayout(KINDS[kind])
    batch = layout.pack(cache, range(30))
    lengths = cache.lengths()
    expected = np.concatenate([KINDS[kind].trained_tokens(lengths, f) for f in KINDS[kind].response_id_fields])
    assert any(len(r["prompt_ids"]) == 0 for r in records)
    assert batch.response_lengths.tolist() == expected.tolist()
    if kind == "sft":
        assert layout.loss_weights(cache).tolist() == expected.tolist()
