"""The model as the trainer sees it: per-token log-probs of the trained tokens of a packed row."""
import contextlib
import json
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM

from utils import attention
from utils.errors import UsageError
from utils.hf_loading import pretrained_location
from utils.packing import pack_sequences

# Logits are computed in chunks of at most this many (target x vocabulary) entries: 2**26 entries are 256 MiB
# in fp32, whatever the vocabulary size and the number of trained tokens of a micro-batch.
LOGITS_CHUNK_ENTRIES = 1 << 26


def load_causal_lm(path, attn_implementation="auto", dtype=torch.float32, device="cpu", training=True, bf16=False):
    """A causal LM for padding-free rows, on ``device``, with the attention ``utils.attention.resolve`` picks
    for ``attn_implementation`` (``auto``, one of ``utils.attention.IMPLEMENTATIONS`` or a transformers name) and
    the compute precision (``bf16``: under bfloat16 autocast, else fp32). Raises UsageError for an attention that
    cannot run there or that transformers refuses for this model."""
    attn_implementation = attention.resolve(attn_implementation, device, bf16)
    if attn_implementation == attention.SEGMENT_VARLEN and not attention.segment_varlen_available():
        raise UsageError(f"--attn_implementation {attention.SEGMENT_VARLEN} needs a CUDA GPU and a torch whose "
                         "varlen_attn takes a window_size")
    if (attn_implementation == attention.SEGMENT_VARLEN or attn_implementation.startswith("flash_attention")) \
            and not bf16:
        raise UsageError(f"--attn_implementation {attn_implementation} computes in bfloat16 only: add --bf16, or "
                         f"use {attention.SEGMENT_FLEX} or {attention.SEGMENT_SDPA} for fp32")
    if attn_implementation == attention.SEGMENT_FLEX and training and torch.device(device).type == "cpu":
        raise UsageError(f"--attn_implementation {attention.SEGMENT_FLEX} cannot train on CPU (torch's flex "
                         f"attention has no CPU backward): use {attention.SEGMENT_SDPA}")
    adapter = adapter_base(path)
    location, kwargs = pretrained_location(adapter or path)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, attn_implementation=attn_implementation, dtype=dtype,
                                                     **kwargs)
    except ValueError as err:  # e.g. an architecture that refuses every attention named *sdpa* (Gemma 2)
        if "attention" not in str(err):
            raise
        raise UsageError(f"{path} with --attn_implementation {attn_implementation}: "
                         f"{str(err).splitlines()[0]}") from None
    if adapter:  # a LoRA adapter folder: its base model with the adapter merged in
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model.to(device)


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


def add_lora(model, model_args):
    """``model`` with LoRA adapters injected in place (peft; only they and ``lora_modules_to_save`` train);
    returns the PeftModel that saves them. Names as TRL's ModelConfig."""
    from peft import LoraConfig, get_peft_model

    targets = model_args.lora_target_modules
    config = LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
        modules_to_save=[m.strip() for m in model_args.lora_modules_to_save.split(",")]
        if model_args.lora_modules_to_save else None, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. target modules not in the model
        raise UsageError(f"--use_peft: {str(err).splitlines()[0]}") from None


def _chunk_logps(hidden, head, target_ids):
    logits = head(hidden).float()
    token_logps = -F.cross_entropy(logits, target_ids, reduction="none")
    return token_logps, logits.argmax(-1) == target_ids


