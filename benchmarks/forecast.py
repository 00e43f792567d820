"""Bayesian deep forecasting on ETT (the paper's time-series experiment): a Bayesian
Koopa (or DLinear) fitted with ProximalScoreVI and with ADVI, and the deterministic
network (MAP) as a reference.

Protocol (Informer / Autoformer / Koopa): ``ETTh1`` or ``ETTh2`` from the local file
(``psvi.contrib.datasets.load_ett``), rows split 12/4/4 months chronologically, all 7 channels
standardized with the training statistics, lookback 96, horizon 96/192/336/720,
every window with stride 1; metrics on the standardized scale over all test windows.

Model: ``pyro_psvi.contrib.forecasting.forecaster`` (Gaussian likelihood, per-channel noise
scale with a HalfNormal(1) prior) on the network made Bayesian with
``bayesian_module(net, fan_in_prior())`` (``N(0, 1/fan_in)`` weights, ``N(0, 1)``
biases). All three methods start from the same network initialisation, use Adam
(1e-3), mini-batches of 32 windows through the model's subsampled plate and the same
number of steps; ProximalScoreVI (defaults) and ADVI (``SVI`` + ``Trace_ELBO``) fit
the same AutoNormal guide (initial scale 0.01) with S=4 particles, so equal score
calls; MAP is ``SVI`` with ``AutoDelta`` (one score call per step). The predictive
takes 100 guide draws, each with its own Gaussian noise draw.

    python -m benchmarks.forecast --data ETTh1 --horizon 96 --model koopa|dlinear
        [--backend pyro|numpyro] [--steps N] [--quick] [--out DIR] [--plot PNG]
    python -m benchmarks.forecast --table DIR

writes ``forecast_{data}_{model}_{horizon}[_numpyro][_quick].json`` to DIR (default
``benchmarks/results/forecast``) with, per method key (``psvi``, ``advi``, ``map``):
``mse``, ``mae``, ``crps``, ``coverage_50``, ``coverage_90``, ``width_90``,
``seconds``, ``score_calls``.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value
from tqdm import tqdm

from benchmarks.common import machine
from psvi.contrib.datasets import ETT_CHANNELS, load_ett, sliding_windows
from psvi.metrics import forecast_report
from pyro_psvi import ProximalScoreVI
from pyro_psvi.contrib.forecasting import DLinear, Koopa, forecaster, mask_spectrum
from pyro_psvi.contrib.models import bayesian_module, fan_in_prior

RESULTS = Path(__file__).parent / "results" / "forecast"
LOOKBACK = 96
BATCH = 32
NUM_PARTICLES = 4
LEARNING_RATE = 1e-3
NUM_DRAWS = 100
METHODS = ("psvi", "advi", "map")
LABEL = {"psvi": "ProximalScoreVI", "advi": "ADVI", "map": "MAP"}


def windows(series: np.ndarray, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.as_tensor(np.ascontiguousarray(a)) for a in sliding_windows(series, LOOKBACK, horizon))


def make_net(model: str, horizon: int, x_train: torch.Tensor, seed: int) -> torch.nn.Module:
    """The deterministic network, the same initialisation for every method."""
    torch.manual_seed(seed)
    if model == "dlinear":
        return DLinear(LOOKBACK, horizon)
    return Koopa(LOOKBACK, horizon, x_train.shape[-1], mask_spectrum(x_train))


def fit_pyro(
    method: str, model_name: str, horizon: int, train, steps: int, num_draws: int, seed: int, progress: bool
):
    """Fit one method with Pyro; returns ``(predict, noise, seconds)``: ``predict(x)``
    gives each of ``num_draws`` guide draws' forecast means ``(M, n, H, C)`` and ``noise``
    their noise scales ``(M, C)``. Torch on one thread (the protocol's; two runs side by
    side with torch's default threads each oversubscribe the cores, up to 100x slower)."""
    torch.set_num_threads(1)
    x, y = train
    net = make_net(model_name, horizon, x, seed)
    init = {name: p.detach().clone() for name, p in net.named_parameters()}
    init["noise_scale"] = torch.full((x.shape[-1],), 0.5)
    bayesian_module(net, fan_in_prior())
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = partial(forecaster, net, subsample_size=BATCH)
    optim = pyro.optim.Adam({"lr": LEARNING_RATE})
    if method == "map":
        guide = AutoDelta(model, init_loc_fn=init_to_value(values=init))
        engine = SVI(model, guide, optim, Trace_ELBO())
    else:
        guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)
        if method == "psvi":
            engine = ProximalScoreVI(
                model, guide, optim, num_particles=NUM_PARTICLES, vectorize_particles=False
            )
        else:
            engine = SVI(model, guide, optim, Trace_ELBO(num_particles=NUM_PARTICLES))
    start = time.perf_counter()
    for _ in tqdm(range(steps), disable=not progress, desc=f"{model_name} H={horizon} {method}"):
        engine.step(x, y)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        draws = [guide(x, y) for _ in range(num_draws)]
    full = partial(forecaster, net)

    @torch.no_grad()
    def predict(inputs: np.ndarray) -> np.ndarray:
        inputs = torch.as_tensor(inputs)
        means = [poutine.trace(poutine.condition(full, data=d)).get_trace(inputs).nodes["mean"]["value"]
                 for d in draws]  # fmt: skip
        return torch.stack(means).numpy()

    return predict, torch.stack([d["noise_scale"] for d in draws]).numpy(), seconds


