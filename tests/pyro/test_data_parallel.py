"""Data-parallel fitting over torch.distributed (gloo, CPU processes).

The ranks start as ``torchrun`` would start them (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) running :mod:`psvi_testing.pyro_data_parallel`; the
tests compare what rank 0 wrote with the one-process fit on the same global batch (run
in the test's process). The data
and params are float64: the ranks' mean differs from the one-process sum only in the
order of the additions (relative 1e-16 per operation), so after 10 steps the params
agree to 1e-10; a different mini-batch, particle or scale would move them by 1e-2 or
more.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed
from psvi_testing.pyro_data_parallel import JOB_SEPARATOR, run_fits
from pyro.infer.autoguide import AutoNormal

from pyro_psvi import ProximalScoreVI
from pyro_psvi.batches import SharedSubsample
from pyro_psvi.parallel import ScoreReducer, ShardedPlates

SUPPORT = Path(__file__).parents[1] / "support"
GLOBAL_BATCH, STEPS = 16, 10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(world: int, argv: list[str], wait: float = 120.0) -> list[subprocess.CompletedProcess]:
    """Run the fits ``argv`` lists on ``world`` ranks; returns each rank's completed
    process (a rank still running when rank 0 is done, or after ``wait`` seconds, is
    killed)."""
    command = [sys.executable, "-m", "psvi_testing.pyro_data_parallel", *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    ranks = [
        {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
        for r in range(world)
    ]  # fmt: skip
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    processes = [subprocess.Popen(command, env={**env, **extra}, **pipes) for extra in ranks]
    results = []
    for index, process in enumerate(processes):
        try:
            stdout, stderr = process.communicate(timeout=wait if index == 0 else 10.0)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    return results


def _argv(world: int | None, case: str, steps: int, out: Path, *options: str) -> list[str]:
    return [case, str(steps), str(out), "--batch", str(GLOBAL_BATCH // (world or 1)), *options]


def _fit(tmp_path: Path, world: int | None, case: str, steps: int = STEPS, *options: str) -> dict:
    """A fit on ``world`` ranks, or in this process for ``None`` (no process group)."""
    out = tmp_path / f"{case}-{world}.npz"
    argv = _argv(world, case, steps, out, *options)
    if world is None:
        run_fits(argv)
    else:
        _assert_succeeded(_run(world, argv))
    return dict(np.load(out))


@pytest.fixture(scope="module")
def two_rank_fits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The two-rank fits of the default tests, by name: one launch of two ranks runs them
    all, one after the other (each rank's start, seconds of importing torch and Pyro, is
    paid once). ``saved``'s checkpoint is ``checkpoint``'s value."""
    folder = tmp_path_factory.mktemp("two_ranks")
    checkpoint = folder / "fit.psvi"
    fits = {
        "normal": ("normal", STEPS),
        "mvn": ("mvn", STEPS),
        "param": ("param", STEPS),
        "given-indices": ("normal", STEPS, "--given-indices"),
        "non-finite": ("normal", 6, "--non-finite-at", "3"),
        "saved": ("normal", 3, "--save", str(checkpoint)),
    }
    argv = []
    for name, (case, steps, *options) in fits.items():
        argv += [JOB_SEPARATOR] * bool(argv) + _argv(2, case, steps, folder / f"{name}.npz", *options)
    _assert_succeeded(_run(2, argv, wait=60.0 * len(fits)))
    loaded = {name: dict(np.load(folder / f"{name}.npz")) for name in fits}
    loaded["non-finite-rank1"] = dict(np.load(folder / "non-finite-rank1.npz"))
    loaded["checkpoint"] = checkpoint
    return loaded


def _assert_succeeded(results: list[subprocess.CompletedProcess]) -> None:
    for rank, result in enumerate(results):
        tail = result.stderr[-3000:]
        assert result.returncode == 0, f"rank {rank} exited with {result.returncode}:\n{tail}"


