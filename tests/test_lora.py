"""LoRA through peft (--use_peft): exact adapter gradients, adapters any peft user can load, merged == adapter,
exact resume, get_logits.py takes an adapter folder, tokens added to the tokenizer (LoRA DPO on the demo from ln 2:
tests/test_dpo.py)."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.launching import MODEL_DIR, demo_model_dir, launch
from utils.batching import token_budget_batches
from utils.errors import UsageError
from utils.record_io import load_records, save_records
from utils.schema import KINDS, SampleLayout
from utils.token_cache import TokenCache

LORA = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"]


def synthetic(n, seed):
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        total = int(torch.randint(6, 30, (1,), generator=g))
        ids = torch.randint(5, 301, (total,), generator=g).tolist()
        cut = int(torch.randint(1, total - 1, (1,), generator=g))
        records.append({"prompt_id": i, "prompt_ids": ids[:cut], "response_ids": ids[cut:]})
    return records


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    demo_model_dir()
    path = tmp_path_factory.mktemp("lora") / "train.pt"
    save_records(path, synthetic(32, 7))
    return path


def args(cache, out, *extra):
    return ["--model_name_or_path", MODEL_DIR, "--train_data_path", str(cache), "--output_dir", str(out), *LORA, *extra]


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def peft_model(adapter_weights=None):
    """The demo model with the same LoRA as LORA; its lora_A set from ``adapter_weights``, lora_B zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    if adapter_weights is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.copy_(adapter_weights[name.replace(".default", "")])
    return model


@pytest.mark.slow
def test_one_step_adapter_gradient_equals_big_batch_gradient(cache, tmp_path):
    """2 processes, ZeRO-2, 2 accumulation micro-batches of uneven size: after one SGD step (lr 1) from B = 0,
    B = -dL/dB of the step's samples in one big batch (token mean), computed here with peft and plain torch."""
    records = TokenCache.from_records(synthetic(32, 7), KINDS["sft"])
    layout = SampleLayout(KINDS["sft"])
    step = token_budget_batches(layout.costs(records), 80, h_accumulation_steps=2, world_size=2, seed=3,
                                loss_weights=layout.loss_weights(records))[0]
    indices = [i for rank in step.micro_batches for mb in rank for i in mb.indices]
    assert len({mb.num_tokens for rank in step.micro_batches for mb in rank}) > 1  # uneven micro-batches
    out = tmp_path / "out"
    launch("train.py", args(cache, out, "--deepspeed", "configs/ds_config_stage2.json", "--h_accumulation_steps", "2",
                            "--per_device_train_batch_max_tokens", "80", "--optim", "sgd", "--learning_rate", "1.0",
                            "--max_grad_norm", "0", "--lr_scheduler_type", "constant", "--max_steps", "1", "--seed", "3",
                            "--save_strategy", "no"), nproc=2)
    trained = adapter(out)
    model = peft_model(trained)
    total = sum(len(records.ids("response_ids", i)) for i in indices)
    loss = 0.0
    for i in indices:
        prompt, response = records.ids("prompt_ids", i).tolist(), records.ids("response_ids", i).tolist()
        logps = torch.log_softmax(model(input_ids=torch.tensor([prompt + response])).logits[0].float(), -1)
        rows = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
        loss = loss - logps[rows, torch.tensor(response)].sum() / total
    loss.backward()
    grads = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert set(grads) == {k for k in trained if "lora_B" in k}
    diff = sum(((-trained[k]) - g).pow(2).sum() for k, g in grads.items()).sqrt()
    norm = sum(g.pow(2).sum() for g in grads.values()).sqrt()
    assert norm > 0 and diff / norm < 1e-5, (diff / norm).item()


def dev_loss(model, records):
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for r in records:
            logps = torch.log_softmax(model(input_ids=torch.tensor([r["prompt_ids"] + r["response_ids"]])).logits[0].float(), -1)
            rows = torch.arange(len(r["prompt_ids"]) - 1, len(r["prompt_ids"]) + len(r["response_ids"]) - 1)
            nll -= logps[rows, torch.tensor(r["response_ids"])].sum().item()
            tokens += len(r["response_ids"])
    return nll / tokens