def fit_numpyro(
    method: str, model_name: str, horizon: int, train, steps: int, num_draws: int, seed: int, progress: bool
):
    """The NumPyro twin of :func:`fit_pyro` (DLinear only: ``numpyro_psvi.contrib.forecasting``),
    started from the same weights (the torch initialisation, kernels transposed)."""
    import jax
    import jax.numpy as jnp
    import numpyro
    from numpyro.contrib.module import random_flax_module
    from numpyro.infer import SVI as NumPyroSVI
    from numpyro.infer import Predictive, autoguide
    from numpyro.infer import Trace_ELBO as NumPyroTraceELBO
    from numpyro.infer.initialization import init_to_value as numpyro_init_to_value

    from numpyro_psvi import ProximalScoreVI as NumPyroProximalScoreVI
    from numpyro_psvi.contrib import forecasting as numpyro_forecasting
    from numpyro_psvi.contrib.models import fan_in_prior as numpyro_fan_in_prior

    if model_name != "dlinear":
        raise ValueError("the NumPyro backend has DLinear only (numpyro_psvi.contrib.forecasting)")
    x, y = (jnp.asarray(a.numpy()) for a in train)
    channels = x.shape[-1]
    torch_net = make_net(model_name, horizon, train[0], seed)
    init = {"noise_scale": jnp.full((channels,), 0.5)}
    for part in ("seasonal", "trend"):
        layer = getattr(torch_net, part)
        init[f"net/{part}.kernel"] = jnp.asarray(layer.weight.detach().numpy().T)
        init[f"net/{part}.bias"] = jnp.asarray(layer.bias.detach().numpy())
    module = numpyro_forecasting.DLinear(LOOKBACK, horizon)

    def net():
        return random_flax_module("net", module, numpyro_fan_in_prior(), input_shape=(1, LOOKBACK, channels))

    model = partial(numpyro_forecasting.forecaster, net, subsample_size=BATCH)
    optim = numpyro.optim.Adam(LEARNING_RATE)
    if method == "map":
        guide = autoguide.AutoDelta(model, init_loc_fn=numpyro_init_to_value(values=init))
        engine = NumPyroSVI(model, guide, optim, NumPyroTraceELBO())
    else:
        guide = autoguide.AutoNormal(model, init_loc_fn=numpyro_init_to_value(values=init), init_scale=0.01)
        if method == "psvi":
            engine = NumPyroProximalScoreVI(model, guide, optim, num_particles=NUM_PARTICLES)
        else:
            engine = NumPyroSVI(model, guide, optim, NumPyroTraceELBO(num_particles=NUM_PARTICLES))
    state = engine.init(jax.random.PRNGKey(seed), x, y)
    update = jax.jit(engine.update)
    start = time.perf_counter()
    for _ in tqdm(range(steps), disable=not progress, desc=f"{model_name} H={horizon} {method}"):
        state, _ = update(state, x, y)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    params = engine.get_params(state)
    full = partial(numpyro_forecasting.forecaster, net)
    predictive = Predictive(full, guide=guide, params=params, num_samples=num_draws,
                            return_sites=["mean", "noise_scale"])  # fmt: skip
    key = jax.random.PRNGKey(seed + 1)  # one key: the same guide draws for every chunk
    sample = jax.jit(lambda inputs: predictive(key, inputs))

    def predict(inputs: np.ndarray) -> np.ndarray:
        return np.asarray(sample(jnp.asarray(inputs))["mean"])

    return predict, np.asarray(sample(x[:1])["noise_scale"]), seconds


def evaluate(predict, noise: np.ndarray, x: np.ndarray, y: np.ndarray, seed: int, chunk: int = 64) -> dict:
    """:func:`psvi.metrics.forecast_report` over all test windows, in chunks of windows
    (the metrics are means over entries, so chunk means weighted by size add up); each
    guide draw's forecast gets one Gaussian noise draw."""
    rng = np.random.default_rng(seed)
    totals: dict[str, float] = {}
    for i in range(0, len(y), chunk):
        mean = predict(x[i : i + chunk]).astype(np.float64)
        samples = mean + noise[:, None, None, :] * rng.standard_normal(mean.shape)
        report = forecast_report(mean.mean(0), samples, y[i : i + chunk])
        for key, value in report.items():
            totals[key] = totals.get(key, 0.0) + value * mean.shape[1]
    return {key: value / len(y) for key, value in totals.items()}


