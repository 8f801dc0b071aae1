"""Build the embedded demo: a tiny tokenizer, a tiny Llama config (+ weights) and small SFT/DPO data.

    python demo/build_demo.py                 # regenerate tokenizer, config, data and weights
    python demo/build_demo.py --weights-only  # only create demo/model/model.safetensors if missing

Everything is deterministic (fixed seeds, no network): re-running leaves the committed files
byte-identical. The weights are not committed; `ensure_demo_model()` creates them on first use.

Tasks: "add 52 34\\n" -> "86" (2-digit operands, no carry out of the units), "sort 3142\\n" -> "1234",
"reverse abcd\\n" -> "dcba", "upper abcd\\n" -> "ABCD". Inputs have a fixed length (4 characters) and
the tokenizer never merges random letters, so every answer token sits at a fixed offset from an input
token: the ~0.6M-parameter model learns upper/reverse in a few hundred steps (batch 32, lr 3e-3) and
sort/add in about a thousand. Prompts end with "\\n": encoding prompt and response separately and
concatenating gives the same ids as encoding prompt + response.
"""
import argparse
import json
import os
import random
import shutil
import sys
import tempfile

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(DEMO_DIR, "model")
DATA_DIR = os.path.join(DEMO_DIR, "data")
WEIGHTS = "model.safetensors"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4
VOCAB_SIZE = 512  # upper bound; merges stop at MIN_FREQUENCY, which gives ~300 tokens
MIN_FREQUENCY = 100  # high enough that pairs of random letters never merge (they occur ~20x each)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TASKS = ("add", "sort", "reverse", "upper")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
STR_LEN = 4

# ----------------------------------------------------------------------------------------- tasks


def make_prompt(task, rng):
    """Return (prompt, input) for one random instance of a task."""
    if task == "add":
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        while a % 10 + b % 10 > 9:  # no carry out of the units: every answer digit is a table lookup
            a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        return f"add {a} {b}\n", (a, b)
    if task == "sort":
        s = "".join(rng.choice("0123456789") for _ in range(STR_LEN))
        return f"sort {s}\n", s
    s = "".join(rng.choice(LETTERS) for _ in range(STR_LEN))
    return f"{task} {s}\n", s


def answer(task, x):
    if task == "add":
        return str(x[0] + x[1])
    if task == "sort":
        return "".join(sorted(x))
    return x[::-1] if task == "reverse" else x.upper()


def wrong_answer(task, x, rng):
    """A plausible wrong answer: off by one digit/carry, a swapped pair, an unchanged input..."""
    good = answer(task, x)
    if task == "add":
        cands = [str(max(0, int(good) + d)) for d in (-10, -1, 1, 10)] + [str(x[0] + x[1] + 1)]
        if len(good) > 1:
            cands.append(good[::-1])
    elif task == "upper":
        cands = [x, x[:-1].upper() + x[-1], x[0] + x[1:].upper(), x.upper()[:-1]]
    else:
        base = x if task == "reverse" else good
        cands = [x, good[:-1], good + good[-1]]
        for i in range(len(good) - 1):
            cands.append(good[:i] + good[i + 1] + good[i] + good[i + 2:])
        cands.append(base[1:] + base[0])
    cands = [c for c in cands if c != good]
    return rng.choice(cands)


# ------------------------------------------------------------------------------------------ data


def unique_prompts(rng, task, n, seen):
    """n new prompts of a task, none of which is in `seen` (updated in place)."""
    out = []
    while len(out) < n:
        prompt, x = make_prompt(task, rng)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, x))
    return out


def build_split(rng, counts, seen, next_id, dpo):
    """Records for a split; `counts` maps task -> number of records. prompt_ids count per task."""
    records = []
    for task, n in counts.items():
        for prompt, x in unique_prompts(rng, task, n, seen):
            rec = {"prompt_id": f"{task}-{next_id[task]}", "prompt": prompt}
            next_id[task] += 1
            if dpo:
                rec["chosen"] = answer(task, x)
                rec["rejected"] = wrong_answer(task, x, rng)
                assert rec["chosen"] != rec["rejected"]
            else:
                rec["response"] = answer(task, x)
            records.append(rec)
    rng.shuffle(records)
    return records


