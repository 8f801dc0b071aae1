"""Where train.py's step time goes: the real training loop, sampled from outside with py-spy.

    pip install py-spy
    python bench/step_profile.py                          # SFT on the benchmark fixture (bench/make_fixture.py)
    python bench/step_profile.py --task dpo --data demo --logging_steps 1

Runs ``python train.py`` (one process, ZeRO 0, fp32, one torch thread, no saving, no evaluation) unchanged, samples
its Python stacks (``py-spy record``, native frames off) and sorts every sample taken inside ``train()`` by the
frames on its stack:

* forward + loss: DeepSpeed's ``engine.forward`` (the model's forward under autocast) and ``Objective.loss`` (the
  loss, the metric sums);
* backward: DeepSpeed's ``engine.backward``;
* optimizer: DeepSpeed's ``engine.step`` and ``utils.optimization.clip_gradients``;
* collate + copy: ``Objective.collate`` and ``PackedBatch.to`` (building the row on the host);
* other: the rest of the loop (metric all-reduce and logging, progress bar, the scheduler's learning rate).

The model's own work is forward + backward + optimizer; the issue's target is "outside" (collate + copy + other)
under 15% of the loop. py-spy's sampling costs the sampled process nothing measurable (it reads its memory).
"""
import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from trl_compare import CACHE, DATASETS, MODEL

PHASES = [  # (phase, a frame on the stack marks it: (function name, file ending)), first match wins
    ("optimizer", [("step", "deepspeed/runtime/engine.py"), ("clip_gradients", "utils/optimization.py")]),
    ("backward", [("backward", "deepspeed/runtime/engine.py")]),
    ("forward + loss", [("forward", "deepspeed/runtime/engine.py"), ("loss", "utils/objectives.py")]),
    ("collate + copy", [("collate", "utils/objectives.py"), ("to", "utils/packing.py")]),
]


def frame_parts(frame):
    """'name (path/file.py:12)' -> ('name', 'path/file.py')."""
    name, _, where = frame.partition(" (")
    return name, where.rsplit(":", 1)[0]


def classify(path):
    """{phase: samples} over the samples whose stack passes through train.py's ``train``."""
    counts = collections.Counter()
    for line in open(path, encoding="utf-8", errors="replace"):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not n.isdigit():
            continue
        frames = [frame_parts(f) for f in stack.split(";")]
        if not any(name == "train" and where.endswith("train.py") for name, where in frames):
            continue
        phase = next((phase for phase, marks in PHASES  # py-spy qualifies methods: "DeepSpeedEngine.step"
                      if any(name.rpartition(".")[2] == m and where.endswith(suffix)
                             for name, where in frames for m, suffix in marks)), "other")
        counts[phase] += int(n)
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["sft", "dpo"], default="sft")
    p.add_argument("--data", choices=["fixture", "demo"], default="fixture")
    p.add_argument("--max_tokens", type=int, default=2048, help="--per_device_train_batch_max_tokens")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = p.parse_args()
    if not shutil.which("py-spy"):
        sys.exit("py-spy is not installed: pip install py-spy")
    subprocess.run([sys.executable, os.path.join(HERE, "make_fixture.py")], check=True)
    spec = DATASETS[args.data][args.task]
    work = tempfile.mkdtemp(prefix="step_profile_")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    train_args = ["--training_type", args.task, "--model_name_or_path", MODEL,
                  "--train_data_path", os.path.join(CACHE, spec["train"]), "--output_dir", os.path.join(work, "out"),
                  "--per_device_train_batch_max_tokens", str(args.max_tokens), "--learning_rate", str(spec["lr"]),
                  "--num_train_epochs", str(args.epochs), "--logging_steps", str(args.logging_steps),
                  "--save_strategy", "no"]
    if args.task == "dpo":
        ref = os.path.join(work, "ref")
        subprocess.run([sys.executable, "get_logits.py", "--model_name_or_path", MODEL, "--train_data_path",
                        os.path.join(CACHE, spec["train"]), "--output_dir", ref], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        train_args += ["--ref_logps_dir", ref]
    raw = os.path.join(work, "profile.txt")
    subprocess.run(["py-spy", "record", "-r", str(args.rate), "-f", "raw", "-o", raw, "--",
                    sys.executable, "train.py", *train_args], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counts = classify(raw)
    total = sum(counts.values())
    print(f"train.py {args.task} on {args.data}, budget {args.max_tokens} tokens, logging every "
          f"{args.logging_steps} step(s): {total} samples in the training loop ({total / args.rate:.1f} s)")
    for phase in [p for p, _ in PHASES] + ["other"]:
        print(f"  {phase:<16}{100 * counts[phase] / total:6.1f}%")
    outside = counts["collate + copy"] + counts["other"]
    print(f"  outside forward/backward/optimizer: {100 * outside / total:.1f}% (target < 15%)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
