"""Benchmarks' quick modes (slow: run with ``python -m pytest -m slow``)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_gaussian_study_quick(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.gaussian_study", "--quick"], cwd=ROOT, check=True)
    result = json.loads((ROOT / "benchmarks/results/gaussian_study_quick.json").read_text())
    curves = result["curves"]["D=10 well standard S=4"]
    assert set(curves) == {"psvi_full", "psvi_diag", "advi", "gsm", "bam"}
    # GSM and BaM solve a D=10 Gaussian in a few hundred calls (PITFALLS.md: 86 for gsmvi).
    assert curves["gsm"]["kl"][-1] < 0.01 and curves["bam"]["kl"][-1] < 0.01
    assert set(result["minibatch_bias"]) == {"bam", "psvi_full"}
