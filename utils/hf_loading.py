"""Loading tokenizers (and models) from a local folder or a single GGUF file, with clear errors."""
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
