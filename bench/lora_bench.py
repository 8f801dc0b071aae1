"""Memory and speed of LoRA (--use_peft) against full fine-tuning, on CPU.

    python bench/lora_bench.py            # ~3 minutes on the 2-core machine

A random-init Llama of ~100M weights (hidden 1024, 8 layers, MLP 2816, the demo tokenizer's vocabulary) is saved
once; then ``train.py`` runs 5 SFT steps of 1,024-token micro-batches on the benchmark fixture's SFT cache
(``bench/make_fixture.py``), fully and with LoRA (r 16, all linear layers; with the default dropout 0.05 and
with none), one torch thread each. Reported: peak
RSS of the process (``wait4``), median tokens/s of steps 2-5, trainable parameters. The fixture's own 3M-weight
model is too small to show anything: there, imports dominate memory and LoRA saves nothing measurable.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")


def make_model(folder):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "demo", "model"))
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(model, out, extra):
    args = ["train.py", "--model_name_or_path", model, "--train_data_path",
            os.path.join(HERE, "fixture", "cache", "sft_train.pt"), "--output_dir", out, "--max_steps", "5",
            "--per_device_train_batch_max_tokens", "1024", "--learning_rate", "1e-4", "--logging_steps", "1",
            "--save_strategy", "no", *extra]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise SystemExit(output[-3000:])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    trainable = next(line for line in output.splitlines() if line.startswith("trainable parameters"))
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "tok_s": statistics.median(r["tokens_per_second"] for r in rows[1:]),
            "trainable": trainable.split(": ", 1)[1]}


def main():
    subprocess.run([sys.executable, os.path.join(HERE, "make_fixture.py")], check=True, stdout=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as work:
        n = make_model(os.path.join(work, "model"))
        print(f"model: {n / 1e6:.0f}M weights")
        for name, extra in (("full", []), ("lora", ["--use_peft"]), ("lora_dropout_0", ["--use_peft", "--lora_dropout", "0"])):
            r = run(os.path.join(work, "model"), os.path.join(work, name), extra)
            print(f"{name:>14}: peak RSS {r['peak_rss_mb']:.0f} MB, {r['tok_s']:.0f} tokens/s, trainable {r['trainable']}")


if __name__ == "__main__":
    main()
