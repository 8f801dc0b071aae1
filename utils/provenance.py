"""What a cache or a checkpoint belongs to, so that nothing is used with the wrong tokenizer, data or run.

* ``tokenizer_fingerprint``: the identity of a tokenizer (vocabulary, special tokens, chat template). Token-id
  caches record it in their ``.meta.json`` (get_tokenized_data.py) and reference log-prob caches in their
  provenance (get_logits.py); train.py and get_logits.py refuse one made with another tokenizer.
* ``model_fingerprint``: the contents of a model folder (a reference log-prob file records its reference model's:
  train.py refuses to mix splits scored by different models); ``model_identity`` is its cheap form (no weights
  read) for run identities.
* ``run_identity``: what makes a run's sequence of optimizer steps what it is (model, training data, the
  token-budget plan's settings, the number of steps) and the settings its checkpoints restore (optimizer and
  learning-rate schedule). Checkpoints record it; resuming a checkpoint of another run is refused, naming what
  differs.
"""
import hashlib
import json
import os

from utils.errors import UsageError
from utils.hf_loading import adapter_base, pretrained_location
from utils.record_io import file_sha256
from utils.schema import IDENTITY_DEFAULTS


def tokenizer_fingerprint(tokenizer):
    """sha256 (hex) over the vocabulary (token -> id), the special tokens and the chat template."""
    content = {"vocab": sorted(tokenizer.get_vocab().items()),
               "special": sorted(tokenizer.special_tokens_map.items(), key=str),
               "added": sorted((str(k), str(v)) for k, v in tokenizer.added_tokens_decoder.items()),
               "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, (str, type(None)))
               else sorted(tokenizer.chat_template.items())}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def check_cache_tokenizer(path, meta, cache, tokenizer, model_path):
    """Refuse a token-id cache (a TokenCache) made with another tokenizer than the model's (UsageError naming both).

    ``meta``: the cache's ``.meta.json`` (or None). Caches written before fingerprints were recorded are checked
    by their token ids only: every id must be in the tokenizer's vocabulary."""
    if meta and meta.get("tokenizer_fingerprint"):
        if meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise UsageError(
                f"{path} was tokenized with {meta.get('tokenizer')} (vocabulary {meta.get('vocab_size')}), not with "
                f"the tokenizer of {model_path} (vocabulary {len(tokenizer)}): re-tokenize it with "
                f"get_tokenized_data.py --model {model_path}")
        return
    vocab, (largest, i, field) = len(tokenizer), cache.largest_id() or (-1, 0, None)
    if largest >= vocab:
        raise UsageError(f"{path}: {cache.where(i)}: field '{field}': token id {largest} is outside the model's "
                         f"vocabulary ({vocab}): was it tokenized with another tokenizer?")


def model_fingerprint(model_dir):
    """sha256 over the model folder's config and weight files (names and contents); for a LoRA adapter folder, its
    base model's fingerprint too."""
    h = hashlib.sha256()
    base = adapter_base(model_dir)
    if base:
        h.update(model_fingerprint(pretrained_location(base)[0]).encode())
    names = sorted(n for n in os.listdir(model_dir)
                   if n in ("config.json", "adapter_config.json") or n.endswith((".safetensors", ".bin", ".gguf")))
    for name in names:
        h.update(name.encode())
        file_sha256(os.path.join(model_dir, name), h)
    return h.hexdigest()


def model_identity(model_dir):
    """sha256 of the model folder's config and the names and sizes of its weight files (cheap: no weights read)."""
    if os.path.isfile(model_dir):  # a .gguf file
        return hashlib.sha256(f"{os.path.basename(model_dir)}:{os.path.getsize(model_dir)}".encode()).hexdigest()
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name in ("config.json", "adapter_config.json"):
            with open(path, "rb") as f:
                h.update(f.read())
        elif name.endswith((".safetensors", ".bin")):
            h.update(f"{name}:{os.path.getsize(path)}".encode())
    return h.hexdigest()


# the settings that decide which samples make each optimizer step (the plan) and how many steps there are, with the
# sample layout's (``SampleLayout.identity``)
PLAN_SETTINGS = ("per_device_train_batch_max_tokens", "batch_tokens_divider", "h_accumulation_steps", "world_size",
                 "seed", "total_steps", "group_by_length")
# what a checkpoint written before a setting existed did: its plan was made so
SETTING_DEFAULTS = {"group_by_length": False, "resize_token_embeddings": False, **IDENTITY_DEFAULTS}
# the settings a checkpoint's optimizer and scheduler state carries: changed on resume, they would be ignored
RESTORED_SETTINGS = ("optim", "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay",
                     "adam_beta1", "adam_beta2", "adam_epsilon", "use_peft", "lora_r", "lora_alpha", "lora_dropout",
                     "lora_target_modules", "lora_modules_to_save", "resize_token_embeddings")
PATHS = (("model_identity", "model", "model (config and weight files)"), ("train_data_sha256", "train_data", "training data"))


def run_identity(model_path, train_data_path, layout, settings):
    """The run's identity: the model and training data (paths and contents), the sample ``layout``'s identity and
    ``settings``' values of PLAN_SETTINGS and RESTORED_SETTINGS."""
    return {"model": os.path.abspath(model_path), "model_identity": model_identity(model_path),
            "train_data": os.path.abspath(train_data_path), "train_data_sha256": file_sha256(train_data_path),
            **layout.identity(), **{k: settings[k] for k in PLAN_SETTINGS + RESTORED_SETTINGS}}


def identity_differences(saved, current):
    """What differs between two run identities, as readable phrases ([] when they match). Paths alone may differ
    (a moved model or cache): the contents decide."""
    out = []
    for key, path_key, label in PATHS:
        if saved.get(key) != current[key]:
            out.append(f"{label}: {saved.get(path_key)} there, {current[path_key]} here")
    skipped = {name for entry in PATHS for name in entry[:2]}
    settings = {key: saved.get(key, SETTING_DEFAULTS.get(key)) for key in current if key not in skipped}
    out += [f"{key} {settings[key]} there, {current[key]} here" for key in settings if settings[key] != current[key]]
    return out
