"""Shared by the tests that launch the real entry scripts (train.py, get_logits.py): paths, the
subprocess environment, launching 1 or N processes, and comparing an SGD step with a gradient."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from utils.distributed import free_port  # noqa: F401  (also used by test_train.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "demo", "model")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
           TOKENIZERS_PARALLELISM="false")
if "TORCH_EXTENSIONS_DIR" not in ENV and os.access(sys.prefix, os.W_OK):  # as utils/launch.sh: one build per env
    ENV["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")


def demo_model_dir():
    """demo/model with its weights (generated from a fixed seed when missing, by demo/build_demo.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_demo", os.path.join(ROOT, "demo", "build_demo.py"))
    build_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_demo)
    build_demo.ensure_demo_model()
    return MODEL_DIR


def shm_buffers(port):
    """DeepSpeed's all-reduce buffer files of the process group on ``port`` (utils.distributed.shm_buffer_path)."""
    return {name for name in os.listdir("/dev/shm") if name.startswith("deepspeed_allreduce_buffer_")
            and f"_{port}_" in name} if os.path.isdir("/dev/shm") else set()


def launch(script, args, nproc=1, timeout=300, expect_rc=0, env=None):
    """Run an entry script (1 process: plain python; more: the DeepSpeed launcher) from the repo root, with ``env``
    added to the environment. Whatever its exit, it leaves no DeepSpeed shared-memory buffer behind
    (utils.distributed.unlink_shm_buffer); its process group has a port of its own, so tests may run in parallel."""
    port = free_port()
    if nproc == 1:  # a group of one, as train.py makes it, on a known port
        command = [sys.executable, script, *args]
        env = dict(env or {}, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    else:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                   "--master_port", str(port), script, *args]
    proc = subprocess.run(command, cwd=ROOT, env=dict(ENV, **(env or {})), capture_output=True, text=True,
                          timeout=timeout)
    assert not shm_buffers(port), f"{script} left shared memory behind: {sorted(shm_buffers(port))}"
    if expect_rc is not None and proc.returncode != expect_rc:
        pytest.fail(f"{script} exited {proc.returncode} (expected {expect_rc}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_gradient_matches(g_ref, w0, w1, lr=1.0):
    """g_b = (W0 - W1) / lr from an SGD step equals g_ref: norm-wise over everything and per tensor, with an
    absolute tolerance covering the fp32 rounding of W1 = W0 - lr * g (a few ulps of |W|)."""
    assert set(w1) == set(w0), set(w1) ^ set(w0)
    assert set(g_ref) == set(w0), set(g_ref) ^ set(w0)
    g_max = max(g.abs().max().item() for g in g_ref.values())
    diff_sq = ref_sq = 0.0
    worst = []
    for name, g in g_ref.items():
        g_b = (w0[name].double() - w1[name].double()) / lr
        g = g.double()
        diff_sq += (g_b - g).pow(2).sum().item()
        ref_sq += g.pow(2).sum().item()
        ulp = 4 * torch.finfo(torch.float32).eps * w0[name].abs().max().item()
        atol = ulp + 1e-6 * g_max
        err = (g_b - g).abs().max().item()
        rel = (g_b - g).norm().item() / max(g.norm().item(), 1e-30)
        worst.append((rel, name, err, atol))
        assert torch.allclose(g_b, g, rtol=1e-4, atol=atol), \
            f"{name}: max |g_b - g_ref| = {err:.3g} (atol {atol:.3g}), relative norm error {rel:.3g}"
        # W1 = W0 - g is rounded to fp32: the recovered g carries up to ~eps * |W0| error per element
        rounding = 4 * torch.finfo(torch.float32).eps * w0[name].double().norm().item()
        assert rel < 1e-4 or (g_b - g).norm().item() < rounding, (name, rel, rounding)
    total_rel = (diff_sq / ref_sq) ** 0.5
    assert total_rel < 1e-5, f"||g_b - g_ref|| / ||g_ref|| = {total_rel:.3g}; worst tensors {sorted(worst)[-3:]}"
    return total_rel
