"""Shared pieces of the NumPyro benchmarks: Gaussian-target and digits-BNN fits."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from numpyro.infer.initialization import init_to_value

from numpyro_psvi import ProximalScoreVI
from numpyro_psvi.batches import advance_epoch_order, batch_indices, init_epoch_order
from numpyro_psvi.contrib.models import gaussian_target, mlp_classifier, mlp_init_values
from numpyro_psvi.scores import subsampled_plates
from psvi.contrib.datasets import load_digits
from psvi.metrics import classification_report, gaussian_kl

RESULTS = Path(__file__).parent / "results"
# The project's data folder beside the checkout; the loaders read the environment
# variables set from it (library code never guesses data locations).
DATASETS = Path(os.environ.get("PSVI_DATA", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
for _variable, _folder in (("PSVI_UCI", "uci"), ("PSVI_MNIST", "mnist"), ("PSVI_ETT", "ett"),
                           ("PSVI_POSTERIORDB", "posteriordb")):  # fmt: skip
    if (DATASETS / _folder).is_dir():
        os.environ.setdefault(_variable, str(DATASETS / _folder))


def band_errors(
    loc: np.ndarray, sd: np.ndarray, reference: tuple[np.ndarray, np.ndarray]
) -> tuple[float, float, float]:
    """The max |mean error| of a fit's ``loc`` in the reference's sds, and the min and
    max ratio of its ``sd`` to the reference's."""
    ref_mean, ref_sd = reference
    ratios = sd / ref_sd
    return float(np.max(np.abs(loc - ref_mean) / ref_sd)), float(ratios.min()), float(ratios.max())


def in_band(errors, lows, highs) -> np.ndarray:
    """Whether each fit (scalars or arrays of them) is in the reference band of the
    posterior studies: every |mean error| <= 0.25 sd and every sd ratio in [0.6, 1.5]
    (NaN: not in it)."""
    errors, lows, highs = (np.asarray(v, np.float64) for v in (errors, lows, highs))
    return (errors <= 0.25) & (lows >= 0.6) & (highs <= 1.5)


def first_in_band(points: list, errors: list, lows: list, highs: list) -> int | None:
    """The first of ``points`` (calls or updates) whose fit is :func:`in_band`."""
    inside = [
        point for point, err, low, high in zip(points, errors, lows, highs, strict=True)
        if in_band(err, low, high)
    ]  # fmt: skip
    return inside[0] if inside else None


def machine() -> str:
    """A one-line description of the machine the numbers come from."""
    return f"{platform.machine()} CPU, {jax.device_count()} JAX device(s), {platform.processor() or 'cpu'}"


ENGINE_SETTINGS = ("prox_weight", "average_iterates", "inner_steps", "inner_solver")


def add_engine_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """``--prox-weights``, ``--average``, ``--inner-steps`` and ``--inner-solvers``:
    ProximalScoreVI's options in place of its defaults, every combination of them
    (:func:`engine_settings`)."""
    parser.add_argument("--prox-weights", type=float, nargs="+", default=[None], help="ProximalScoreVI only")
    parser.add_argument("--average", nargs="+", default=["default"], choices=["default", "on", "off"])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[None], help="ProximalScoreVI only")
    parser.add_argument(
        "--inner-solvers", nargs="+", default=["default"], choices=["default", "closed_form", "optimizer"]
    )


def engine_settings(options: argparse.Namespace) -> list[dict]:
    """ProximalScoreVI's keyword options of each ``--prox-weights`` x ``--average`` x
    ``--inner-steps`` x ``--inner-solvers`` combination (none given: the engine's default)."""
    settings = []
    combinations = itertools.product(
        options.prox_weights, options.average, options.inner_steps, options.inner_solvers
    )
    for weight, average, steps, solver in combinations:
        chosen = {
            "prox_weight": weight,
            "average_iterates": {"on": True, "off": False}.get(average),
            "inner_steps": steps,
            "inner_solver": None if solver == "default" else solver,
        }
        settings.append({name: value for name, value in chosen.items() if value is not None})
    return settings


