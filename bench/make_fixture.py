"""Offline benchmark fixture: a small random-init Llama model and long-tailed SFT / DPO data, tokenized.

    python bench/make_fixture.py            # writes bench/fixture/ (gitignored); a no-op when up to date
    python bench/make_fixture.py --force    # rebuild

Writes, deterministically (fixed seeds):

* ``model/``: a Llama-architecture model (hidden 256, 4 layers, 8 heads of 32, 4 KV heads, MLP 688, the demo
  tokenizer's 301-token vocabulary, tied embeddings, 2048 positions), random init from ``torch.manual_seed(0)``,
  saved with ``save_pretrained`` together with the demo tokenizer (``demo/model``).
* ``data/{sft,dpo}/{train,dev}.jsonl``: string tasks (upper-case / reverse / copy the words of the prompt) whose
  lengths are long-tailed: 95% of the samples have a log-normal total length (median ~60 characters), 5% are
  drawn uniformly from 400 to 1,100 characters (the byte-level BPE makes ~0.9 tokens a character, so up to ~1k tokens) (prompt + response).
  DPO: chosen is the correct answer, rejected a corrupted one (words dropped, repeated or swapped) of a
  different length.
* ``cache/{sft,dpo}_{train,dev}.pt``: the token-id caches of that data made by
  ``tokenized_inputs/get_tokenized_data.py`` (``--prompt_type completion --max_length 1024``), and of the
  demo data (``cache/demo_{sft,dpo}_{train,dev}.pt``, ``--max_length 256`` as the demo run scripts use; train:
  all 3000 SFT samples, the first 1280 DPO pairs; dev: the demo dev files), and ``cache/{dpo,demo_dpo}_as_sft_train.pt``:
  every DPO pair as two SFT samples (prompt+chosen, prompt+rejected), to compare our DPO and SFT memory on the
  same sequences.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(HERE, "fixture")
VERSION = 7  # bump when anything below changes

MODEL_CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, attention_dropout=0.0, hidden_act="silu")
SIZES = {"sft": (320, 100), "dpo": (160, 100)}  # (train, dev) records: 20 optimizer steps at the benchmark batch sizes
DEMO_TRAIN = {"sft": 3000, "dpo": 1280}  # the demo train files (3000 each), DPO cut to its first 1280 pairs
ALPHABET = np.array(list("abcdefghijklmnopqrstuvwxyz"))
TASKS = ("upper", "reverse", "copy")


def words(rng, n):
    lengths = rng.integers(2, 9, size=n)
    return ["".join(rng.choice(ALPHABET, size=k)) for k in lengths]


def answer(task, ws):
    if task == "upper":
        return " ".join(w.upper() for w in ws)
    if task == "reverse":
        return " ".join(ws[::-1])
    return " ".join(ws)


def target_chars(rng):
    """Characters of prompt + response: log-normal body (most samples short) and a uniform tail to ~1.9k."""
    if rng.random() < 0.05:
        return int(rng.integers(400, 1100))
    return int(np.clip(rng.lognormal(np.log(60), 0.8), 14, 1100))


def sample(rng, i, kind):
    task = TASKS[rng.integers(len(TASKS))]
    n_words = max(1, target_chars(rng) // 2 // 6)  # half prompt, half response, ~6 characters a word
    ws = words(rng, n_words)
    record = {"prompt_id": f"{kind}-{i}", "prompt": f"{task}: {' '.join(ws)}\n"}
    good = answer(task, ws)
    if kind == "sft":
        record["response"] = good
        return record
    bad = list(good.split(" "))
    for _ in range(1 + len(bad) // 8):  # corrupt: drop, repeat or swap words; lengths differ from chosen
        op, j = rng.integers(3), int(rng.integers(len(bad)))
        if op == 0 and len(bad) > 1:
            bad.pop(j)
        elif op == 1:
            bad.insert(j, bad[j])
        else:
            k = int(rng.integers(len(bad)))
            bad[j], bad[k] = bad[k], bad[j]
    bad = " ".join(bad)
    if bad == good:
        bad = good + " " + good.split(" ")[0]
    record.update(chosen=good, rejected=bad)
    return record


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def make_model(path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "demo", "model"))
    tokenizer.model_max_length = MODEL_CONFIG["max_position_embeddings"]
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL_CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n / 1e6:.2f}M parameters -> {path}")


def tokenize(kind, train_src, dev_src, prefix, max_length):
    cmd = [sys.executable, os.path.join(ROOT, "tokenized_inputs", "get_tokenized_data.py"),
           "--model", os.path.join(FIXTURE, "model"), "--training_type", kind, "--prompt_type", "completion",
           "--max_length", str(max_length), "--num_proc", "1",
           "--train_dataset_path", train_src, "--train_save_path", os.path.join(FIXTURE, "cache", f"{prefix}_train.pt"),
           "--dev_dataset_path", dev_src, "--dev_save_path", os.path.join(FIXTURE, "cache", f"{prefix}_dev.pt")]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})


def as_sft(src, dst):
    """Every DPO pair as two SFT samples (prompt+chosen, prompt+rejected): the same sequences a DPO step processes."""
    import torch

    from utils.record_io import load_records

    out = []
    for r in load_records(src).records:
        for side in ("chosen", "rejected"):
            out.append({"prompt_id": f"{r['prompt_id']}-{side}", "prompt_ids": r["prompt_ids"],
                        "response_ids": r[f"{side}_ids"]})
    torch.save(out, dst)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true")
    args = p.parse_args()
    stamp = os.path.join(FIXTURE, "VERSION")
    if not args.force and os.path.exists(stamp) and open(stamp).read().strip() == str(VERSION):
        print(f"fixture up to date: {FIXTURE}")
        return
    make_model(os.path.join(FIXTURE, "model"))
    for kind, (n_train, n_dev) in SIZES.items():
        rng = np.random.default_rng({"sft": 1, "dpo": 2}[kind])
        records = [sample(rng, i, kind) for i in range(n_train + n_dev)]
        write_jsonl(os.path.join(FIXTURE, "data", kind, "train.jsonl"), records[:n_train])
        write_jsonl(os.path.join(FIXTURE, "data", kind, "dev.jsonl"), records[n_train:])
        tokenize(kind, os.path.join(FIXTURE, "data", kind, "train.jsonl"),
                 os.path.join(FIXTURE, "data", kind, "dev.jsonl"), kind, 1024)
        demo_train = os.path.join(FIXTURE, "data", f"demo_{kind}", "train.jsonl")
        with open(os.path.join(ROOT, "demo", "data", kind, "train.jsonl"), encoding="utf-8") as f:
            lines = [line for line in f if line.strip()][:DEMO_TRAIN[kind]]
        os.makedirs(os.path.dirname(demo_train), exist_ok=True)
        with open(demo_train, "w", encoding="utf-8") as f:
            f.writelines(lines)
        tokenize(kind, demo_train, os.path.join(ROOT, "demo", "data", kind, "dev.jsonl"), f"demo_{kind}", 256)
    for prefix in ("dpo", "demo_dpo"):  # the DPO sequences as SFT samples, for the DPO-vs-SFT memory comparison
        as_sft(os.path.join(FIXTURE, "cache", f"{prefix}_train.pt"), os.path.join(FIXTURE, "cache", f"{prefix}_as_sft_train.pt"))
    with open(stamp, "w") as f:
        f.write(f"{VERSION}\n")
    print(f"fixture written: {FIXTURE}")


if __name__ == "__main__":
    main()
