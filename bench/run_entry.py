"""Run one of the project's entry scripts unchanged and, when it exits, write its peak CUDA memory to the JSON file
named by $RUN_ENTRY_OUT (bench/gpu_bench.py's helper; nothing is recorded on CPU).

    RUN_ENTRY_OUT=/tmp/peak.json python bench/run_entry.py train.py --training_type sft ...   (cwd: the repository)
"""
import atexit
import json
import os
import runpy
import sys


def dump():
    import torch

    info = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        info = {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
                "device": torch.cuda.get_device_name()}
    with open(os.environ["RUN_ENTRY_OUT"], "w") as f:
        json.dump(info, f)


if os.environ.get("RUN_ENTRY_OUT"):
    atexit.register(dump)
script = os.path.abspath(sys.argv[1])
sys.argv = [script] + sys.argv[2:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
