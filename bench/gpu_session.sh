#!/usr/bin/env bash
# One call on a lent GPU machine (no network there): the CUDA tests, bench/gpu_bench.py, then
# bench/shared_prompt_bench.py. ~5-6 minutes.
#
#   bash bench/gpu_session.sh --fetch      # here, with network: the wheels the GPU machine lacks -> bench/gpu_wheels/
#   GPU_SESSION_DRY=1 bash bench/gpu_session.sh   # here, on CPU: the same script with gpu_bench --dry-run
#   bash bench/gpu_session.sh              # on the GPU machine (device `run`, carry ["bench/gpu_wheels"]); writes $OUT
#
# The lent machines had python 3.12, torch 2.11+cu130, transformers 5.17, accelerate, tokenizers, numpy, safetensors,
# matplotlib, peft (../shared/gpu-check/README.md): the wheels carry transformers 5.24, trl, datasets, deepspeed and
# what they need that was missing there, installed into /tmp/site ahead of the machine's own packages.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/gpu_wheels
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }

if [ "${1:-}" = --fetch ]; then
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" \
    transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 \
    pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0 \
    tqdm==4.70.1 pytest==9.0.3 pluggy==1.7.0 iniconfig==2.3.1 nvidia-ml-py==13.615.71
  python -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$WHEELS"   # pure Python
  du -sh "$WHEELS"
  exit 0
fi

DRY=${GPU_SESSION_DRY:-0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1
if [ "$DRY" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl > "$OUT/pip.log" 2>&1
  stamp "wheels installed: rc=$?"
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH   # $PWD: the project's utils (not installed there)
  command -v python >/dev/null || { mkdir -p /tmp/pybin && ln -sf "$(command -v python3)" /tmp/pybin/python \
    && export PATH=/tmp/pybin:$PATH; }
fi
{
  stamp "versions"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  python - <<'EOF'
import importlib
for name in ("torch", "transformers", "deepspeed", "trl", "datasets", "pynvml"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:  # noqa: BLE001
        print(name, "IMPORT FAILED", repr(err)[:200])
import inspect, torch
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except Exception as err:  # noqa: BLE001
    print("varlen_attn unavailable", repr(err)[:200])
from utils.attention import resolve
print("auto attention on cuda:", resolve("auto", "cuda") if torch.cuda.is_available() else "no cuda")
EOF
  stamp "CUDA tests"
  timeout -k 5 150 python -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_model_support.py -k "cuda or window or soft" 2>&1 | tail -25
  stamp "gpu_bench"
  if [ "$DRY" = 1 ]; then
    timeout -k 5 300 python bench/gpu_bench.py --dry-run --out "$OUT/gpu_results.json" 2>&1 | tail -25
  else
    timeout -k 5 240 python bench/gpu_bench.py --deadline-s 200 --out "$OUT/gpu_results.json" 2>&1 | tail -40
  fi
  stamp "shared_prompt_bench"
  if [ "$DRY" = 1 ]; then
    timeout -k 5 120 python bench/shared_prompt_bench.py --pairs 4 --prompt 200 --response 50 --budget 2048 \
      --repeats 1 2>&1 | tail -8
  else
    timeout -k 5 75 python bench/shared_prompt_bench.py --device cuda --bf16 --pairs 64 --hidden 1024 --layers 8 \
      --budget 16384 2>&1 | tail -8
  fi
  stamp "done"
} 2>&1 | tee "$OUT/session.log"
