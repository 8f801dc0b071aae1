"""Checkpoints that resume exactly, and models saved so any Hugging Face tool loads them.

A checkpoint folder ``<output_dir>/checkpoint-<step>`` holds the DeepSpeed engine state (``engine/``:
weights, optimizer, scheduler), each rank's RNG state, ``trainer_state.json`` (the position in the run and the
run's identity, ``utils.provenance.run_identity``) and an HF-loadable model + tokenizer. It is written under a
temporary name and renamed when complete, so a killed run never leaves a checkpoint that looks whole but is not.
A run resumes only its own checkpoints and rotates only its own (``start_checkpoint``, ``save_checkpoint``).
"""
import glob
import json
import os
import re
import shutil

import torch

from utils.distributed import barrier
from utils.errors import UsageError
from utils.provenance import identity_differences
from utils.record_io import atomic_write_json, plain_file_mode

ENGINE_TAG = "engine"
STATE_FILE = "trainer_state.json"
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",  # a finished run's model
               "adapter_model.safetensors")


def _step_of(path):
    match = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path.rstrip("/")))
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir):
    """Complete checkpoints, oldest first."""
    paths = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
             if _step_of(p) is not None and os.path.isfile(os.path.join(p, STATE_FILE))]
    return sorted(paths, key=_step_of)


def read_state(path):
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def differences(path, identity):
    """How the run that wrote checkpoint ``path`` differs from the run ``identity`` ([] for the same run)."""
    saved = read_state(path).get("run")
    if saved is None:
        return ["it records no run identity (written by an older version)"]
    return identity_differences(saved, identity)


def own_checkpoints(output_dir, identity):
    """This run's complete checkpoints in output_dir, oldest first."""
    return [p for p in list_checkpoints(output_dir) if not differences(p, identity)]


def final_model_files(output_dir):
    """The names of a finished run's model files in ``output_dir`` (MODEL_FILES that exist)."""
    return [n for n in MODEL_FILES if os.path.isfile(os.path.join(output_dir, n))]


def start_checkpoint(output_dir, resume_from_checkpoint, overwrite_output_dir, identity):
    """The checkpoint this run resumes from, or None to start at step 0. Raises UsageError rather than resume
    another run's state (other model, data, plan settings or number of steps: resuming it would skip or repeat
    samples) or start over where another run's checkpoints or final model are, unless --overwrite_output_dir."""
    if resume_from_checkpoint and resume_from_checkpoint != "latest":
        if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
            raise UsageError(f"--resume_from_checkpoint '{resume_from_checkpoint}' is not a complete checkpoint folder")
        diff = differences(resume_from_checkpoint, identity)
        if diff:
            raise UsageError(f"{resume_from_checkpoint} belongs to another run ({'; '.join(diff)}): resume it with that "
                             f"run's settings, or start a new run")
        return resume_from_checkpoint
    if resume_from_checkpoint == "latest":
        own = own_checkpoints(output_dir, identity)
        if own:
            return own[-1]
    held = [os.path.basename(p) for p in list_checkpoints(output_dir)]
    held += final_model_files(output_dir)
    if held and not overwrite_output_dir:
        others = list_checkpoints(output_dir)
        why = f"; the newest checkpoint differs: {'; '.join(differences(others[-1], identity))}" \
            if resume_from_checkpoint == "latest" and others else ""
        raise UsageError(f"--output_dir {output_dir} already holds another run ({', '.join(held[:4])}{why}): "
                         f"{'pass --resume_from_checkpoint latest to continue it, ' if not resume_from_checkpoint else ''}"
                         f"choose another --output_dir, or pass --overwrite_output_dir to train into it anyway")
    return None


def resume_note(output_dir, resume_from_checkpoint, checkpoint):
    """The line to say about ``--resume_from_checkpoint`` when it does not simply continue a run: nothing to resume
    (a fresh start), or a finished run whose final model the resumed steps will replace (None otherwise)."""
    if resume_from_checkpoint and not checkpoint:
        return f"note: no checkpoint of this run in {output_dir}: starting at step 0"
    final = final_model_files(output_dir)
    if checkpoint and final:
        return (f"note: {output_dir} already holds this run's final model ({final[0]}): resuming from {checkpoint} "
                "trains the steps after it again and replaces it")
    return None


def save_hf_model(model, tokenizer, target_dir):
    """save_pretrained into a temporary folder beside ``target_dir``, then move each file into place. ``model``: a
    transformers model (the whole model) or a peft model (its adapter: adapter_config.json, adapter_model.safetensors)."""
    tmp = target_dir.rstrip("/") + ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.makedirs(target_dir, exist_ok=True)
    for name in os.listdir(tmp):
        if os.path.isfile(os.path.join(tmp, name)):  # safetensors writes its file 0600: readable like the others
            os.chmod(os.path.join(tmp, name), plain_file_mode())
        os.replace(os.path.join(tmp, name), os.path.join(target_dir, name))
    os.rmdir(tmp)


def save_checkpoint(engine, model, tokenizer, output_dir, step, state, rank, save_total_limit=None, adapter=False):
    """Collective: every rank calls it. ``state``: the JSON-able position in the run and its identity (``run``);
    ``save_total_limit`` keeps that many of this run's checkpoints (other runs' are never deleted). ``model`` is
    what save_hf_model writes; ``adapter``: a LoRA run, whose frozen base weights the engine state leaves out."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    engine.save_checkpoint(tmp, tag=ENGINE_TAG, exclude_frozen_parameters=adapter)
    torch.save(torch.get_rng_state(), os.path.join(tmp, f"rng_state_{rank}.pt"))
    barrier()
    if rank == 0:
        save_hf_model(model, tokenizer, tmp)
        atomic_write_json(os.path.join(tmp, STATE_FILE), state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if save_total_limit:  # the oldest of this run's own checkpoints; never the one just written
            older = [p for p in own_checkpoints(output_dir, state["run"]) if p != final]
            for old in older[:max(0, len(older) - (save_total_limit - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(engine, path, rank, adapter=False):
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the saved run state. ``adapter``: a LoRA
    run's checkpoint, which holds only the trained weights (the frozen ones come from the base model)."""
    load_path, _ = engine.load_checkpoint(path, tag=ENGINE_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=not adapter)
    if load_path is None:
        raise UsageError(f"cannot load the engine state from '{path}'")
    rng = os.path.join(path, f"rng_state_{rank}.pt")
    if os.path.isfile(rng):
        torch.set_rng_state(torch.load(rng, weights_only=True))
    return read_state(path)
