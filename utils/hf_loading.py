"""Where a model is: a local folder, a single GGUF file or a LoRA adapter folder (its base model); loading its
tokenizer, with clear errors."""
import json
import os

from utils.errors import UsageError


def pretrained_location(path):
    """(from_pretrained argument, extra kwargs): a folder as is; a ``.gguf`` file via ``gguf_file=``."""
    path = str(path)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise UsageError(f"model path '{path}' does not exist")
        return os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    if not os.path.isdir(path):
        raise UsageError(f"model path '{path}' does not exist (expected a folder saved with save_pretrained, or a .gguf file)")
    return path, {}


def load_tokenizer(path):
    from transformers import AutoTokenizer

    location, kwargs = pretrained_location(path)
    try:
        return AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load a tokenizer from '{path}': {str(err).splitlines()[0]}") from None


def adapter_base(path):
    """The base model of a peft adapter folder (from its adapter_config.json), or None for a model folder."""
    config = os.path.join(str(path), "adapter_config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{config} names no base model (base_model_name_or_path)")
    return base
