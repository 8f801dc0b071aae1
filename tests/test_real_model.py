"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings), its fp32
weights built from the GGUF file the test requirements install (tests/conftest.py), as a user downloads it.

chat tokenization -> get_logits.py -> 2 DPO steps (step 1: loss ln 2, rewards 0) -> 2 SFT steps from the DPO model
(step-1 loss equal to the token-mean NLL computed here with plain transformers, each sequence alone) -> the saved
model loads with AutoModelForCausalLM and still answers; once in fp32 and once with --bf16 (bfloat16 autocast over
fp32 weights). The tiny random models of the other tests round far less than a real model: a load-time check that
rounding can trip passes there and refuses every real model (it did), so this test exists.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.launching import ENV, ROOT, launch

QA = [("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Berlin."),
      ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
      ("Name a primary color.", "Red is a primary color.", "Green is a fruit."),
      ("What do bees make?", "Bees make honey.", "Bees make milk."),
      ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
      ("What is the opposite of hot?", "The opposite of hot is cold.", "The opposite of hot is warm."),
      ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", "Venus is the Red Planet."),
      ("What gas do plants absorb?", "Plants absorb carbon dioxide.", "Plants absorb helium.")]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def caches(smollm2_dir, tmp_path_factory):
    """Chat-mode token-id caches of QA made by get_tokenized_data.py with SmolLM2's tokenizer: DPO and SFT, all of
    QA (train) and its first 2 records (dev)."""
    folder = tmp_path_factory.mktemp("real_caches")
    dpo = write_jsonl(folder / "dpo.jsonl", [{"prompt_id": i, "prompt": p, "chosen": c, "rejected": r}
                                             for i, (p, c, r) in enumerate(QA)])
    dev = write_jsonl(folder / "dpo_dev.jsonl", [{"prompt_id": i, "prompt": p, "chosen": c, "rejected": r}
                                                 for i, (p, c, r) in enumerate(QA[:2])])
    sft = write_jsonl(folder / "sft.jsonl", [{"prompt_id": i, "prompt": p, "response": c}
                                             for i, (p, c, _) in enumerate(QA)])
    sft_dev = write_jsonl(folder / "sft_dev.jsonl", [{"prompt_id": i, "prompt": p, "response": c}
                                                     for i, (p, c, _) in enumerate(QA[:2])])
    jobs = [["--training_type", "dpo", "--train_dataset_path", str(dpo), "--train_save_path", str(folder / "dpo.arrow"),
             "--dev_dataset_path", str(dev), "--dev_save_path", str(folder / "dpo_dev.arrow")],
            ["--training_type", "sft", "--train_dataset_path", str(sft), "--train_save_path", str(folder / "sft.arrow"),
             "--dev_dataset_path", str(sft_dev), "--dev_save_path", str(folder / "sft_dev.arrow")]]
    running = [subprocess.Popen([sys.executable, "tokenized_inputs/get_tokenized_data.py", "--model", smollm2_dir,
                                 "--prompt_type", "chat", *job], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for job in jobs]
    for process in running:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, out
    return {name: str(folder / f"{name}.arrow") for name in ("dpo", "dpo_dev", "sft", "sft_dev")}


def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def chat_ids(tokenizer, prompt, response):
    """(prompt ids, response ids) as the chat template renders the conversation, independently of utils.tokenization:
    the response is what the whole conversation adds to the prompt, through the end-of-turn token."""
    user = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
    whole = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=True,
                                          return_dict=False)
    end = whole.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), len(prompt_ids)) + 1
    assert whole[:len(prompt_ids)] == prompt_ids
    return prompt_ids, whole[len(prompt_ids):end]


def independent_nll(model_dir, records):
    """Token-mean NLL of the responses of ``records`` (QA's) under the model in ``model_dir``: plain transformers
    (eager attention), each sequence alone, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, response, _ in records:
            p, r = chat_ids(tokenizer, prompt, response)
            logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
            logps = torch.log_softmax(logits, -1)[len(p) - 1:-1].gather(1, torch.tensor(r)[:, None])
            total, count = total - logps.sum().item(), count + len(r)
    return total / count


def answer(model_dir, question):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_real_model_reference_dpo_sft_save_and_generate(smollm2_dir, caches, tmp_path, bf16):
    # bf16 matmuls are emulated on CPUs without bf16 units (~5 tokens/s on the 2-core machine): with --bf16 the chain
    # runs on the 2-record sets, one step each, without dev evaluations
    precision, steps = (["--bf16"], "1") if bf16 else ([], "2")
    dpo_data, sft_data, sft_records = (caches["dpo_dev"], caches["sft_dev"], QA[:2]) if bf16 else \
        (caches["dpo"], caches["sft"], QA)
    dev = [] if bf16 else ["--dev_data_path", caches["dpo_dev"]]
    ref = tmp_path / "ref"
    out = launch("get_logits.py", ["--model_name_or_path", smollm2_dir, "--train_data_path", dpo_data, *dev,
                                   "--output_dir", str(ref), *precision]).stdout
    assert "load-time checks:" in out and "packed sequences stay apart" in out, out

    dpo = tmp_path / "dpo"
    out = launch("train.py", ["--training_type", "dpo", "--model_name_or_path", smollm2_dir, "--train_data_path",
                              dpo_data, *dev, "--ref_logps_dir", str(ref), "--output_dir", str(dpo),
                              "--per_device_train_batch_max_tokens", "64" if bf16 else "200", "--max_steps", steps,
                              "--learning_rate", "1e-6", "--logging_steps", "1", "--save_strategy", "no",
                              *precision]).stdout
    rows = metrics(dpo)
    if dev:  # the dev loss before training
        assert rows[0]["step"] == 0 and abs(rows.pop(0)["eval_loss"] - math.log(2)) < 1e-6, out
    assert rows[0]["step"] == 1 and abs(rows[0]["loss"] - math.log(2)) < 1e-6, rows[0]
    assert rows[0]["rewards/chosen"] == 0 and rows[0]["rewards/rejected"] == 0, rows[0]

    sft = tmp_path / "sft"  # from the DPO model: a model this toolkit trained and saved is a real checkpoint too
    launch("train.py", ["--training_type", "sft", "--model_name_or_path", str(dpo), "--train_data_path", sft_data,
                        "--output_dir", str(sft), "--per_device_train_batch_max_tokens", "512", "--max_steps", steps,
                        "--learning_rate", "1e-6", "--logging_steps", "1", "--save_strategy", "no", *precision])
    step_1 = metrics(sft)[0]  # the samples fit one 512-token micro-batch: step 1 is the whole set (an epoch a step)
    # bf16 rounds this 30-layer model's loss by a few % (transformers' own eager vs sdpa attention under bf16 autocast
    # differ by 3% on these records): within 5% of the fp32 value, where a wrong token or mask is far off
    expected = independent_nll(str(dpo), sft_records)
    assert step_1["loss"] == pytest.approx(expected, rel=5e-2 if bf16 else 1e-5), (step_1, expected)

    assert "Paris" in answer(str(sft), "What is the capital of France?")