def token_logps(hidden, head, target_ids, chunk_entries=LOGITS_CHUNK_ENTRIES):
    """Log-probs of ``target_ids`` under ``log_softmax(head(hidden))``, without a whole logits tensor.

    hidden (K, d) -> (token log-probs (K,) float32, argmax hits (K,) bool). The K rows are cut into chunks of
    at most ``chunk_entries // vocab`` rows; each chunk's logits (fp32) exist only while that chunk is
    computed: its forward is checkpointed (``torch.utils.checkpoint``) and recomputed in backward, so the
    memory held for backward is the K x d hidden states, not K x vocab logits. A single chunk runs without
    checkpointing (nothing to save memory on). Exact: the same values and gradients as one big log-softmax.
    """
    rows = max(1, chunk_entries // head.out_features)
    if hidden.shape[0] <= rows:
        return _chunk_logps(hidden, head, target_ids)
    parts = [checkpoint(_chunk_logps, h, head, t, use_reentrant=False)
             for h, t in zip(hidden.split(rows), target_ids.split(rows))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _half_only(model):
    """Whether the model's attention has no fp32 kernel (transformers' flash_attention_*): probes run in bf16."""
    return model.config._attn_implementation.startswith("flash_attention")


@contextlib.contextmanager
def _probing(model):
    """Eval mode without gradients (bf16 autocast for an attention without fp32) for a load-time probe forward;
    the model's mode is restored after; a ValueError of the model's (a feature refused) becomes a UsageError."""
    training = model.training
    model.eval()
    device_type = next(model.parameters()).device.type
    try:
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=_half_only(model)):
            yield
    except ValueError as err:
        raise UsageError(f"{model.config.model_type}: {err}") from None
    finally:
        model.train(training)


def logits_are_head_outputs(model):
    """Whether ``model``'s logits are its output embedding applied to its base model's last hidden states, as
    :func:`token_logps` computes them: False for models that post-process logits (final soft-capping as Gemma 2's,
    a logit scale as Cohere's or Granite's). Decided on a probe of one token, in eval mode, by comparing the two
    on the same forward path: bitwise equal unless something happens after the head (a needless False only costs
    memory). UsageError when the model asks its attention for something ``utils.attention`` does not implement
    (soft-capping, sinks)."""
    ids = torch.ones(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    with _probing(model):
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
        logits = model(input_ids=ids, use_cache=False).logits
        return torch.equal(model.get_output_embeddings()(hidden).float(), logits.float())


class ResponseLogProbs(torch.nn.Module):
    """Wraps a Hugging Face causal LM: ``forward(batch)`` -> per-token log-probs of a ``PackedBatch``'s targets.

    The LM head runs only on the hidden states of positions that predict a trained token, in bounded chunks
    (:func:`token_logps`): prompts cost no logits memory and the response tokens a bounded amount. Models that
    post-process their logits (:func:`logits_are_head_outputs` False: final soft-capping, logit scaling) get their
    own logits at those positions instead (transformers' ``logits_to_keep``): exact, but the (targets x vocabulary)
    logits exist at once. Built after the model is on its device and before its layers are compiled (it runs
    one probe forward).
    """

    def __init__(self, model):
        super().__init__()
        if model.base_model is model:
            raise UsageError(f"{type(model).__name__} has no separate base model to take hidden states from")
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear):  # e.g. --lora_modules_to_save lm_head wraps it
            raise UsageError(f"{type(model).__name__}'s output embedding is a {type(head).__name__}, not a Linear "
                             "layer: LoRA on the LM head (or saving it with the adapter) is not supported")
        self.model = model
        self.head_outputs_are_logits = logits_are_head_outputs(model)
        # the decoder's window (a multimodal model's text config holds it): layers ask for it by their sliding_window
        self.sliding_window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
        self.check_sequences_stay_apart()

    def check_sequences_stay_apart(self):
        """UsageError unless two sequences packed in one row get the log-probs each gets alone (eval mode): a model
        with a layer that mixes the row's sequences (a convolution or state-space layer that does not restart at
        sequence starts, a layer that does not pass the row's layout on) cannot train on packed rows. The first
        sequence has nothing before it in the row, so its difference is rounding alone (other matmul shapes); the
        second's may exceed max(1e-4 in fp32 or 5e-2 in bf16, 100 x that). A smoke test of 8 tokens: what depends on
        a row's length (windows, rope scaling chosen from the longest position) is not exercised."""
        vocab = self.model.get_output_embeddings().out_features
        first, second = ([1], [t % vocab for t in (2, 3, 4, 5)]), ([6 % vocab], [7 % vocab, 8 % vocab])
        device = next(self.model.parameters()).device
        with _probing(self.model):
            packed = self(pack_sequences([first, second]).to(device))[0]
            alone = torch.cat([self(pack_sequences([sequence]).to(device))[0] for sequence in (first, second)])
        n = len(first[1])
        rounding, mixed = ((packed[s] - alone[s]).abs().max().item() for s in (slice(None, n), slice(n, None)))
        if mixed > max(5e-2 if _half_only(self.model) else 1e-4, 100 * rounding):
            raise UsageError(f"{self.model.config.model_type} with attention {self.model.config._attn_implementation}: "
                             f"sequences packed in one row do not stay apart (log-prob difference {mixed:.2g}, "
                             f"rounding {rounding:.2g}): this model cannot train on packed rows")

    def forward(self, batch):
        """``batch``: a ``utils.packing.PackedBatch`` on the model's device. Returns (log-probs of
        ``batch.target_ids`` (K,) float32, whether each is the argmax prediction (K,) bool)."""
        kwargs = attention.packed_attention_kwargs(self.model.config._attn_implementation, batch, self.sliding_window)
        if not self.head_outputs_are_logits:
            logits = self.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                                logits_to_keep=batch.target_positions, **kwargs).logits[0].float()
            return -F.cross_entropy(logits, batch.target_ids, reduction="none"), logits.argmax(-1) == batch.target_ids
        hidden = self.model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                                       **kwargs).last_hidden_state
        return token_logps(hidden[0].index_select(0, batch.target_positions), self.model.get_output_embeddings(),
                           batch.target_ids)