def plot_window(runs: dict, history: np.ndarray, truth: np.ndarray, title: str, path: Path) -> None:
    """The oil-temperature channel of one test window: history, truth and each method's
    predictive mean with its 50% and 90% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channel = ETT_CHANNELS.index("OT")
    lookback, horizon = len(history), len(truth)
    future = np.arange(lookback, lookback + horizon)
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), sharey=True)
    for ax, (method, samples) in zip(np.atleast_1d(axes), runs.items(), strict=True):
        band = samples[..., channel]
        ax.plot(np.arange(lookback), history[:, channel], "k", lw=1, label="history")
        ax.plot(future, truth[:, channel], "k--", lw=1, label="truth")
        for level, alpha in ((0.9, 0.2), (0.5, 0.35)):
            lower, upper = np.quantile(band, [(1 - level) / 2, (1 + level) / 2], axis=0)
            ax.fill_between(future, lower, upper, alpha=alpha, color="C0", label=f"{level:.0%} interval")
        ax.plot(future, band.mean(0), "C0", lw=1.2, label="predictive mean")
        ax.set_title(LABEL[method])
        ax.set_xlabel("hour")
    np.atleast_1d(axes)[0].set_ylabel("OT (standardized)")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    data: str,
    horizon: int,
    model_name: str,
    backend: str,
    steps: int,
    num_draws: int,
    quick: bool,
    seed: int = 0,
):
    split = load_ett(data, lookback=LOOKBACK)
    train = windows(split.train, horizon)
    x_test, y_test = (a.numpy() for a in windows(split.test, horizon))
    if quick:
        every = max(len(x_test) // 64, 1)
        x_test, y_test = x_test[::every], y_test[::every]
    fit = fit_pyro if backend == "pyro" else fit_numpyro
    results, window_samples = {}, {}
    shown = len(x_test) // 2
    for method in METHODS:
        predict, noise, seconds = fit(method, model_name, horizon, train, steps, num_draws, seed, not quick)
        report = evaluate(predict, noise, x_test, y_test, seed + 2)
        calls = steps * (1 if method == "map" else NUM_PARTICLES)
        results[method] = {**report, "seconds": seconds, "score_calls": calls}
        mean = predict(x_test[shown : shown + 1])[:, 0]
        window_samples[method] = mean + noise[:, None, :] * np.random.default_rng(seed + 3).standard_normal(
            mean.shape
        )
        print(f"{data} {model_name} H={horizon} {backend} {method}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in results[method].items()), flush=True)  # fmt: skip
    payload = {"machine": machine(), "data": data, "model": model_name, "horizon": horizon,
               "backend": backend, "lookback": LOOKBACK, "batch": BATCH, "num_particles": NUM_PARTICLES,
               "learning_rate": LEARNING_RATE, "steps": steps, "num_draws": num_draws,
               "test_windows": len(x_test), **results}  # fmt: skip
    return payload, window_samples, x_test[shown], y_test[shown]


def table(folder: Path) -> str:
    """The markdown table of every ``forecast_*.json`` in ``folder`` (quick runs excluded)."""
    rows = ["| data | model | backend | H | method | MSE | MAE | CRPS | cov 50% | cov 90% | width 90% | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    results = [
        json.loads(p.read_text()) for p in folder.glob("forecast_*.json") if not p.stem.endswith("_quick")
    ]
    for r in sorted(results, key=lambda r: (r["data"], r["model"], r.get("backend", "pyro"), r["horizon"])):
        for method in METHODS:
            m = r[method]
            rows.append(
                f"| {r['data']} | {r['model']} | {r.get('backend', 'pyro')} | {r['horizon']} | "
                f"{LABEL[method]} | {m['mse']:.3f} | {m['mae']:.3f} | {m['crps']:.3f} | "
                f"{m['coverage_50']:.2f} | {m['coverage_90']:.2f} | {m['width_90']:.2f} | "
                f"{m['seconds']:.0f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("ETTh1", "ETTh2"), default="ETTh1")
    parser.add_argument("--horizon", type=int, choices=(96, 192, 336, 720), default=96)
    parser.add_argument("--model", choices=("koopa", "dlinear"), default="koopa")
    parser.add_argument(
        "--backend", choices=("pyro", "numpyro"), default="pyro", help="numpyro: DLinear only"
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="20 steps, 10 draws, 64 test windows")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, help="write a PNG of one test window's forecasts")
    parser.add_argument("--table", type=Path, help="print the markdown table of the JSONs in this folder")
    options = parser.parse_args()
    if options.table:
        print(table(options.table))
        return
    steps, num_draws = (20, 10) if options.quick else (options.steps, NUM_DRAWS)
    payload, window_samples, history, truth = run(
        options.data, options.horizon, options.model, options.backend, steps, num_draws, options.quick
    )
    options.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if options.quick else ""
    backend = "" if options.backend == "pyro" else f"_{options.backend}"
    path = options.out / f"forecast_{options.data}_{options.model}_{options.horizon}{backend}{suffix}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    if options.plot:
        title = f"{options.data}, {options.model}, horizon {options.horizon}: one test window (OT)"
        plot_window(window_samples, history, truth, title, options.plot)


if __name__ == "__main__":
    main()