@pytest.mark.slow
def test_saved_adapter_loads_with_peft_and_merged_model_equals_it(cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dev = tmp_path / "dev.pt"
    save_records(dev, synthetic(12, 8))
    out = tmp_path / "out"
    launch("train.py", args(cache, out, "--dev_data_path", str(dev), "--learning_rate", "3e-3", "--max_steps", "8",
                            "--per_device_train_batch_max_tokens", "120", "--save_strategy", "no", "--merge_adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out))
    assert not (out / "model.safetensors").exists()  # the output is the adapter, not a full copy of the model
    logged = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]["eval_loss"]
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(out)).eval()
    records = [dict(r) for r in synthetic(12, 8)]
    assert dev_loss(loaded, records) == pytest.approx(logged, rel=1e-4)  # the trained model, as peft loads it
    assert abs(logged - dev_loss(AutoModelForCausalLM.from_pretrained(MODEL_DIR), records)) > 1e-3  # it trained
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    ids = torch.tensor([records[0]["prompt_ids"] + records[0]["response_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_lora_resume_is_exact_and_checkpoints_hold_the_adapter(cache, tmp_path):
    settings = ["--per_device_train_batch_max_tokens", "80", "--learning_rate", "2e-3", "--max_steps", "6",
                "--save_steps", "3", "--seed", "5"]
    a, b = tmp_path / "a", tmp_path / "b"
    launch("train.py", args(cache, a, *settings))
    checkpoint = a / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").exists() and not (checkpoint / "model.safetensors").exists()
    engine_bytes = sum(f.stat().st_size for f in (checkpoint / "engine").rglob("*") if f.is_file())
    base_bytes = os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors"))
    assert engine_bytes < base_bytes  # no copy of the frozen base weights
    b.mkdir()
    shutil.copytree(checkpoint, b / "checkpoint-3")
    resumed = launch("train.py", args(cache, b, *settings, "--resume_from_checkpoint", "latest"))
    assert "resumed from" in resumed.stdout
    wa, wb = adapter(a), adapter(b)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_get_logits_takes_an_adapter_folder(cache, tmp_path):
    """Reference log-probs from a LoRA run's output folder (base + adapter) equal those of its merged model."""
    out = tmp_path / "sft"
    launch("train.py", args(cache, out, "--max_steps", "4", "--learning_rate", "1e-2", "--save_strategy", "no",
                            "--merge_adapter", "--per_device_train_batch_max_tokens", "120"))
    pairs = tmp_path / "pairs.pt"
    save_records(pairs, [{"prompt_id": r["prompt_id"], "prompt_ids": r["prompt_ids"], "chosen_ids": r["response_ids"],
                          "rejected_ids": r["response_ids"][::-1] + [7]} for r in synthetic(10, 9)])
    logps = {}
    for name, model in (("adapter", out), ("merged", out / "merged")):
        launch("get_logits.py", ["--model_name_or_path", str(model), "--train_data_path", str(pairs),
                                 "--output_dir", str(tmp_path / name)])
        logps[name] = torch.load(tmp_path / name / "train.pt", weights_only=True)
    torch.testing.assert_close(logps["adapter"]["chosen_logps"], logps["merged"]["chosen_logps"], atol=1e-5, rtol=0)
    assert logps["adapter"]["provenance"]["reference_fingerprint"] != logps["merged"]["provenance"]["reference_fingerprint"]


def test_lora_settings_without_use_peft_are_errors():
    from utils.arguments import parse_arguments
    with pytest.raises(UsageError, match="--lora_r only apply with --use_peft"):
        parse_arguments(["--train_data_path", "x.pt", "--lora_r", "8"])
    with pytest.raises(UsageError, match="--merge_adapter only apply with --use_peft"):
        parse_arguments(["--train_data_path", "x.pt", "--merge_adapter"])


@pytest.mark.slow
def test_unknown_target_module_is_one_line(cache, tmp_path):
    proc = launch("train.py", args(cache, tmp_path / "o", "--lora_target_modules", "no_such_proj"), expect_rc=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no_such_proj" in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_training_runs_in_training_mode_without_a_dev_set(cache, tmp_path):
    """from_pretrained returns a model in eval mode: without a dev evaluation before training (which used to be
    the only thing switching the engine back), LoRA dropout was silently off. With dropout 0.5 the second step's
    loss differs from dropout 0's (the first step's cannot: B = 0 makes the LoRA branch 0 either way)."""
    losses = {}
    for dropout in ("0.0", "0.5"):
        out = tmp_path / f"d{dropout}"
        launch("train.py", args(cache, out, "--lora_dropout", dropout, "--max_steps", "2", "--logging_steps", "1",
                                "--learning_rate", "1e-2", "--save_strategy", "no"))
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        losses[dropout] = [r["loss"] for r in rows if "loss" in r]
    assert losses["0.0"][0] == losses["0.5"][0] and losses["0.0"][1] != losses["0.5"][1], losses


# ------------------------------------------------------------------- tokens added to the tokenizer


NEW_TOKENS = ["<tool>", "</tool>"]


@pytest.fixture(scope="module")
def added_tokens(tmp_path_factory):
    """The demo model with NEW_TOKENS added to its tokenizer, not to the model (301 embedding rows, 303 tokens), and
    SFT caches (train, dev) whose responses use the new tokens. Returns (model folder, train, dev, new ids)."""
    from transformers import AutoTokenizer

    demo_model_dir()
    folder = tmp_path_factory.mktemp("added_tokens")
    model = folder / "model"
    shutil.copytree(MODEL_DIR, model)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    tokenizer.add_tokens(NEW_TOKENS)
    tokenizer.save_pretrained(model)
    new = tokenizer.convert_tokens_to_ids(NEW_TOKENS)
    assert new == [301, 302] and len(tokenizer) == 303

    def with_new_tokens(records):
        return [dict(r, response_ids=[new[0]] + r["response_ids"] + [new[1]]) for r in records]

    train, dev = folder / "train.pt", folder / "dev.pt"
    save_records(train, with_new_tokens(synthetic(12, 21)))
    save_records(dev, with_new_tokens(synthetic(6, 22)))
    return model, train, dev, new


@pytest.mark.slow
def test_ids_past_the_embedding_are_refused_before_training(added_tokens, tmp_path):
    """A cache holding ids the model has no embedding row for trained, saved, then died in the test evaluation with
    'IndexError: index out of range in self'. Now one line before step 1, in train.py and get_logits.py."""
    model, train, _, new = added_tokens
    proc = launch("train.py", ["--model_name_or_path", str(model), "--train_data_path", str(train), "--output_dir",
                               str(tmp_path / "o")], expect_rc=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for part in (str(train), f"token id {new[1]}", "(301 rows)", "303 tokens", "--resize_token_embeddings"):
        assert part in errors[0], errors[0]
    pairs = tmp_path / "pairs.pt"
    save_records(pairs, [{"prompt_id": i, "prompt_ids": [5, 6], "chosen_ids": [7, new[0]], "rejected_ids": [8]}
                         for i in range(3)])
    proc = launch("get_logits.py", ["--model_name_or_path", str(model), "--train_data_path", str(pairs),
                                    "--output_dir", str(tmp_path / "ref")], expect_rc=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"token id {new[0]}" in errors[0] and "--resize_token_embeddings" in errors[0], errors
    assert not (tmp_path / "ref").exists() or not os.listdir(tmp_path / "ref")


@pytest.mark.slow
def test_lora_trains_the_new_tokens_rows_exactly_and_reloads(added_tokens, tmp_path):
    """--resize_token_embeddings --use_peft --lora_modules_to_save embed_tokens,lm_head (the README's recipe after
    adding tokens; refused before: the LM head was a peft wrapper): the embedding (tied to the head) trains in full,
    new rows included. One SGD step with lr 1 from the resized rows (which peft saves with the adapter) is minus the
    gradient of the token-mean NLL of the step's samples, computed here with plain transformers; the adapter loaded
    by peft onto a resized base, and --merge_adapter's model, give train.py's dev loss."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, train, dev, new = added_tokens
    out = tmp_path / "out"
    launch("train.py", ["--model_name_or_path", str(model_dir), "--train_data_path", str(train), "--dev_data_path",
                        str(dev), "--output_dir", str(out), *LORA, "--lora_modules_to_save", "embed_tokens,lm_head",
                        "--resize_token_embeddings", "--merge_adapter", "--optim", "sgd", "--learning_rate", "1.0",
                        "--max_grad_norm", "0", "--lr_scheduler_type", "constant", "--max_steps", "1",
                        "--per_device_train_batch_max_tokens", "1024", "--save_strategy", "no"])
    saved = adapter(out)
    before = saved["base_model.model.model.embed_tokens.original_module.weight"]
    after = saved["base_model.model.model.embed_tokens.modules_to_save.weight"]
    assert before.shape == (303, 128)
    assert torch.equal(saved["base_model.model.lm_head.modules_to_save.weight"], after)  # still tied

    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager")
    base.resize_token_embeddings(303)
    with torch.no_grad():
        base.get_input_embeddings().weight.copy_(before)
    records = load_records(str(train)).records  # all 12 fit one 1024-token micro-batch: the step is the whole set
    nll, tokens = 0.0, 0
    for r in records:
        logps = torch.log_softmax(base(input_ids=torch.tensor([r["prompt_ids"] + r["response_ids"]])).logits[0], -1)
        rows = torch.arange(len(r["prompt_ids"]) - 1, len(r["prompt_ids"]) + len(r["response_ids"]) - 1)
        nll = nll - logps[rows, torch.tensor(r["response_ids"])].sum()
        tokens += len(r["response_ids"])
    grad = torch.autograd.grad(nll / tokens, base.get_input_embeddings().weight)[0]
    assert grad[new].abs().min() > 0  # the new tokens' rows are trained
    torch.testing.assert_close(before - after, grad, atol=1e-6, rtol=1e-4)

    logged = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]["eval_loss"]
    dev_records = load_records(str(dev)).records
    resized = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    resized.resize_token_embeddings(303)
    reloaded = PeftModel.from_pretrained(resized, str(out)).eval()
    assert dev_loss(reloaded, dev_records) == pytest.approx(logged, rel=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    assert merged.get_input_embeddings().num_embeddings == 303
    assert dev_loss(merged, dev_records) == pytest.approx(logged, rel=1e-5)