def row_method_label(row: dict) -> str:
    """A result row's method with the engine settings it was run with, if any."""
    settings = ", ".join(f"{name} {row[name]}" for name in ENGINE_SETTINGS if name in row)
    return f"{row['method']} ({settings})" if settings else row["method"]


def adam_with_decoder_scaled(lr: float, decoder_scale: float) -> object:
    """NumPyro's ``Adam(lr)``, or with ``decoder_scale != 1`` optax's ``multi_transform``
    of two Adams: ``lr * decoder_scale`` for the params named ``decoder...`` (a decoder
    network in the model), ``lr`` for the rest (docs/guides.md, "Model params: one
    optimizer step per update")."""
    if decoder_scale == 1.0:
        return numpyro.optim.Adam(lr)
    import optax

    def part(params: dict) -> dict:
        return {name: "decoder" if name.startswith("decoder") else "rest" for name in params}

    return optax.multi_transform({"decoder": optax.adam(lr * decoder_scale), "rest": optax.adam(lr)}, part)


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    return path


METHOD_LABELS = {
    "psvi": "ProximalScoreVI",
    "advi": "ADVI",
    "advi_psvi": "ADVI, then ProximalScoreVI",
    "ivon": "IVON",
    "advi_reshuffled": "ADVI (reshuffled batches)",
    "psvi_iid": "ProximalScoreVI (independent batches)",
}


def guide_summary(losses: list[float], scales: np.ndarray) -> dict:
    """What the BNN benchmarks record of a returned guide: its ELBO (the mean of ``-loss``
    over seeded mini-batches) with the standard error of that mean, and the 10/50/90%
    quantiles of its sds."""
    return {"elbo": -float(np.mean(losses)), "elbo_se": float(np.std(losses) / np.sqrt(len(losses))),
            "sd_quantiles": np.quantile(scales, [0.1, 0.5, 0.9]).tolist()}  # fmt: skip


def method_label(method: str) -> str:
    """``psvi`` -> ProximalScoreVI, ``psvi_K5`` -> ProximalScoreVI (K=5), ``advi`` -> ADVI, ..."""
    base, _, inner = method.partition("_K")
    return f"{METHOD_LABELS[base]} (K={inner})" if inner else METHOD_LABELS[base]


