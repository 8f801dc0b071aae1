"""Checkpoints that resume exactly, and models saved so any Hugging Face tool loads them.

A checkpoint folder ``<output_dir>/checkpoint-<step>`` holds the DeepSpeed engine state (``engine/``:
weights, optimizer, scheduler), each rank's RNG state, ``trainer_state.json`` (position in the run) and an
HF-loadable model + tokenizer. It is written under a temporary name and renamed when complete, so a
killed run never leaves a checkpoint that looks whole but is not.
"""
import glob
import json
import os
import re
import shutil

import torch

from utils.distributed import barrier
from utils.errors import UsageError
from utils.record_io import atomic_write_json

ENGINE_TAG = "engine"
STATE_FILE = "trainer_state.json"


def _step_of(path):
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path.rstrip("/")))
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first."""
    paths = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
             if _step_of(p) is not None and os.path.isfile(os.path.join(p, STATE_FILE))]
    return sorted(paths, key=_step_of)


def resolve_checkpoint(output_dir, spec):
    """A checkpoint path from ``--resume_from_checkpoint`` (a folder, or 'latest' in output_dir)."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None  # nothing saved yet: start from scratch
    if not os.path.isfile(os.path.join(spec, STATE_FILE)):
        raise UsageError(f"--resume_from_checkpoint '{spec}' is not a complete checkpoint folder")
    return spec


def save_hf_model(model, tokenizer, target_dir):
    """save_pretrained into a temporary folder beside ``target_dir``, then move each file into place."""
    tmp = target_dir.rstrip("/") + ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.makedirs(target_dir, exist_ok=True)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(target_dir, name))
    os.rmdir(tmp)


def save_checkpoint(engine, tokenizer, output_dir, step, state, rank, save_total_limit=None):
    """Collective: every rank calls it. ``state`` is the JSON-able position in the run."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    engine.save_checkpoint(tmp, tag=ENGINE_TAG)
    torch.save(torch.get_rng_state(), os.path.join(tmp, f"rng_state_{rank}.pt"))
    barrier()
    if rank == 0:
        save_hf_model(engine.module.model, tokenizer, tmp)
        atomic_write_json(os.path.join(tmp, STATE_FILE), state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if save_total_limit:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine, path, rank):
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the saved run state."""
    load_path, _ = engine.load_checkpoint(path, tag=ENGINE_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise UsageError(f"cannot load the engine state from '{path}'")
    rng = os.path.join(path, f"rng_state_{rank}.pt")
    if os.path.isfile(rng):
        torch.set_rng_state(torch.load(rng, weights_only=True))
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)
