"""Top entries of a py-spy profile in raw (collapsed) format: self and inclusive share per function.

    py-spy record -r 200 -f raw -o /tmp/ours.txt -- python train.py ...      # any command
    python bench/pyspy_top.py /tmp/ours.txt [--rows 15] [--under train.py:main]

``--under`` keeps only the samples whose stack contains that frame (e.g. the training loop), so start-up and
imports drop out. A function is ``name (file:line)`` as py-spy writes it; file paths are shortened to the
part after site-packages/ or the repository root.
"""
import argparse
import collections
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short(frame):
    frame = re.sub(r"\S*/site-packages/", "", frame)
    return frame.replace(ROOT + "/", "")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--under", help="only samples whose stack has a frame containing this text")
    args = p.parse_args()
    self_count, incl_count, total = collections.Counter(), collections.Counter(), 0
    for line in open(args.path, encoding="utf-8", errors="replace"):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = [short(f) for f in stack.split(";")]
        if args.under and not any(args.under in f for f in frames):
            continue
        n = int(n)
        total += n
        self_count[frames[-1]] += n
        for f in set(frames):
            incl_count[f] += n
    print(f"{total} samples{' under ' + args.under if args.under else ''}")
    print(f"\n{'self %':>7}  function (leaf frame: where the time is spent, C++ included in the calling line)")
    for f, n in self_count.most_common(args.rows):
        print(f"{100 * n / total:6.1f}%  {f}")
    print(f"\n{'incl %':>7}  function (inclusive)")
    for f, n in incl_count.most_common(args.rows + 10)[:args.rows + 10]:
        print(f"{100 * n / total:6.1f}%  {f}")


if __name__ == "__main__":
    main()
