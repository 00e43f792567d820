"""PSIS k-hat of a VI fit's log weights (``psvi.inference_data.pareto_khat``) and the export's
container (``use_datatree``)."""

import numpy as np
import pytest

from psvi import inference_data
from psvi.inference_data import CONSTANT_LOG_WEIGHTS, pareto_khat


def test_log_weights_constant_to_round_off_have_no_tail():
    # An exact fit in float32: log p - log q is the log evidence (-98 here) plus round-off
    # of ~1e-5 nats, whose Pareto fit can give anything (inf on such a draw).
    rng = np.random.default_rng(0)
    log_weights = -98.05 + np.float32(1e-5) * rng.standard_normal(300)
    assert pareto_khat(log_weights) == float("-inf")
    assert pareto_khat(log_weights + np.linspace(0.0, 0.5 * CONSTANT_LOG_WEIGHTS, 300)) == float("-inf")


def test_light_and_heavy_tails_are_told_apart():
    rng = np.random.default_rng(0)
    # Weights ~ Pareto with shape xi (log w exponential with mean xi) have k = xi; 4,000
    # draws estimate it to about +-0.1 (Vehtari et al. 2024, PSIS, section 3).
    heavy = rng.exponential(1.0, size=4000)
    assert pareto_khat(heavy) > 0.7
    # Gaussian log weights with sd 0.3 (a close fit): lognormal weights, k-hat well below 0.5.
    light = 0.3 * rng.standard_normal(4000)
    assert pareto_khat(light) < 0.5


@pytest.mark.parametrize("library", ["arviz 0.x", "arviz-stats"])
def test_each_arviz_generation_estimates_a_known_tail_shape(monkeypatch, library):
    """k-hat from ArviZ 0.x's ``psislw`` and from ``arviz-stats``' (ArviZ 1.x), whichever the
    installed ArviZ has. Log weights exponential with mean xi are Pareto weights of shape
    k = xi; 4,000 draws fit the tail's 3 sqrt(4000) = 190 largest, whose k-hat has sd about
    (1 + k) / sqrt(190) = 0.11 at k = 0.5: 0.35 is three of those."""
    if library == "arviz-stats":
        pytest.importorskip("arviz_stats")
        monkeypatch.setattr(inference_data, "_arviz_major", lambda: 1)
    elif inference_data._arviz_major() is None or inference_data._arviz_major() >= 1:
        pytest.skip("ArviZ 0.x is not installed")
    log_weights = np.random.default_rng(1).exponential(0.5, size=4000)
    assert pareto_khat(log_weights) == pytest.approx(0.5, abs=0.35)


def test_the_export_container_follows_the_installed_arviz_and_names_what_is_missing(monkeypatch):
    """``use_datatree``: ArviZ 0.x makes InferenceData, ArviZ >= 1 (or arviz-base alone)
    DataTrees; asking for a container whose library is missing names the package."""
    monkeypatch.setattr(inference_data, "_arviz_major", lambda: 0)
    assert inference_data.use_datatree(None) is False
    monkeypatch.setattr(inference_data, "_arviz_major", lambda: 1)
    with pytest.raises(ImportError, match=r"pip install 'arviz<1'"):
        inference_data.use_datatree(False)
    monkeypatch.setattr(inference_data, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install arviz-base arviz-stats"):
        inference_data.use_datatree(None)
    monkeypatch.setattr(inference_data, "_arviz_major", lambda: None)
    with pytest.raises(ImportError, match="arviz-base"):
        inference_data.use_datatree(True)
