"""Time tokenized_inputs/get_tokenized_data.py on synthetic DPO records of a few hundred tokens.

    python bench/tokenize_bench.py [--records 100000] [--num_proc 1 2] [--prompt_type completion chat]

Writes the records to a temporary .jsonl, runs the real command line for each setting and prints
records/s (end to end: reading, validating, tokenizing, writing the cache; process start included).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the a of to and in is it that for on with as was at by be this from or an are not but have "
         "model token data train value answer question number result string list reverse sort add").split()


def text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--num_proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt_type", nargs="+", default=["completion"])
    p.add_argument("--model", default=os.path.join(ROOT, "demo/model"))
    args = p.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "dpo.jsonl")
        with open(raw, "w") as f:
            for i in range(args.records):
                f.write(json.dumps({"prompt_id": i, "prompt": text(rng, rng.randint(20, 80)) + "\n",
                                    "chosen": text(rng, rng.randint(30, 120)),
                                    "rejected": text(rng, rng.randint(30, 120))}) + "\n")
        print(f"{args.records} DPO records, {os.path.getsize(raw) / 1e6:.1f} MB, tokenizer {args.model}")
        for prompt_type in args.prompt_type:
            for num_proc in args.num_proc:
                out = os.path.join(tmp, f"cache_{prompt_type}_{num_proc}.pt")
                start = time.time()
                subprocess.run([sys.executable, os.path.join(ROOT, "tokenized_inputs/get_tokenized_data.py"),
                                "--model", args.model, "--train_dataset_path", raw, "--train_save_path", out,
                                "--training_type", "dpo", "--prompt_type", prompt_type, "--max_length", "2048",
                                "--num_proc", str(num_proc)], check=True, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
                seconds = time.time() - start
                with open(out + ".meta.json") as f:
                    length = json.load(f)["summary"]["length"]
                print(f"{prompt_type:>10}  num_proc {num_proc}: {seconds:6.1f} s  {args.records / seconds:8.0f} records/s"
                      f"  (sequence length mean {length['mean']:.0f}, max {length['max']})")


if __name__ == "__main__":
    main()
