"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings), its fp32
weights built from the GGUF file the test requirements install (tests/conftest.py), as a user downloads it.

fp32, through the README's commands: chat tokenization -> get_logits.sh -> 2 DPO steps (dev and step 1: loss ln 2,
rewards 0) -> 2 SFT steps from the DPO model (step-1 loss equal to the token-mean NLL computed here with plain
transformers, each sequence alone) -> the saved model loads with AutoModelForCausalLM and still answers. With --bf16
(bfloat16 autocast over fp32 weights): get_logits.py -> a DPO step (ln 2, rewards 0, the chosen log-probs within
bf16 rounding of plain fp32 transformers') -> the saved model answers. The tiny random models of the other tests
round far less than a real model: a load-time check that rounding can trip passes there and refuses every real model
(it did), so this test exists.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.launching import ENV, ROOT, launch

RUN_FIRST = True  # the longest file of the suite (tests/conftest.py)

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
    """Chat-mode token-id caches of QA made by get_tokenized_data.py with SmolLM2's tokenizer: DPO, all of QA (train)
    and its first 2 records (dev); SFT, all of QA."""
    folder = tmp_path_factory.mktemp("real_caches")
    dpo = write_jsonl(folder / "dpo.jsonl", [{"prompt_id": i, "prompt": p, "chosen": c, "rejected": r}
                                             for i, (p, c, r) in enumerate(QA)])
    dev = write_jsonl(folder / "dpo_dev.jsonl", [{"prompt_id": i, "prompt": p, "chosen": c, "rejected": r}
                                                 for i, (p, c, r) in enumerate(QA[:2])])
    sft = write_jsonl(folder / "sft.jsonl", [{"prompt_id": i, "prompt": p, "response": c}
                                             for i, (p, c, _) in enumerate(QA)])
    jobs = [["--training_type", "dpo", "--train_dataset_path", str(dpo), "--train_save_path", str(folder / "dpo.arrow"),
             "--dev_dataset_path", str(dev), "--dev_save_path", str(folder / "dpo_dev.arrow")],
            ["--training_type", "sft", "--train_dataset_path", str(sft),
             "--train_save_path", str(folder / "sft.arrow")]]
    running = [subprocess.Popen([sys.executable, "tokenized_inputs/get_tokenized_data.py", "--model", smollm2_dir,
                                 "--prompt_type", "chat", *job], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for job in jobs]
    for process in running:
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, out
    return {name: str(folder / f"{name}.arrow") for name in ("dpo", "dpo_dev", "sft")}


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


def independent_logps(model_dir, records):
    """Per record (prompt, response) of QA, the log-probs of the response's tokens under the model in ``model_dir``:
    plain transformers (eager attention), each sequence alone, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    with torch.no_grad():
        for prompt, response in records:
            p, r = chat_ids(tokenizer, prompt, response)
            logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
            out.append(torch.log_softmax(logits, -1)[len(p) - 1:-1].gather(1, torch.tensor(r)[:, None])[:, 0])
    return out


def answer(model_dir, question):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def cpu_has_bf16_units():
    with open("/proc/cpuinfo") as f:
        return any(flag in f.read().split() for flag in ("avx512_bf16", "amx_bf16", "bf16"))


def check_dpo_start(folder, dev):
    rows = metrics(folder)
    if dev:  # the dev loss before training
        assert rows[0]["step"] == 0 and abs(rows.pop(0)["eval_loss"] - math.log(2)) < 1e-6, rows[0]
    assert rows[0]["step"] == 1 and abs(rows[0]["loss"] - math.log(2)) < 1e-6, rows[0]
    assert rows[0]["rewards/chosen"] == 0 and rows[0]["rewards/rejected"] == 0, rows[0]


def check_sft_start(folder, model_dir):
    step_1 = metrics(folder)[0]  # the samples fit one micro-batch: step 1 is the whole set (an epoch a step)
    logps = independent_logps(model_dir, [(p, c) for p, c, _ in QA])
    expected = -torch.cat(logps).mean().item()  # the token mean
    assert step_1["step"] == 1 and step_1["loss"] == pytest.approx(expected, rel=1e-5), (step_1, expected)


def wrapper(command, run_script, env, *extra):
    proc = subprocess.run(["bash", command, run_script, *extra], cwd=ROOT, env=dict(ENV, **env), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{command} {run_script}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_real_model_through_the_readme_recipe(smollm2_dir, caches, tmp_path):
    """fp32, the README's commands for a real model (the run scripts' real-model defaults, 2 steps each)."""
    ref, dpo, sft = (str(tmp_path / name) for name in ("ref", "dpo", "sft"))
    data = dict(TRAIN_DATA=caches["dpo"], DEV_DATA=caches["dpo_dev"], REF_LOGPS_DIR=ref)
    out = wrapper("get_logits.sh", "runs/get_ref.sh", dict(data, REF_MODEL=smollm2_dir))
    assert "packed sequences stay apart" in out and "logits are the LM head's outputs" in out, out
    short = ["--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no"]  # --save_strategy no: the
    wrapper("train.sh", "runs/dpo.sh", dict(data, MODEL=smollm2_dir, OUTPUT_DIR=dpo), *short)  # script's
    check_dpo_start(dpo, dev=True)  # --save_total_limit once made it an error
    # SFT from the DPO model: a model this toolkit trained and saved is a real checkpoint too
    wrapper("train.sh", "runs/sft.sh", dict(MODEL=dpo, TRAIN_DATA=caches["sft"], OUTPUT_DIR=sft), *short)
    check_sft_start(sft, dpo)
    assert "Paris" in answer(sft, "What is the capital of France?")


@pytest.mark.slow
def test_real_model_in_bf16(smollm2_dir, caches, tmp_path):
    """--bf16 (autocast over fp32 weights) through get_logits.py and train.py. bf16 matmuls are emulated on CPUs
    without bf16 units (~5 tokens/s on the 2-core machine, said at start): one DPO step on the 2-pair set."""
    ref, dpo = tmp_path / "ref", tmp_path / "dpo"
    launch("get_logits.py", ["--model_name_or_path", smollm2_dir, "--train_data_path", caches["dpo_dev"],
                             "--output_dir", str(ref), "--bf16"])
    out = launch("train.py", ["--training_type", "dpo", "--model_name_or_path", smollm2_dir, "--train_data_path",
                              caches["dpo_dev"], "--ref_logps_dir", str(ref), "--output_dir", str(dpo),
                              "--per_device_train_batch_max_tokens", "256", "--max_steps", "1", "--save_strategy",
                              "no", "--bf16"]).stdout
    assert ("bfloat16 matmuls are emulated" in out) == (not cpu_has_bf16_units()), out
    assert "packed sequences stay apart" in out and "logits are the LM head's outputs" in out, out  # in bf16 too
    check_dpo_start(dpo, dev=False)
    # both pairs in step 1: its logps/chosen is their mean chosen log-prob, within bf16's rounding of this 30-layer
    # model (a few %: transformers' own eager and sdpa attention under bf16 autocast differ by 3% in loss here) of
    # plain transformers' fp32 value, where a wrong token or mask is far off
    expected = torch.stack([x.sum() for x in independent_logps(smollm2_dir, [(p, c) for p, c, _ in QA[:2]])])
    assert metrics(dpo)[0]["logps/chosen"] == pytest.approx(expected.mean().item(), rel=5e-2)
    assert "Paris" in answer(str(dpo), "What is the capital of France?")
