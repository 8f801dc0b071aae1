"""Architectures beyond Llama's: sliding-window attention (Mistral, Gemma 2) and post-processed logits (Gemma 2's
final soft-capping) give, packed, exactly the log-probs of transformers' own eager forward on each sequence alone;
what the segment attentions do not implement (attention soft-capping) is refused at load with one clear line."""
import pytest
import torch
from transformers import (AutoModelForCausalLM, CohereConfig, FalconH1Config, Gemma2Config, Gemma3Config,
                          MiniMaxConfig, MistralConfig, StableLmConfig)

from tests.launching import MODEL_DIR, demo_model_dir
from utils import attention
from utils.errors import UsageError
from utils.modeling import ResponseLogProbs, load_causal_lm, logits_are_head_outputs
from utils.packing import pack_sequences, pack_shared_prompts

WINDOW = 4
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
# (prompt, chosen, rejected) token ids: most sequences longer than the window
PAIRS = [([3, 9, 4, 7, 1], [5, 6, 8], [2, 2, 7, 9]), ([11, 12], [13, 14, 15, 16, 17, 18], [19]),
         ([20, 21, 22, 23, 24, 25, 26], [27, 28], [29, 30, 31])]


def tiny(config, implementation):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    return model.float().eval()


def eager_logps(model, prompt, response):
    """Independent reference: transformers' eager attention (its own sliding-window mask) on the sequence alone."""
    eager = tiny(model.config.__class__(**model.config.to_dict()), "eager")
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = eager(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logps = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    return logps.gather(1, torch.tensor(response)[:, None])[:, 0]


def check_packed_equals_eager(config, implementation, shared_prompts=True):
    model = tiny(config, implementation)
    wrapped = ResponseLogProbs(model)
    expected = torch.cat([eager_logps(model, p, c) for p, c, _ in PAIRS] + [eager_logps(model, p, r) for p, _, r in PAIRS])
    with torch.no_grad():
        packed = wrapped(pack_sequences([(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS]))[0]
        torch.testing.assert_close(packed, expected, atol=1e-5, rtol=0)
        if shared_prompts:
            shared = wrapped(pack_shared_prompts([(p, (c, r)) for p, c, r in PAIRS]))[0]
            torch.testing.assert_close(shared, expected, atol=1e-5, rtol=0)
    return wrapped


@pytest.mark.parametrize("implementation", [attention.SEGMENT_SDPA, attention.SEGMENT_FLEX])
def test_sliding_window_model_equals_eager_per_sequence(implementation):
    wrapped = check_packed_equals_eager(MistralConfig(sliding_window=WINDOW, **SIZES), implementation)
    assert wrapped.head_outputs_are_logits


def test_soft_capped_logits_and_alternating_windows_equal_eager_per_sequence():
    """Gemma 2: every other layer has a sliding window; logits soft-capped after the head (so the model's own
    logits are used, not the chunked head). transformers refuses any attention named *sdpa* for Gemma 2."""
    config = Gemma2Config(sliding_window=WINDOW, final_logit_softcapping=30.0, attn_logit_softcapping=None, **SIZES)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    wrapped = check_packed_equals_eager(config, attention.SEGMENT_FLEX)
    assert not wrapped.head_outputs_are_logits


def test_a_multimodal_model_takes_its_window_from_its_text_config():
    """Gemma 3 checkpoints load as Gemma3ForConditionalGeneration: the window is in config.text_config."""
    config = Gemma3Config(text_config=dict(sliding_window=WINDOW, **SIZES),
                          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    assert getattr(config, "sliding_window", None) is None
    check_packed_equals_eager(config, attention.SEGMENT_FLEX)


@pytest.mark.parametrize("implementation", [attention.SEGMENT_SDPA, attention.SEGMENT_FLEX])
def test_a_model_that_does_not_hand_the_layout_to_its_attention_stays_exact(implementation):
    """StableLM's layers pass its attention only position_ids: the sequences come from them (a host read; shared
    prompts cannot be read from positions and are refused)."""
    config = StableLmConfig(**{k: v for k, v in SIZES.items() if k != "head_dim"})
    check_packed_equals_eager(config, implementation, shared_prompts=False)


def test_scaled_logits_have_the_gradients_of_the_model_own_forward():
    """Cohere scales its logits after the head: training on the model's own logits at the targets is exact."""
    config = CohereConfig(logit_scale=0.0625, **SIZES)
    model = tiny(config, attention.SEGMENT_SDPA).train()
    wrapped = ResponseLogProbs(model)
    assert not wrapped.head_outputs_are_logits
    logps = wrapped(pack_sequences([(p, c) for p, c, _ in PAIRS]))[0]
    grads = torch.autograd.grad(logps.sum(), list(model.parameters()))
    eager = tiny(config, "eager").train()
    eager.load_state_dict(model.state_dict())
    total = 0
    for p, c, _ in PAIRS:
        logits = eager(input_ids=torch.tensor([p + c])).logits[0].float()
        total = total + torch.log_softmax(logits, -1)[len(p) - 1:-1].gather(1, torch.tensor(c)[:, None]).sum()
    for got, want in zip(grads, torch.autograd.grad(total, list(eager.parameters()))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_attention_soft_capping_is_refused_at_load():
    model = tiny(Gemma2Config(attn_logit_softcapping=50.0, **SIZES), attention.SEGMENT_FLEX)
    with pytest.raises(UsageError, match="gemma2: .*soft-capping.*--attn_implementation eager"):
        ResponseLogProbs(model)


def test_llama_logits_are_its_head_outputs():
    demo_model_dir()
    assert logits_are_head_outputs(load_causal_lm(MODEL_DIR, attention.SEGMENT_SDPA))


def test_an_attention_transformers_refuses_for_the_model_is_one_line(tmp_path):
    tiny(Gemma2Config(**SIZES), "eager").save_pretrained(tmp_path)
    with pytest.raises(UsageError, match="with --attn_implementation segment_sdpa: Gemma2ForCausalLM does not support"):
        load_causal_lm(tmp_path, attention.SEGMENT_SDPA)


@pytest.mark.parametrize("config_class", [FalconH1Config, MiniMaxConfig])
def test_a_model_whose_layers_mix_packed_sequences_is_refused_at_load(config_class):
    """Falcon-H1's Mamba layers and MiniMax's linear attention carry state across the row: the load-time check
    (two sequences packed vs each alone) refuses them in one line instead of training on mixed sequences."""
    config = config_class(**{k: v for k, v in SIZES.items() if k in config_class().to_dict()}, pad_token_id=0)
    with pytest.raises(UsageError, match="sequences packed in one row do not stay apart"):
        ResponseLogProbs(tiny(config, attention.SEGMENT_SDPA))


def _with_hook(hook):
    """The demo model with ``hook`` on every decoder layer's MLP output (a (1, L, d) tensor of the packed row)."""
    demo_model_dir()
    model = load_causal_lm(MODEL_DIR, attention.SEGMENT_SDPA)
    for layer in model.model.layers:
        layer.mlp.register_forward_hook(lambda module, args, out: hook(out))
    return model


def test_rounding_that_depends_on_the_row_offset_is_not_mixing():
    """A real model's matmuls round a sequence's rows differently at another row offset (SmolLM2 in fp32: up to
    4.7e-4 in log-prob, more in bf16): stand-in noise of that kind (a function of the row index alone, 1e-2 on the
    activations, far above fp32 rounding: the old fixed bound refused it from 1e-3 on) is not sequences mixing."""
    def offset_noise(out):
        rows, width = torch.arange(out.shape[1])[:, None], torch.arange(out.shape[2])[None, :]
        return out + 1e-2 * torch.sin(1.7 * rows + 0.3 * width)

    wrapped = ResponseLogProbs(_with_hook(offset_noise))
    assert "packed sequences stay apart" in wrapped.load_checks[1]


def test_a_layer_that_leaks_a_little_into_the_next_sequence_is_refused():
    """A convolution-like layer that carries 1% of each row into the next one (across sequence starts) mixes the
    row, however little: refused (the old fixed bound let such leaks through when below 1e-4)."""
    def leak(out):
        return torch.cat([out[:, :1], out[:, 1:] + 0.01 * out[:, :-1]], dim=1)

    with pytest.raises(UsageError, match="sequences packed in one row do not stay apart"):
        ResponseLogProbs(_with_hook(leak))


def test_a_mixture_of_experts_model_passes_the_packing_check():
    """MoE layers batch tokens per expert: another sequence's tokens change those batches and so the rounding of
    this one's, earlier in the row as later; not mixing."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(**SIZES, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    assert "packed sequences stay apart" in ResponseLogProbs(tiny(config, attention.SEGMENT_SDPA)).load_checks[1]


def with_dropout(folder, rate=0.5):
    """A copy of the demo model (weights, tokenizer) whose config sets attention_dropout ``rate``."""
    import json
    import shutil

    demo_model_dir()
    shutil.copytree(MODEL_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, attention_dropout=rate)))
    return folder


def test_disabled_dropout_makes_training_mode_compute_what_eval_mode_computes(tmp_path):
    """Llama's attention layers read their dropout rate from the config as a number (no nn.Dropout to switch off):
    load_causal_lm(dropout=False) zeroes the config's rates, so the policy in training mode computes what the
    reference computed in eval mode (DPO step 1 is ln 2); with dropout the training-mode forward is another."""
    folder = with_dropout(tmp_path / "dropout")
    ids = torch.tensor([[5, 9, 23, 7, 11, 40, 3, 8]])

    def logits(model, training):
        with torch.no_grad():
            return model.train(training)(input_ids=ids).logits

    off = load_causal_lm(folder, attention.SEGMENT_SDPA, dropout=False)
    assert torch.equal(logits(off, True), logits(off, False))
    on = load_causal_lm(folder, attention.SEGMENT_SDPA)
    assert not torch.allclose(logits(on, True), logits(on, False), atol=1e-3)
    torch.testing.assert_close(logits(on, False), logits(off, False), atol=0, rtol=0)


def test_an_attention_without_dropout_is_not_given_a_model_with_attention_dropout(tmp_path, monkeypatch):
    """segment_varlen and segment_flex (CUDA) raised ValueError at the first training forward of a model with
    attention dropout (the load-time probes run in eval mode): decided at load, auto takes segment_sdpa instead, an
    explicit choice is refused in one line."""
    from transformers import AutoConfig

    from utils.modeling import dropout_settings

    config = AutoConfig.from_pretrained(with_dropout(tmp_path / "dropout", 0.1))

    def rates():  # the config's attention dropout rates, as load_causal_lm hands them to attention.choose
        return {name: p for _, name, p in dropout_settings(config) if "att" in name}

    # what auto picks on a CUDA device: segment_varlen with --bf16 where its kernel is there, else segment_flex
    monkeypatch.setattr(attention, "segment_varlen_available", lambda: True)
    said = []
    for kernel, bf16 in ((attention.SEGMENT_VARLEN, True), (attention.SEGMENT_FLEX, False)):
        assert attention.resolve("auto", "cuda", bf16) == kernel
        assert attention.choose("auto", "cuda", bf16, True, rates(), said.append) == attention.SEGMENT_SDPA
        with pytest.raises(UsageError, match=f"--attn_implementation {kernel} has no attention dropout and this "
                                             "model's config sets attention_dropout 0.1"):
            attention.choose(kernel, "cuda", bf16, True, rates())
    assert len(said) == 2 and "attention_dropout 0.1" in said[0]
    assert attention.choose("segment_sdpa", "cpu", False, True, rates()) == attention.SEGMENT_SDPA
    config.attention_dropout = 0.0
    assert attention.choose("auto", "cuda", False, True, rates()) == attention.SEGMENT_FLEX


def test_fp32_on_cuda_is_never_given_a_flash_kernel():
    assert attention.resolve("auto", "cuda", half_precision=False) == attention.SEGMENT_FLEX


def test_flash_kernels_need_bf16():
    demo_model_dir()
    with pytest.raises(UsageError, match="flash_attention_2 computes in bfloat16 only: add --bf16"):
        load_causal_lm(MODEL_DIR, "flash_attention_2")
