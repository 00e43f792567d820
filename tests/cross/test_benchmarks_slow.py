"""Benchmarks' quick modes (slow: run with ``python -m pytest -m slow``)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gaussian_study_quick(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.gaussian_study", "--quick"], cwd=ROOT, check=True)
    result = json.loads((ROOT / "benchmarks/results/gaussian_study_quick.json").read_text())
    curves = result["curves"]["D=10 well standard S=4"]
    assert set(curves) == {"psvi_full", "psvi_diag", "advi", "gsm", "bam"}
    # GSM and BaM solve a D=10 Gaussian in a few hundred calls (docs/pitfalls.md: 86 for gsmvi).
    assert curves["gsm"]["kl"][-1] < 0.01 and curves["bam"]["kl"][-1] < 0.01
    assert set(result["minibatch_bias"]) == {"bam", "psvi_full"}


@pytest.mark.slow
def test_user_guide_cost_quick():
    subprocess.run([sys.executable, "-m", "benchmarks.user_guide_cost", "--quick"], cwd=ROOT, check=True)
    rows = json.loads((ROOT / "benchmarks/results/user_guide_cost_quick.json").read_text())["rows"]
    examples = {"coin", "Poisson rates", "eight schools", "regression II", "VAE"}
    assert {(r["backend"], r["example"]) for r in rows} == {
        (b, e) for b in ("pyro", "numpyro") for e in examples
    }
    assert all(np.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0 for r in rows)


@pytest.mark.slow
def test_cold_start_quick():
    command = ["benchmarks.cold_start", "--repeats", "1", "--steps", "10", "--tag", "_quick"]
    subprocess.run([sys.executable, "-m", *command], cwd=ROOT, check=True)
    rows = json.loads((ROOT / "benchmarks/results/cold_start_quick.json").read_text())["rows"]
    assert {(r["model"], r["method"]) for r in rows} == {
        (m, e) for m in ("eight schools", "logistic regression") for e in ("SVI", "ProximalScoreVI")
    }
    assert all(len(r["seconds"]) == 1 and r["median"] > 0 for r in rows)


@pytest.mark.slow
def test_structured_guides_quick():
    command = ["benchmarks.structured_guides", "--groups", "3", "--updates", "8", "--blocks", "1"]
    subprocess.run([sys.executable, "-m", *command, "--tag", "_quick"], cwd=ROOT, check=True)
    rows = json.loads((ROOT / "benchmarks/results/structured_guides_quick.json").read_text())["rows"]
    assert {(r["guide"], r["method"]) for r in rows} == {
        (g, m)
        for g in ("AutoGaussian", "AutoStructured")
        for m in ("SVI", "ProximalScoreVI", "ProximalScoreVI, inner_steps=5")
    }
    assert all([c["updates"] for c in r["checkpoints"]] == [2, 4, 8] and r["step_ms"] > 0 for r in rows)


@pytest.mark.slow
def test_user_optimizers_quick():
    subprocess.run([sys.executable, "-m", "benchmarks.user_optimizers", "--quick"], cwd=ROOT, check=True)
    rows = json.loads((ROOT / "benchmarks/results/user_optimizers_quick.json").read_text())["rows"]
    assert {(r["backend"], r["regime"], r["optimizer"], r["engine"]) for r in rows} == {
        (b, regime, o, e) for b in ("numpyro", "pyro") for regime in ("exact", "mini-batch")
        for o in ("Adam(1e-2)", "SGD(5e-4)") for e in ("psvi", "svi")
    }  # fmt: skip
    assert all("failed" not in r and np.isfinite(r["max mean error (sd)"]) for r in rows)


@pytest.mark.slow
def test_mixture_targets_quick():
    subprocess.run([sys.executable, "-m", "benchmarks.mixture_targets", "--quick"], cwd=ROOT, check=True)
    result = json.loads((ROOT / "benchmarks/results/mixture_targets_quick.json").read_text())
    runs = {(r["guide"], r["method"]): r for r in result["results"]}
    assert set(runs) == {(g, m) for g in ("mixture2", "mixture3", "iaf") for m in ("psvi", "advi")}
    for run in runs.values():  # every fit moves toward the target and stays finite
        assert all(np.isfinite(run["forward_kl"])) and run["forward_kl"][-1] < run["forward_kl"][0]


@pytest.mark.slow
def test_calls_to_reach_reads_the_first_check_below_and_the_late_share():
    from benchmarks.mixture_targets import calls_to_reach

    run = {"calls": [0, 40, 80, 120, 160], "forward_kl": [3.0, 0.4, 0.6, 0.3, 0.7]}
    assert calls_to_reach(run, 0.5) == (40, 1 / 3)  # late checks: 0.6, 0.3, 0.7
    assert calls_to_reach(run, 0.1) == (None, 0.0)


@pytest.mark.slow
def test_flow_cost_quick():
    subprocess.run([sys.executable, "-m", "benchmarks.flow_cost", "--quick"], cwd=ROOT, check=True)
    rows = json.loads((ROOT / "benchmarks/results/flow_cost_quick.json").read_text())["rows"]
    assert {(r["backend"], r["guide"]) for r in rows} == {
        ("pyro", "mvn"), ("pyro", "iaf"), ("pyro", "coupling"), ("numpyro", "mvn"), ("numpyro", "iaf"),
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numpyro", "pyro"])
def test_uci_quick(tmp_path, backend):
    command = [sys.executable, "-m", "benchmarks.uci", "--dataset", "yacht", "--quick", "--backend", backend,
               "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True)
    result = json.loads((tmp_path / f"uci_yacht_{backend}_quick.json").read_text())
    for method in ("psvi", "advi", "advi_psvi"):
        keys = {"test_rmse_mean", "test_rmse_se", "test_ll_mean", "test_ll_se", "score_calls", "seconds"}
        assert keys <= set(result[method]) and np.isfinite(result[method]["test_rmse_mean"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "name", "methods"),
    [
        ([], "mnist_quick", {"psvi", "advi"}),
        (["--model", "cnn", "--methods", "psvi_K5", "advi_psvi"], "mnist_cnn_quick",
         {"psvi_K5", "advi_psvi"}),
    ],
)  # fmt: skip
def test_mnist_quick(options, name, methods):
    subprocess.run([sys.executable, "-m", "benchmarks.mnist", "--quick", *options], cwd=ROOT, check=True)
    result = json.loads((ROOT / f"benchmarks/results/{name}.json").read_text())
    assert {r["method"] for r in result["results"]} == methods
    for run in result["results"]:  # 40 steps already beat chance (accuracy 0.1, NLL log 10)
        assert run["accuracy"] > 0.3 and run["nll"] < np.log(10) and len(run["curve"]) >= 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "backend"), [("dlinear", "pyro"), ("koopa", "pyro"), ("dlinear", "numpyro")]
)
def test_forecast_quick(tmp_path, model, backend):
    command = [sys.executable, "-m", "benchmarks.forecast", "--data", "ETTh1", "--horizon", "96",
               "--model", model, "--backend", backend, "--quick", "--out", str(tmp_path),
               "--plot", str(tmp_path / "window.png")]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True)
    suffix = "" if backend == "pyro" else "_numpyro"
    result = json.loads((tmp_path / f"forecast_ETTh1_{model}_96{suffix}_quick.json").read_text())
    keys = {"mse", "mae", "crps", "coverage_50", "coverage_90", "width_90", "seconds"}
    for method in ("psvi", "advi", "map"):
        assert keys <= set(result[method])
        # 20 steps from the initial weights already beat predicting zero (MSE 1 on standardized data)
        assert result[method]["mse"] < 1.0 and 0.0 < result[method]["coverage_90"] <= 1.0
    assert (tmp_path / "window.png").stat().st_size > 0


@pytest.mark.slow
def test_scale_quick():
    subprocess.run([sys.executable, "-m", "benchmarks.scale", "--quick", "--numpyro"], cwd=ROOT, check=True)
    rows = json.loads((ROOT / "benchmarks/results/scale_quick.json").read_text())["rows"]
    methods = {"sgd", "advi_plain", "psvi_plain", "advi_flat", "psvi_flat", "numpyro_sgd", "numpyro_advi",
               "numpyro_psvi", "numpyro_advi_seq", "numpyro_psvi_seq", "numpyro_advi_flat",
               "numpyro_psvi_flat"}  # fmt: skip
    assert {(r["method"], r["width"]) for r in rows} == {(m, w) for m in methods for w in (4, 8)}
    for row in rows:
        assert row["seconds"] > 0 and np.isfinite(row["ratio_to_sgd"]) and row["peak_extra_mb"] >= 0
        assert row["first_step_seconds"] > 0


@pytest.mark.slow
def test_scale_gpu_on_a_cpu(tmp_path):
    """benchmarks/scale_gpu.py's code path on a CPU (small ResNet; torchvision's networks
    need torchvision, absent here): rows for each method, merged into one JSON."""
    out = tmp_path / "scale_gpu.json"
    command = [sys.executable, "-m", "benchmarks.scale_gpu", "--device", "cpu", "--models", "resnet_gn4",
               "--methods", "sgd", "advi_flat", "psvi_flat", "--repeats", "1", "--out", str(out)]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True)
    payload = json.loads(out.read_text())
    assert [r["method"] for r in payload["rows"]] == ["sgd", "advi_flat", "psvi_flat"]
    for row in payload["rows"]:
        assert row["num_weights"] == 44_550 and row["seconds"] > 0 and row["peak_extra_bytes"] is None
    table = subprocess.run([*command[:3], "--table", "--out", str(out)], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout  # fmt: skip
    assert "| resnet_gn4 | 4.46e+04 | 62 | psvi_flat |" in table


@pytest.mark.slow
def test_scale_mnist_quick():
    subprocess.run([sys.executable, "-m", "benchmarks.scale", "--mnist", "--quick"], cwd=ROOT, check=True)
    runs = json.loads((ROOT / "benchmarks/results/scale_mnist_quick.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["psvi", "advi"]
    for run in runs:  # 10 steps: finite, calibrated-or-not, but a valid predictive
        assert run["num_rejected"] == 0 and len(run["curve"]) == 2 and 0 <= run["test_error"] <= 1
        assert np.isfinite(run["nll"]) and 0 <= run["ece"] <= 1
        assert 0 <= run["mean_network"]["test_error"] <= 1 and np.isfinite(run["mean_network"]["nll"])
    assert 0 <= runs[0]["last_iterate"]["mean_network"]["test_error"] <= 1  # psvi averages its iterates


@pytest.mark.slow
def test_conjugate_exact_solve_quick():
    command = [sys.executable, "-m", "benchmarks.conjugate_exact_solve", "--quick"]
    subprocess.run(command, cwd=ROOT, check=True)
    rows = json.loads((ROOT / "benchmarks/results/conjugate_exact_solve_quick.json").read_text())["rows"]
    assert {(r["target"], r["updates"]) for r in rows} == {
        (t, u) for t in ("precision", "coin") for u in (20, 50, 100)
    }
    # The start a = b = 5 is about 14 times as wide as either posterior (a Gamma's sd of
    # log tau is sqrt(trigamma(a)): a = 5 against about 1,000); after 100 updates the
    # averaged sds are within a factor of 2 (measured: 0.82 and 0.77).
    assert all(0.5 < r["average sd ratio"] < 2.0 for r in rows if r["updates"] == 100)


@pytest.mark.slow
def test_enumeration_quick():
    command = ["benchmarks.enumeration", "--seeds", "0", "--updates", "250", "--blocks", "1", "--steps", "2"]
    subprocess.run([sys.executable, "-m", *command, "--out", "enumeration_quick"], cwd=ROOT, check=True)
    result = json.loads((ROOT / "benchmarks/results/enumeration_quick.json").read_text())
    assert {(r["backend"], r["method"], r["batch"], r["lr"]) for r in result["fits"]} == {
        (b, m, batch, lr) for b in ("numpyro", "pyro") for m in ("svi", "psvi") for batch in (None, 100)
        for lr in (1e-2, 1e-3)
    }  # fmt: skip
    # Exact scores at Adam(1e-2): 250 updates bring the engine within 0.1 sd (measured 0.01-0.06).
    exact = [r for r in result["fits"] if r["method"] == "psvi" and r["batch"] is None and r["lr"] == 1e-2]
    assert all(r["250"]["mean_error_sd"] < 0.1 for r in exact)
    assert all(r["ratio"] > 0 for r in result["step_times"])