def _params(fit: dict) -> dict:
    return {key: value for key, value in fit.items() if key.startswith("param:")}


def _assert_same_steps(ranks: dict, one: dict) -> None:
    assert _params(one).keys() == _params(ranks).keys()
    for name, value in _params(one).items():
        np.testing.assert_allclose(ranks[name], value, rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(ranks["losses"], one["losses"], rtol=1e-10)
    for diagnostic in ("evaluate_loss", "fisher"):  # full scores reduced, fresh particles
        np.testing.assert_allclose(ranks[diagnostic], one[diagnostic], rtol=1e-10)
    assert int(ranks["num_score_calls"]) == int(one["num_score_calls"]) == 4 * STEPS
    assert int(ranks["num_rejected"]) == int(one["num_rejected"])


@pytest.mark.parametrize("case", ["normal", "mvn", "param"])
def test_two_ranks_take_the_one_process_steps(tmp_path, fresh_pyro, two_rank_fits, case):
    ranks = two_rank_fits[case]
    _assert_same_steps(ranks, _fit(tmp_path, None, case))
    if case == "normal":
        # AutoNormal, D = 4, S = 4: per step the failure flag, S log joints, the two
        # score-dependent sums (2 D) and the accept vote, not the S D scores.
        assert int(ranks["floats_reduced"]) == STEPS * (1 + 4 + 2 * 4 + 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "world"),
    # user: a hand-written guide, scores reduced; enum: an enumerated latent per point
    [("normal", 4), ("user", 2), ("enum", 2)],
)
def test_ranks_take_the_one_process_steps(tmp_path, fresh_pyro, case, world):
    _assert_same_steps(_fit(tmp_path, world, case), _fit(tmp_path, None, case))


def test_ranks_given_their_own_indices_take_the_one_process_steps(tmp_path, fresh_pyro, two_rank_fits):
    """Each rank passes its share of the global batch to the plate (``subsample=``, as a
    DistributedSampler would give it): the plate is left as it is, and the steps are
    those of one process given the whole batch."""
    one = _fit(tmp_path, None, "normal", STEPS, "--given-indices")
    ranks = two_rank_fits["given-indices"]
    for name, value in _params(one).items():
        np.testing.assert_allclose(ranks[name], value, rtol=1e-10, atol=1e-12, err_msg=name)


def test_a_non_finite_score_on_one_rank_rejects_the_step_on_every_rank(two_rank_fits):
    rank0, rank1 = two_rank_fits["non-finite"], two_rank_fits["non-finite-rank1"]
    for fit in (rank0, rank1):
        assert int(fit["num_rejected"]) == 1
        assert np.isnan(fit["losses"][3]) and np.isfinite(np.delete(fit["losses"], 3)).all()
    for name, value in _params(rank0).items():
        np.testing.assert_array_equal(rank1[name], value, err_msg=name)


