"""Every script in examples/ runs (``--quick`` where it has one) and prints what its
docstring promises; each under two minutes on two CPU cores, so they are ``slow``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(script: str, *options: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *options],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _numbers(line: str, label: str) -> np.ndarray:
    """The bracketed array after ``label`` in a printed line."""
    return np.array([float(v) for v in re.search(rf"{label} \[([^\]]*)\]", line).group(1).split()])


def test_quickstart(tmp_path):
    out = _run("quickstart.py", "--calls", "4000", "--out", str(tmp_path / "curve.png"))
    assert "ProximalScoreVI" in out and "ADVI" in out
    assert (tmp_path / "curve.png").is_file()


def test_pyro_regression_matches_the_exact_posterior():
    lines = {line.split()[0]: line for line in _run("pyro_regression.py").splitlines() if " sds [" in line}
    exact, fitted = lines["exact"], lines["ProximalScoreVI"]
    exact_means, exact_sds = _numbers(exact, "means"), _numbers(exact, "sds")
    fitted_means, fitted_sds = _numbers(fitted, "means"), _numbers(fitted, "sds")
    # The project's bar for an exact-score fit: means within 0.2 sd, sds within 20%.
    assert np.all(np.abs(fitted_means - exact_means) < 0.2 * exact_sds)
    assert np.all(np.abs(fitted_sds / exact_sds - 1) < 0.2)


def test_numpyro_eight_schools_reports_the_fit():
    out = _run("numpyro_eight_schools.py", "--steps", "1000")
    assert re.search(r"PSIS k-hat [-\d.]+", out) and "theta[7]" in out


def test_numpyro_mixture_finds_the_components():
    """Three unit-variance components at -4, 0 and 5 (300, 200 and 100 points): the
    fitted locations within 0.3 of the centres (each component's sample mean is within
    3 / sqrt(100) of its centre at 3 sds, its posterior sd 0.06-0.13 on top), and the
    assignments drawn with infer_discrete match the generating ones on over 90% of the
    points (the Bayes classifier's rate here is about 96%: the components overlap)."""
    out = _run("numpyro_mixture.py")
    fitted = next(line for line in out.splitlines() if line.startswith("ProximalScoreVI: locs"))
    np.testing.assert_allclose(_numbers(fitted, "means"), [-4.0, 0.0, 5.0], atol=0.3)
    matched = re.search(r"ProximalScoreVI: assignments that match the generating components ([\d.]+)", out)
    assert float(matched.group(1)) > 0.9


def test_pyro_hmm_finds_the_states():
    """Two states emitting N(-1, 1) and N(2, 1), 500 observations: the fitted locations
    within 0.3 of them (each state's 234-266 points put its sample mean within 0.2 at 3
    sds), and the states decoded by infer_discrete right for over 90% of the steps (the
    true parameters' decoding gets 97.6% here: the emissions overlap)."""
    out = _run("pyro_hmm.py")
    fitted = next(line for line in out.splitlines() if line.startswith("ProximalScoreVI: locs"))
    np.testing.assert_allclose(_numbers(fitted, "locs"), [-1.0, 2.0], atol=0.3)
    matched = re.search(r"ProximalScoreVI: decoded states matching the true ones ([\d.]+)", out)
    assert float(matched.group(1)) > 0.9


def test_numpyro_vae_improves_the_held_out_elbo():
    losses = [
        float(v)
        for v in re.findall(
            r"ProximalScoreVI .*held-out -ELBO per image +([\d.]+)", _run("numpyro_vae.py", "--quick")
        )
    ]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_pyro_bnn_mnist(datasets_root):
    out = _run("pyro_bnn_mnist.py", "--data", str(datasets_root / "mnist"), "--quick")
    accuracy = [float(v) for v in re.findall(r"accuracy ([\d.]+)", out)]
    assert len(accuracy) == 2 and min(accuracy) > 0.8  # 10 classes: chance is 0.1


def test_pyro_forecasting(datasets_root):
    out = _run("pyro_forecasting.py", "--data", str(datasets_root / "ett"), "--quick")
    assert len(re.findall(r"MSE [\d.]+, MAE [\d.]+, CRPS [\d.]+", out)) == 2


def test_pyro_data_parallel_on_two_ranks_matches_the_exact_posterior():
    """Under torchrun with 2 gloo ranks (a global batch of 200 of 4000 points): the
    project's standard for mini-batch fits, means within 0.2 posterior sd and sds within
    20% of the exact conjugate posterior."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "examples" / "pyro_data_parallel.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ranks 2, global batch 200, data parallel True" in done.stdout
    lines = {line.split(" sds ")[0]: line for line in done.stdout.splitlines() if " sds [" in line}
    exact_sd, fitted_sd = _numbers(lines["exact"], "sds"), _numbers(lines["ProximalScoreVI"], "sds")
    means = {line.split(" means ")[0]: line for line in done.stdout.splitlines() if " means [" in line}
    exact_mean, fitted_mean = _numbers(means["exact"], "means"), _numbers(means["ProximalScoreVI"], "means")
    assert np.all(np.abs(fitted_mean - exact_mean) < 0.2 * exact_sd)
    assert np.all(np.abs(fitted_sd / exact_sd - 1) < 0.2)