def build_datasets():
    """{relative path: records}. Held-out splits are drawn first; train never repeats their prompts."""
    rng = random.Random(1234)
    seen = set()  # shared by SFT and DPO: no prompt appears in two files
    files = {}
    for kind, dpo in (("sft", False), ("dpo", True)):
        next_id = {t: 0 for t in TASKS}
        each = lambda n: {t: n for t in TASKS}  # noqa: E731
        files[f"{kind}/test/arith.jsonl"] = build_split(rng, {"add": 50, "sort": 50}, seen, next_id, dpo)
        files[f"{kind}/test/strings.json"] = build_split(rng, {"reverse": 50, "upper": 50}, seen, next_id, dpo)
        files[f"{kind}/dev.jsonl"] = build_split(rng, each(50), seen, next_id, dpo)
        files[f"{kind}/train.jsonl"] = build_split(rng, each(750), seen, next_id, dpo)
    return files


def write_records(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")) for r in records]
    text = "\n".join(lines) + "\n" if path.endswith(".jsonl") else "[" + ",\n".join(lines) + "]\n"
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


# ------------------------------------------------------------------------------ tokenizer/model


def build_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=MIN_FREQUENCY, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer=trainer)
    # BOS at the start, never EOS (transformers 5 keeps this in tokenizer.json, not as add_bos_token)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", tk.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, attention_dropout=0.0, rms_norm_eps=1e-5, dtype="float32",
    )


def ensure_demo_model(model_dir=MODEL_DIR):
    """Create `model_dir`/model.safetensors from config.json (seed 0) if missing; return its path."""
    target = os.path.join(model_dir, WEIGHTS)
    if os.path.isfile(target):
        return target
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = tempfile.mkdtemp(prefix=".weights-", dir=os.path.dirname(os.path.abspath(model_dir)))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        os.chmod(os.path.join(tmp, WEIGHTS), 0o644)
        os.replace(os.path.join(tmp, WEIGHTS), target)  # atomic within one filesystem
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check(tok, files):
    """Sanity checks: chat template, BOS/EOS handling and prompt/response tokenization split."""
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", repr(text)
    ids = tok("add 12 34\n")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id and tok.decode(ids[1:]) == "add 12 34\n"
    assert tok.convert_ids_to_tokens(tok("1234", add_special_tokens=False)["input_ids"]) == list("1234")
    assert len(tok(["<|im_end|>"], add_special_tokens=False)["input_ids"][0]) == 1
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    for records in files.values():
        for r in records:
            for resp in [r[k] for k in ("response", "chosen", "rejected") if k in r]:
                assert enc(r["prompt"]) + enc(resp) == enc(r["prompt"] + resp), (r, resp)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights-only", action="store_true", help="only create missing model weights")
    args = parser.parse_args(argv)
    if args.weights_only:
        existed = os.path.isfile(os.path.join(MODEL_DIR, WEIGHTS))
        path = ensure_demo_model()
        if not existed:
            print(f"demo model weights written: {path}")
        return
    from transformers import set_seed

    set_seed(0)
    files = build_datasets()
    for rel, records in files.items():
        write_records(os.path.join(DATA_DIR, rel), records)
    texts = [r["prompt"] + r[k] for recs in files.values() for r in recs for k in ("response", "chosen") if k in r]
    tok = build_tokenizer(texts)
    check(tok, files)
    os.makedirs(MODEL_DIR, exist_ok=True)
    tok.save_pretrained(MODEL_DIR)
    build_config(tok).save_pretrained(MODEL_DIR)
    weights = os.path.join(MODEL_DIR, WEIGHTS)
    if os.path.exists(weights):
        os.remove(weights)  # the config may have changed: rebuild from it
    ensure_demo_model()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}, params {n_params:,}, files: {', '.join(sorted(files))}")


if __name__ == "__main__":
    sys.exit(main())
