"""The model as the trainer sees it: per-token log-probs of the trained tokens of a packed row."""
import contextlib
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from utils import attention
from utils.errors import UsageError
from utils.hf_loading import adapter_base, load_tokenizer, pretrained_location
from utils.packing import pack_sequences

# Logits are computed in chunks of at most this many (target x vocabulary) entries: 2**26 entries are 256 MiB
# in fp32, whatever the vocabulary size and the number of trained tokens of a micro-batch.
LOGITS_CHUNK_ENTRIES = 1 << 26
# The load-time packing check (ResponseLogProbs.check_sequences_stay_apart): (prompt, response) lengths of the
# sequences A, S, C of its row, and how far changing A may move S's log-probs, in multiples of what changing C does.
PROBE_LENGTHS = ((16, 8), (12, 8), (8, 4))
ROUNDING_MARGIN = 10


def load_causal_lm(path, attn_implementation="auto", dtype=torch.float32, device="cpu", training=True, bf16=False,
                   dropout=True, say=print):
    """A causal LM for padding-free rows, on ``device``, with the attention ``utils.attention.resolve`` picks
    for ``attn_implementation`` (``auto``, one of ``utils.attention.IMPLEMENTATIONS`` or a transformers name) and
    the compute precision (``bf16``: under bfloat16 autocast, else fp32). ``dropout`` False: every dropout
    probability of the model's config is 0 (TRL's disable_dropout; see also :func:`disable_dropout`); the attention
    is ``utils.attention.choose``'s for that config (what it decides is said through ``say``). A LoRA adapter folder gives its base
    model with the adapter merged in (its embedding first grown to the adapter's tokenizer when the adapter was
    trained with added tokens). Raises UsageError for an attention that cannot run there or that transformers
    refuses for this model."""
    adapter = adapter_base(path)
    location, kwargs = pretrained_location(adapter or path)
    config = AutoConfig.from_pretrained(location, **kwargs)
    if not dropout:
        for owner, name, _ in dropout_settings(config):
            setattr(owner, name, 0.0)
    rates = {name: p for _, name, p in dropout_settings(config) if "att" in name} if training else {}
    resolved = attention.choose(attn_implementation, device, bf16, training, rates, say)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, config=config, attn_implementation=resolved,
                                                     dtype=dtype, **kwargs)
    except ValueError as err:  # e.g. an architecture that refuses every attention named *sdpa* (Gemma 2)
        if "attention" not in str(err):
            raise
        raise UsageError(f"{path} with --attn_implementation {resolved}: "
                         f"{str(err).splitlines()[0]}") from None
    if adapter:  # a LoRA adapter folder: its base model with the adapter merged in
        from peft import PeftModel

        resize_embeddings(model, len(load_tokenizer(path)))  # the adapter holds the rows of tokens it added
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model.to(device)


def dropout_settings(config):
    """[(config, attribute name, probability)] of every non-zero dropout probability of a model config and its
    sub-configs (a multimodal model's text config): float attributes named ``*dropout*`` or ``*pdrop``
    (``attention_dropout``, ``hidden_dropout``, ``resid_pdrop``, ...)."""
    out = []
    for name, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            out += dropout_settings(value)
        elif isinstance(value, float) and value > 0 and ("dropout" in name or name.endswith("pdrop")):
            out.append((config, name, value))
    return out