@pytest.mark.slow
def test_gsm_ranks_take_the_one_process_steps(tmp_path, fresh_pyro):
    one = _fit(tmp_path, None, "mvn", STEPS, "--gsm")
    ranks = _fit(tmp_path, 2, "mvn", STEPS, "--gsm")
    for name, value in _params(one).items():
        np.testing.assert_allclose(ranks[name], value, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("world", [None, pytest.param(4, marks=pytest.mark.slow)])
def test_a_checkpoint_of_two_ranks_resumes_on_any_number(tmp_path, fresh_pyro, two_rank_fits, world):
    straight = _fit(tmp_path, None, "normal", 6)
    resumed = _fit(tmp_path, world, "normal", 3, "--load", str(two_rank_fits["checkpoint"]))
    for name, value in _params(straight).items():
        np.testing.assert_allclose(resumed[name], value, rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(resumed["losses"], straight["losses"][3:], rtol=1e-10)
    assert int(resumed["num_score_calls"]) == 4 * 6


def test_a_model_error_on_one_rank_stops_every_rank(tmp_path):
    results = _run(2, _argv(2, "normal", 6, tmp_path / "out.npz", "--fail-at", "3"))
    assert results[1].returncode != 0 and "a model error on rank 1" in results[1].stderr
    assert results[0].returncode != 0
    assert "RankFailedError: 1 of the 2 ranks failed in their score phase" in results[0].stderr


@pytest.mark.slow  # 17-30 s on the 2-core CI machine: the default suite keeps its budget
def test_a_hanging_rank_times_out_with_a_clear_error(tmp_path):
    results = _run(2, _argv(2, "normal", 6, tmp_path / "out.npz", "--hang-at", "3", "--timeout", "3"))
    assert results[0].returncode != 0
    assert "TimeoutError: Rank 0 got no answer from the other 1 ranks" in results[0].stderr


def test_ranks_with_different_seeds_are_refused(tmp_path):
    results = _run(2, _argv(2, "normal", 2, tmp_path / "out.npz", "--seed-by-rank"))
    assert all(result.returncode != 0 for result in results)
    assert "needs the same initial params and random state on every rank" in results[0].stderr
    assert "pyro.set_rng_seed(seed) with the same seed on every rank" in results[0].stderr


def test_shards_of_a_batch_are_the_one_process_batch(fresh_pyro):
    """Rank r of R keeps the r-th contiguous share of the draw one process makes with
    subsample_size R B, and a replayed pass sees the same share."""

    def model():
        with pyro.plate("data", 100, subsample_size=8) as index:
            return index

    pyro.set_rng_seed(3)
    with pyro.plate("data", 100, subsample_size=32) as one_process:
        pass
    shares = []
    for rank in range(4):
        pyro.set_rng_seed(3)
        replay: dict[str, torch.Tensor] = {}
        with ShardedPlates(rank, 4), SharedSubsample(replay):
            first, again = model(), model()
        assert torch.equal(first, again)
        shares.append(first)
    assert torch.equal(torch.cat(shares), one_process)


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process."""
    store = f"file://{tmp_path / 'store'}"
    torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _regression(local: bool = False, subsample_size: int | None = 8):
    x, y = torch.randn(32, 2), torch.randn(32)

    def model():
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", 32, subsample_size=subsample_size) as index:
            shift = pyro.sample("z", dist.Normal(0.0, 1.0)) if local else 0.0
            pyro.sample("y", dist.Normal((x[index] * w).sum(-1) + shift, 1.0), obs=y[index])

    return model


def test_data_parallel_needs_a_process_group(fresh_pyro):
    model = _regression()
    svi = ProximalScoreVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), data_parallel=True)
    with pytest.raises(RuntimeError, match="needs an initialized torch.distributed process group"):
        svi.step()


def test_local_latents_are_refused(fresh_pyro, one_rank_group):
    model = _regression(local=True)
    svi = ProximalScoreVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), data_parallel=True)
    with pytest.raises(NotImplementedError, match="does not support local latents yet: site 'z'"):
        svi.step()


def test_a_model_without_a_mini_batch_is_refused(fresh_pyro, one_rank_group):
    model = _regression(subsample_size=None)
    svi = ProximalScoreVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), data_parallel=True)
    with pytest.raises(ValueError, match="this model subsamples none"):
        svi.step()


def test_a_global_batch_larger_than_the_data_is_refused(fresh_pyro):
    with pytest.raises(ValueError, match=r"2 ranks of subsample_size=20 need a global batch of 40"):
        with ShardedPlates(0, 2), pyro.plate("data", 32, subsample_size=20):
            pass


def test_one_rank_group_is_off_by_default_and_on_when_asked(fresh_pyro, one_rank_group):
    model = _regression()
    off = ProximalScoreVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}))
    off.step()
    assert off.reducer is None
    pyro.clear_param_store()
    reducer = ScoreReducer(timeout=10.0)
    on = ProximalScoreVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.01}), data_parallel=reducer)
    on.step()
    assert on.reducer is reducer and reducer.floats_reduced > 0