def phases(method: str, steps: int) -> list[tuple[str, int]]:
    """The engines a benchmark method runs, in order, with their steps: ``advi_psvi`` is ADVI
    for the first half of the budget, then ProximalScoreVI started from ADVI's guide."""
    if method == "advi_psvi":
        return [("advi", steps // 2), ("psvi", steps - steps // 2)]
    return [(method, steps)]


def make_engine(kind: str, model, guide, lr: float, num_particles: int, **options):
    """``"psvi"`` (ProximalScoreVI), ``"psvi_iid"`` (the same with the plates' own
    independent batches), ``"advi"`` (SVI with Trace_ELBO) or ``"advi_reshuffled"``
    (the same SVI on the engines' reshuffled batches), Adam(lr)."""
    optim = numpyro.optim.Adam(lr)
    if kind == "advi":
        return SVI(model, guide, optim, Trace_ELBO(num_particles=num_particles))
    if kind == "advi_reshuffled":
        return ReshuffledSVI(model, guide, optim, Trace_ELBO(num_particles=num_particles))
    if kind == "psvi_iid":
        options = {**options, "reshuffle": False}
    return ProximalScoreVI(model, guide, optim, num_particles=num_particles, **options)


class ReshuffledSVI:
    """NumPyro's ``SVI`` on mini-batches drawn as ProximalScoreVI's ``reshuffle=True``
    draws them (:mod:`numpyro_psvi.batches`): the control that separates what the
    batches give from what the objective gives. Its state is ``(SVIState, EpochOrder)``;
    the guide must not depend on the batch (global latents only)."""

    def __init__(self, model, guide, optim, loss) -> None:
        def on_batch(*args, _indices=None, **kwargs):
            with numpyro.handlers.substitute(data=_indices or {}):
                return model(*args, **kwargs)

        def guide_on_batch(*args, _indices=None, **kwargs):
            return guide(*args, **kwargs)

        self.svi = SVI(on_batch, guide_on_batch, optim, loss)
        self.model, self.guide, self.plates = model, guide, {}

    def init(self, rng_key, *args, init_params=None, **kwargs):
        self.plates = subsampled_plates(self.model, args, kwargs)
        order = init_epoch_order(self.plates, jax.random.fold_in(rng_key, 1))
        return self.svi.init(rng_key, *args, init_params=init_params, **kwargs), order

    def update(self, state, *args, **kwargs):
        svi_state, order = state
        indices = batch_indices(order, self.plates)
        svi_state, loss = self.svi.update(svi_state, *args, _indices=indices, **kwargs)
        key = jax.random.fold_in(svi_state.rng_key, 1)
        return (svi_state, advance_epoch_order(order, self.plates, key)), loss

    def get_params(self, state):
        return self.svi.get_params(state[0])


def gaussian_calls_to_kl(
    mean: np.ndarray,
    cov: np.ndarray,
    make: Callable,
    num_particles: int,
    max_calls: int,
    thresholds: tuple[float, ...] = (0.1, 0.01),
    check_every: int = 25,
    seed: int = 1,
) -> dict:
    """Score calls until forward KL(target || q) first drops below each threshold.

    The guide is AutoMultivariateNormal started at N(0, 0.1^2 I).
    """
    dim = len(mean)
    model = gaussian_target(mean, cov)
    guide = AutoMultivariateNormal(
        model, init_loc_fn=init_to_value(values={"x": jnp.zeros(dim)}), init_scale=0.1
    )
    engine = make(model, guide)
    state = engine.init(jax.random.PRNGKey(seed))
    update = jax.jit(engine.update)
    hits: dict[str, int | None] = {str(t): None for t in thresholds}
    kl = float("nan")
    start = time.perf_counter()
    for step in range(1, max_calls // num_particles + 1):
        state, _ = update(state)
        if step % check_every:
            continue
        params = engine.get_params(state)
        tril = np.asarray(params["auto_scale_tril"], np.float64)
        kl = gaussian_kl(mean, cov, np.asarray(params["auto_loc"]), tril @ tril.T)
        if not np.isfinite(kl):
            break
        for t in thresholds:
            if hits[str(t)] is None and kl < t:
                hits[str(t)] = step * num_particles
        if hits[str(min(thresholds))] is not None:
            break
    return {"calls_to_kl": hits, "final_kl": kl, "seconds": time.perf_counter() - start}


def digits_fit(make: Callable, num_calls: int, num_particles: int, batch: int = 64, seed: int = 0):
    """Fit the digits MLP (AutoNormal, init scale 0.01); test accuracy, NLL, ECE."""
    data = load_digits()
    x_train, y_train, x_test, y_test = map(jnp.asarray, data)
    model = partial(mlp_classifier, subsample_size=batch)
    guide = AutoNormal(
        model, init_loc_fn=init_to_value(values=mlp_init_values(x_train.shape[1])), init_scale=0.01
    )
    engine = make(model, guide)
    start = time.perf_counter()
    result = engine.run(
        jax.random.PRNGKey(seed), num_calls // num_particles, x_train, y_train, progress_bar=False
    )
    seconds = time.perf_counter() - start
    predictive = Predictive(
        mlp_classifier, guide=guide, params=result.params, num_samples=200, return_sites=["probs"]
    )
    probs = predictive(jax.random.PRNGKey(seed + 1), x_test)["probs"]
    report = classification_report(np.asarray(probs), np.asarray(y_test))
    return {**report, "seconds": seconds}
