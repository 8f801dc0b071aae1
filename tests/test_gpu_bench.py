"""bench/gpu_bench.py --dry-run: the GPU benchmark's whole pipeline on CPU with tiny sizes (fixture, our runs,
timing from metrics.jsonl, MFU, the table), so the GPU run that needs it has been exercised before a GPU is lent."""
import json
import math
import subprocess
import sys

import pytest

from tests.launching import ENV, ROOT


@pytest.mark.slow
def test_gpu_bench_dry_run(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "bench/gpu_bench.py", "--dry-run", "--only",
                           "ours_sft,ours_dpo_reference,ours_dpo", "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    runs = results["runs"]
    assert sorted(runs) == ["ours_dpo", "ours_dpo_reference", "ours_sft"]
    facts = results["facts"]
    for name in ("ours_sft", "ours_dpo"):
        r = runs[name]
        assert r["rc"] == 0 and r["timed_steps"] == facts["timed_steps"], r
        assert r["real_tok_s"] > 0 and 0 < r["mfu"] < 1 and r["attention"] == "segment_sdpa", r
    assert math.isclose(runs["ours_dpo"]["losses"][0], math.log(2), abs_tol=1e-3)  # policy == reference at step 1
    assert dict(results["skipped"])["trl_sft_padding_free"] == "not asked for"
    table = out.with_suffix(".md").read_text()
    assert "| ours_sft | 0 |" in table and "| ours_dpo | 0 |" in table
