"""The LM head + log-prob in chunks (utils.modeling.token_logps): the values and gradients of one big log-softmax,
and a peak memory that stays bounded when the whole logits tensor would not fit the bound."""
import json
import os
import subprocess
import sys

import pytest

import torch

from tests.launching import ROOT
from utils.modeling import token_logps


def big_log_softmax(hidden, head, targets):
    """Independent reference: the whole (K x V) logits in fp32, log_softmax, gather."""
    logps = torch.log_softmax(hidden @ head.weight.T + head.bias, dim=-1)
    return logps[torch.arange(len(targets)), targets], logps.argmax(-1) == targets


def test_chunked_equals_one_big_log_softmax_values_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97)
    hidden = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 97, (50,))
    weights = torch.randn(50)  # an arbitrary upstream gradient per token
    got, got_hits = token_logps(hidden, head, targets, chunk_entries=7 * 97)  # 8 chunks, the last one short
    (got * weights).sum().backward()
    got_grads = [hidden.grad, head.weight.grad, head.bias.grad]
    hidden.grad = head.weight.grad = head.bias.grad = None
    want, want_hits = big_log_softmax(hidden, head, targets)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(got_hits, want_hits)
    for g, w in zip(got_grads, [hidden.grad, head.weight.grad, head.bias.grad]):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


PEAK_SCRIPT = r"""
import json, resource, sys, torch
from utils.modeling import token_logps
torch.manual_seed(0)
K, V, D, chunk = int(sys.argv[1]), int(sys.argv[2]), 64, int(sys.argv[3])
head = torch.nn.Linear(D, V, bias=False)
hidden = torch.randn(K, D, requires_grad=True)
targets = torch.randint(0, V, (K,))
token_logps(hidden[:8], head, targets[:8])[0].sum().backward()  # warm-up: allocator, autograd
head.weight.grad = None
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
logps, _ = token_logps(hidden, head, targets, chunk_entries=chunk)
logps.sum().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_over_base": peak - base}))
"""


def peak_bytes(k, v, chunk_entries):
    """Peak RSS growth (bytes) of one forward+backward through token_logps in a fresh process."""
    # glibc's malloc keeps freed large blocks in its heap (its mmap threshold grows after the first free), so RSS
    # would count freed chunks as live; a fixed mmap threshold returns them to the system when they are freed,
    # which makes RSS follow the live tensors (a CUDA caching allocator reuses such blocks anyway)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(k), str(v), str(chunk_entries)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_over_base"]


@pytest.mark.slow
def test_logits_memory_is_bounded_for_a_large_vocabulary():
    """K = 2048 trained tokens x V = 131072 (a large vocabulary): the fp32 logits alone are 1 GiB. In chunks of
    2**22 entries (16 MiB) the whole forward+backward peaks far below that; the unchunked control (one chunk of
    every entry) does not, which shows the measurement can fail."""
    k, v = 2048, 131072
    logits_bytes = k * v * 4
    chunked = peak_bytes(k, v, 1 << 22)
    whole = peak_bytes(k, v, k * v)
    # weights + their gradient (2 x 32 MiB) and a few chunk-sized buffers are allowed
    assert chunked < 0.2 * logits_bytes, (chunked, logits_bytes)
    assert whole > logits_bytes, (whole, logits_bytes)