def disable_dropout(model):
    """Dropout off in every ``torch.nn.Dropout`` of ``model`` (LoRA's included), as TRL's ``disable_dropout``; with
    ``load_causal_lm(..., dropout=False)`` (the config's rates, which attention layers read as numbers) the model
    computes in training mode what it computes in eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def resize_embeddings(model, size):
    """Grow ``model``'s input embedding and LM head (tied or not) to ``size`` rows with transformers'
    ``resize_token_embeddings`` (the config's vocab_size follows, so the saved model has them); new rows initialised
    as transformers does (``mean_resizing``: drawn around the old rows' mean, from torch's seeded generator).
    A model with at least ``size`` rows is left as it is. Returns the line to log."""
    rows = model.get_input_embeddings().num_embeddings
    if rows >= size:
        return f"--resize_token_embeddings: the embedding has {rows} rows for the tokenizer's {size} tokens: kept"
    model.resize_token_embeddings(size, mean_resizing=True)
    return f"token embeddings and LM head resized from {rows} to {size} rows (the new rows mean-initialised)"


def check_embedding_rows(caches, rows, tokenizer_size, resize_hint):
    """Every token id of ``caches`` ([(label, TokenCache)]) must have a row in the model's input embedding (``rows``
    of them): an id past it (tokens added to the tokenizer, the model not resized) fails the first forward that
    meets it, which may be the test evaluation after training. Checked before step 1; UsageError naming the set, the
    record and field holding the largest id, the embedding size and what to do (``resize_hint`` when the tokenizer
    has more tokens than the embedding has rows)."""
    for label, cache in caches:
        found = cache.largest_id()
        if found and found[0] >= rows:
            largest, i, field = found
            fix = f"the tokenizer has {tokenizer_size} tokens: {resize_hint}" if tokenizer_size > rows else \
                "was the cache tokenized with another tokenizer?"
            raise UsageError(f"{label}: {cache.where(i)}: field '{field}': token id {largest} has no row in the "
                             f"model's embedding ({rows} rows); {fix}")


def bf16_note(device, bf16):
    """A line for runs under ``--bf16`` on a CPU without bfloat16 matrix instructions (AVX512-BF16 or AMX-BF16 on
    x86, BF16 on Arm, as /proc/cpuinfo lists them), where bfloat16 matmuls are emulated; None otherwise."""
    if not bf16 or torch.device(device).type != "cpu" or not os.path.isfile("/proc/cpuinfo"):
        return None
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        flags = {flag for line in f if line.lower().startswith(("flags", "features")) for flag in line.split()}
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        return None
    return ("note: --bf16 on a CPU without bfloat16 matrix instructions (AVX512-BF16, AMX, Arm BF16): its bfloat16 "
            "matmuls are emulated, about 10x slower than fp32 (SmolLM2-135M DPO on 2 cores: ~5 tokens/s, ~50 in "
            "fp32); leave --bf16 out on this machine")


def build_model(model_args, args, tokenizer, device, say, caches):
    """train.py's model: loaded (:func:`load_causal_lm`; dropout off with ``--disable_dropout``), embeddings grown
    with ``--resize_token_embeddings``, every id of ``caches`` ([(label, TokenCache)]) checked to have an embedding
    row, gradient checkpointing, LoRA, the load-time probes (:class:`ResponseLogProbs`), compiled layers; what was
    decided is said. Returns (the model, its PeftModel or None, the ResponseLogProbs wrapper that trains)."""
    if note := bf16_note(device, args.bf16):
        say(note)
    model = load_causal_lm(model_args.model_name_or_path, model_args.attn_implementation, torch.float32, device,
                           bf16=args.bf16, dropout=not args.disable_dropout, say=say)
    if model_args.resize_token_embeddings:
        say(resize_embeddings(model, len(tokenizer)))
    check_embedding_rows(caches, model.get_input_embeddings().num_embeddings, len(tokenizer),
                         "add --resize_token_embeddings (the embedding and the LM head grown to it)")
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = add_lora(model, model_args) if model_args.use_peft else None  # adapters injected into `model`
    if args.disable_dropout:
        disable_dropout(model)
    wrapped = ResponseLogProbs(model, bf16=args.bf16)
    say("load-time checks: " + "; ".join(wrapped.load_checks))
    if args.torch_compile:
        for layer in model.base_model.layers:
            layer.compile(dynamic=True)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    say(f"trainable parameters: {trainable:,} of {sum(p.numel() for p in wrapped.parameters()):,}"
        + (f" (LoRA r={model_args.lora_r}, alpha={model_args.lora_alpha}, {model_args.lora_target_modules})"
           if peft_model else ""))
    return model, peft_model, wrapped


def add_lora(model, model_args):
    """``model`` with LoRA adapters injected in place (peft; only they and ``lora_modules_to_save`` train);
    returns the PeftModel that saves them. Names as TRL's ModelConfig. Modules to save that are tied (a model that
    ties its LM head to its input embedding) stay tied (peft's ``ensure_weight_tying``)."""
    from peft import LoraConfig, get_peft_model

    targets = model_args.lora_target_modules
    to_save = [m.strip() for m in model_args.lora_modules_to_save.split(",")] if model_args.lora_modules_to_save \
        else None
    tied = bool(to_save) and getattr(model.config, "tie_word_embeddings", False)
    config = LoraConfig(
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
        modules_to_save=to_save, ensure_weight_tying=tied, task_type="CAUSAL_LM")
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
    # the weight is (vocabulary, hidden); peft's tied copy of a head misstates out_features
    rows = max(1, chunk_entries // head.weight.shape[0])
    if hidden.shape[0] <= rows:
        return _chunk_logps(hidden, head, target_ids)
    parts = [checkpoint(_chunk_logps, h, head, t, use_reentrant=False)
             for h, t in zip(hidden.split(rows), target_ids.split(rows))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _half_only(model):
    """Whether the model's attention has no fp32 kernel (transformers' flash_attention_*): probes run in bf16."""
    return model.config._attn_implementation.startswith("flash_attention")


@contextlib.contextmanager
def _probing(model, bf16=False):
    """Eval mode without gradients for a load-time probe forward, in the precision the run computes in (``bf16``:
    under bfloat16 autocast, as for an attention without fp32); the model's mode is restored after; a ValueError
    of the model's (a feature refused) becomes a UsageError."""
    training = model.training
    model.eval()
    device_type = next(model.parameters()).device.type
    try:
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16 or _half_only(model)):
            yield
    except ValueError as err:
        raise UsageError(f"{model.config.model_type}: {err}") from None
    finally:
        model.train(training)


def logits_are_head_outputs(model, bf16=False):
    """Whether ``model``'s logits are its output embedding's outputs, as :func:`token_logps` computes them: False for
    models that post-process logits (final soft-capping as Gemma 2's, a logit scale as Cohere's or Granite's).
    Decided on one forward of one token, in eval mode, by comparing the head's output (a forward hook) with the
    logits that forward returns: bitwise equal unless something happens after the head, whatever the precision or
    the kernels' rounding (a needless False would only cost memory). UsageError when the model asks its attention
    for something ``utils.attention`` does not implement (soft-capping, sinks)."""
    ids = torch.ones(1, 1, dtype=torch.long, device=next(model.parameters()).device)
    outputs = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        with _probing(model, bf16):
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        hook.remove()
    return len(outputs) == 1 and torch.equal(outputs[0].float(), logits.float())


class ResponseLogProbs(torch.nn.Module):
    """Wraps a Hugging Face causal LM: ``forward(batch)`` -> per-token log-probs of a ``PackedBatch``'s targets.
    ``bf16``: the run computes under bfloat16 autocast (the load-time probes then do too).

    The LM head runs only on the hidden states of positions that predict a trained token, in bounded chunks
    (:func:`token_logps`): prompts cost no logits memory and the response tokens a bounded amount. Models that
    post-process their logits (:func:`logits_are_head_outputs` False: final soft-capping, logit scaling) get their
    own logits at those positions instead (transformers' ``logits_to_keep``): exact, but the (targets x vocabulary)
    logits exist at once. Built after the model is on its device and before its layers are compiled (it runs
    one probe forward).
    """

    def __init__(self, model, bf16=False):
        super().__init__()
        if model.base_model is model:
            raise UsageError(f"{type(model).__name__} has no separate base model to take hidden states from")
        head = model.get_output_embeddings()
        # a Linear, or peft's wrapper of one (LoRA, modules to save)
        if getattr(getattr(head, "weight", None), "ndim", 0) != 2:
            raise UsageError(f"{type(model).__name__}'s output embedding is a {type(head).__name__}, not a Linear "
                             "layer")
        self.model, self.bf16 = model, bf16
        self.head_outputs_are_logits = logits_are_head_outputs(model, bf16)
        # the decoder's window (a multimodal model's text config holds it): layers ask for it by their sliding_window
        self.sliding_window = getattr(model.config.get_text_config(decoder=True), "sliding_window", None)
        # what the load-time probes decided, for the log
        self.load_checks = ["logits are the LM head's outputs: log-probs from the chunked head"
                            if self.head_outputs_are_logits else
                            "the model post-processes its logits after the head: its own logits at the trained "
                            "positions (no chunked head)", self.check_sequences_stay_apart()]

    def check_sequences_stay_apart(self):
        """UsageError unless the sequences packed in one row stay apart: a model with a layer that mixes the row's
        sequences (a convolution or state-space layer that does not restart at sequence starts, linear attention, a
        layer that does not pass the row's layout on) cannot train on packed rows. Returns the line that says what
        was measured. Eval mode, the run's precision (:func:`_probing`), random tokens of the vocabulary (seeded).

        Packed or alone, a sequence's rows meet other matmul shapes and offsets, so its log-probs differ by rounding,
        which grows with depth, width and lower precision (30 layers in fp32: ~5e-4); no fixed bound tells that from
        mixing. So the check is a controlled experiment on a row ``[A][S][C]`` (lengths ``PROBE_LENGTHS``): the
        content of A is changed, all shapes kept, and S's log-probs must not move by more than ``ROUNDING_MARGIN``
        times what changing C moves them, which no causal layer can carry back to S (rounding only, e.g. through an
        MoE layer's expert batches; zero for dense models)."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(0)

        def tokens(prompt, response):
            return (torch.randint(vocab, (prompt,), generator=generator).tolist(),
                    torch.randint(vocab, (response,), generator=generator).tolist())

        (a, s, c), (a2, _, c2) = ([tokens(*n) for n in PROBE_LENGTHS] for _ in range(2))
        device = next(self.model.parameters()).device
        with _probing(self.model, self.bf16):
            packed, before, after = (self(pack_sequences(row).to(device))[0][len(a[1]):len(a[1]) + len(s[1])]
                                     for row in ([a, s, c], [a2, s, c], [a, s, c2]))
        changed_before, changed_after = ((packed - x).abs().max().item() for x in (before, after))
        if changed_before > ROUNDING_MARGIN * changed_after + 1e-6 * packed.abs().max().item():
            raise UsageError(f"{self.model.config.model_type} with attention {self.model.config._attn_implementation}: "
                             f"sequences packed in one row do not stay apart (another sequence earlier in the row "
                             f"changes a log-prob by {changed_before:.2g}, a later one by {changed_after:.2g}): this "
                             "model cannot train on packed rows")
        return (f"packed sequences stay apart (another sequence earlier in the row changes a log-prob by "
                f"{changed_before:.2g}, a later one, which no causal layer can reach, by {changed_after:.2g})")

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
