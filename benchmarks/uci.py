"""UCI regression with the protocol of Hernandez-Lobato and Adams (2015) and Gal and
Ghahramani (2016): ProximalScoreVI vs ADVI on BNNs with their standard splits.

One hidden layer of 50 ReLU units (100 for protein), N(0, 1) weight priors, a
Gamma(6, 6) prior on the noise precision, inputs and targets standardized on the
training split (``psvi.contrib.datasets.load_uci``; ``numpyro_psvi.contrib.models.bnn_regression``
and its Pyro twin). Both methods fit the same AutoNormal guide (diagonal, started at
Glorot-uniform means with scale 0.01) with the same particles (S=4), optimizer
(Adam 1e-2), mini-batches of 32 through the model's subsampled plate, and budget:
the protocol's base epoch count (40; 20 for protein) times ceil(N / 32) steps, i.e.
S score calls per step for all. ProximalScoreVI with its defaults; ADVI is
the PPL's SVI with Trace_ELBO(num_particles=S); ``advi_psvi`` runs ADVI for the first half
of the same budget and ProximalScoreVI from ADVI's guide for the second half (a fresh
Adam state; the same score calls); ``ivon`` is IVON (``benchmarks.ivon_baseline``, torch,
whatever the backend: its own optimizer, IVON's published UCI recipe, S gradient samples
per step, the same model, initial means, mini-batch size and steps). Metrics on the test split, in the
original target units, from 100 guide draws: RMSE of the predictive mean and the
test log-likelihood of the Gaussian-mixture predictive. Split 0 also records test
log-likelihood against score calls (``curve``).

    python -m benchmarks.uci --dataset NAME [--splits K] [--backend numpyro|pyro]
        [--methods psvi advi advi_psvi ivon] [--epochs-factor F] [--full-batch] [--quick] [--out DIR]
    python -m benchmarks.uci --table [--out DIR]    # the markdown table of the runs
    python -m benchmarks.uci --curves PNG [--out DIR]   # test LL vs score calls, per dataset

writes ``DIR/uci_<NAME>_<backend>.json`` with, per method key (``psvi``, ``advi``,
``advi_psvi``, ``ivon``; methods not run keep their results from an earlier run of the same file and
number of splits):
``test_rmse_mean``, ``test_rmse_se``, ``test_ll_mean``, ``test_ll_se`` (mean and
standard error over splits), ``score_calls`` and ``seconds`` (per split, mean), and
the per-split values.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.common import METHOD_LABELS, RESULTS, machine, make_engine, phases
from psvi.contrib.datasets import UCI_NAMES, load_uci, uci_info
from psvi.metrics import gaussian_test_log_likelihood, rmse

BATCH = 32
NUM_PARTICLES = 4
LEARNING_RATE = 1e-2
NUM_DRAWS = 100
CURVE_POINTS = 8


def glorot_init(num_inputs: int, hidden: int, seed: int) -> dict[str, np.ndarray]:
    """Glorot-uniform weights, zero biases, unit noise precision."""
    rng = np.random.default_rng(seed)
    limit1, limit2 = math.sqrt(6.0 / (num_inputs + hidden)), math.sqrt(6.0 / (hidden + 1))
    return {
        "w1": rng.uniform(-limit1, limit1, (num_inputs, hidden)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "w2": rng.uniform(-limit2, limit2, hidden).astype(np.float32),
        "b2": np.zeros((), np.float32),
        "precision": np.ones((), np.float32),
    }


def metrics(means: np.ndarray, precisions: np.ndarray, split) -> tuple[float, float]:
    """Test RMSE and log-likelihood in the original units (draws on axis 0)."""
    scales = np.asarray(precisions, np.float64).reshape(-1, 1) ** -0.5
    ll = gaussian_test_log_likelihood(means, scales, split.y_test) - math.log(split.y_std)
    return rmse(means, split.y_test) * split.y_std, ll


def fit_numpyro(
    method: str, split, hidden: int, steps: int, seed: int, curve: bool, progress: bool, batch: int = BATCH
):
    import jax
    from numpyro.infer import Predictive
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.infer.initialization import init_to_value
    from tqdm import tqdm

    from numpyro_psvi.contrib.models import bnn_regression

    model = partial(bnn_regression, hidden=hidden, subsample_size=min(batch, len(split.y_train)))
    init = {k: jax.numpy.asarray(v) for k, v in glorot_init(split.x_train.shape[1], hidden, seed).items()}
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)
    x, y = jax.numpy.asarray(split.x_train), jax.numpy.asarray(split.y_train)
    x_test = jax.numpy.asarray(split.x_test)

    @jax.jit
    def predict(params, key):
        full = partial(bnn_regression, hidden=hidden)
        predictive = Predictive(full, guide=guide, params=params, num_samples=NUM_DRAWS,
                                return_sites=["mean", "precision"])  # fmt: skip
        return predictive(key, x_test)

    def evaluate(params, key):
        draws = predict(params, key)
        return metrics(np.asarray(draws["mean"]), np.asarray(draws["precision"]), split)

    every = max(steps // CURVE_POINTS, 1)
    points, start, step, params = [], time.perf_counter(), 0, None
    for kind, phase_steps in phases(method, steps):
        engine = make_engine(kind, model, guide, LEARNING_RATE, NUM_PARTICLES)
        state = engine.init(jax.random.PRNGKey(seed), x, y, init_params=params)
        update = jax.jit(engine.update)
        for _ in tqdm(range(phase_steps), disable=not progress, desc=kind):
            state, _ = update(state, x, y)
            step += 1
            if curve and (step % every == 0 or step == steps):
                points.append(
                    (step * NUM_PARTICLES, evaluate(engine.get_params(state), jax.random.PRNGKey(1))[1])
                )
        params = engine.get_params(state)
    seconds = time.perf_counter() - start
    test_rmse, test_ll = evaluate(params, jax.random.PRNGKey(seed + 1))
    return test_rmse, test_ll, seconds, points


def fit_pyro(
    method: str, split, hidden: int, steps: int, seed: int, curve: bool, progress: bool, batch: int = BATCH
):
    import pyro
    import torch
    from pyro.infer import SVI, Predictive, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal, init_to_value
    from tqdm import tqdm

    from pyro_psvi import ProximalScoreVI
    from pyro_psvi.batches import EpochOrder, SharedSubsample
    from pyro_psvi.contrib.models import bnn_regression

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = partial(bnn_regression, hidden=hidden, subsample_size=min(batch, len(split.y_train)))
    init = glorot_init(split.x_train.shape[1], hidden, seed)
    init["w2"], init["b2"] = init["w2"][:, None], init["b2"].reshape(1)
    init = {k: torch.as_tensor(v) for k, v in init.items()}
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)
    x, y, x_test = (torch.as_tensor(a) for a in (split.x_train, split.y_train, split.x_test))

    def evaluate():
        full = partial(bnn_regression, hidden=hidden)
        predictive = Predictive(full, guide=guide, num_samples=NUM_DRAWS, return_sites=["mean", "precision"])
        with torch.no_grad():
            draws = predictive(x_test)
        return metrics(draws["mean"].numpy(), draws["precision"].numpy(), split)

    every = max(steps // CURVE_POINTS, 1)
    points, start, step = [], time.perf_counter(), 0
    for kind, phase_steps in phases(method, steps):
        # A new engine on the same guide continues from the param store (fresh Adam state,
        # as in the NumPyro twin).
        optim = pyro.optim.Adam({"lr": LEARNING_RATE})
        if kind in ("psvi", "psvi_iid"):
            reshuffle = kind == "psvi"
            engine = ProximalScoreVI(model, guide, optim, num_particles=NUM_PARTICLES, reshuffle=reshuffle)
        elif kind in ("advi", "advi_reshuffled"):
            elbo = Trace_ELBO(num_particles=NUM_PARTICLES, vectorize_particles=True, max_plate_nesting=1)
            engine = SVI(model, guide, optim, elbo)
        else:
            raise ValueError(
                f"The Pyro twin runs psvi, psvi_iid, advi, advi_reshuffled and advi_psvi, not {kind!r}."
            )
        # advi_reshuffled: SVI on the batches ProximalScoreVI(reshuffle=True) draws.
        order = EpochOrder() if kind == "advi_reshuffled" else None
        for _ in tqdm(range(phase_steps), disable=not progress, desc=kind):
            if order is None:
                engine.step(x, y)
            else:
                batch_indices = {"data": order.next("data", len(y), model.keywords["subsample_size"])}
                with SharedSubsample(batch_indices):
                    engine.step(x, y)
            step += 1
            if curve and (step % every == 0 or step == steps):
                points.append((step * NUM_PARTICLES, evaluate()[1]))
    seconds = time.perf_counter() - start
    test_rmse, test_ll = evaluate()
    return test_rmse, test_ll, seconds, points


def fit_ivon(
    method: str, split, hidden: int, steps: int, seed: int, curve: bool, progress: bool, batch: int = BATCH
):
    """IVON on the same model, initial means, mini-batches and gradient evaluations (no curve)."""
    from benchmarks.ivon_baseline import fit_uci

    init = glorot_init(split.x_train.shape[1], hidden, seed)
    start = time.perf_counter()
    means, precisions = fit_uci(split, hidden, steps, seed, batch, NUM_PARTICLES, NUM_DRAWS, init)
    seconds = time.perf_counter() - start
    return *metrics(means, precisions, split), seconds, []


def summarize(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, np.float64)
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else float("nan")
    return float(array.mean()), se


def table(folder: Path) -> str:
    """The markdown tables of every ``uci_*.json`` in ``folder`` (quick runs excluded): the
    results per method, then each method's test log-likelihood minus ADVI's on the same
    splits (mean +- standard error of the paired differences, and the splits it wins)."""
    rows = ["| dataset | backend | epochs | splits | method | test RMSE | test log-likelihood | s / split |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    paired = [
        "| dataset | backend | epochs | method | test LL minus ADVI's | splits won |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted(folder.glob("uci_*.json")):
        if path.stem.endswith("_quick"):
            continue
        result = json.loads(path.read_text())
        setting = f"| {result['dataset']} | {result['backend']}"
        setting += " (exact scores)" if result["batch"] is None else ""
        setting += f" | {result.get('epochs', 40)} |"
        for method in [m for m in METHOD_LABELS if m in result]:
            r = result[method]
            rows.append(
                f"{setting} {result['splits']} | {METHOD_LABELS[method]} | "
                f"{r['test_rmse_mean']:.3f} +- {r['test_rmse_se']:.3f} | "
                f"{r['test_ll_mean']:.3f} +- {r['test_ll_se']:.3f} | {r['seconds']:.1f} |"
            )
            if method != "advi" and "advi" in result:
                differences = np.subtract(r["test_ll"], result["advi"]["test_ll"])
                mean, se = summarize(list(differences))
                wins = int((differences > 0).sum())
                paired.append(
                    f"{setting} {METHOD_LABELS[method]} | {mean:+.3f} +- {se:.3f} | "
                    f"{wins} / {len(differences)} |"
                )
    return "\n".join(rows) + "\n\n" + "\n".join(paired)


def plot_convergence(folder: Path, path: Path) -> None:
    """One panel per dataset: test log-likelihood of the first split against score calls,
    both methods, from the base-epoch NumPyro runs in ``folder``."""
    from psvi.contrib.plots import plot_curve_grid

    panels = {}
    for name in UCI_NAMES:
        file = folder / f"uci_{name}_numpyro.json"
        if file.exists():
            result = json.loads(file.read_text())
            panels[name] = {
                label: tuple(zip(*result[method]["curve"], strict=True))
                for method, label in METHOD_LABELS.items()
                if method in result
            }
    plot_curve_grid(panels, "score calls", "test log-likelihood (split 0)", str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=UCI_NAMES)
    parser.add_argument("--table", action="store_true", help="print the table of the runs in --out")
    parser.add_argument("--curves", type=Path, help="write the convergence PNG of the runs in --out")
    parser.add_argument("--splits", type=int, default=None, help="first K splits (default: all)")
    parser.add_argument("--backend", choices=("numpyro", "pyro"), default="numpyro")
    parser.add_argument("--quick", action="store_true", help="1 split, 20 steps")
    parser.add_argument("--epochs-factor", type=int, default=1,
                        help="multiply the protocol's base epochs (MC dropout used 10)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_LABELS), default=list(METHOD_LABELS),
                        help="methods to run; the others' results in an existing JSON are kept")  # fmt: skip
    parser.add_argument("--full-batch", action="store_true",
                        help="exact scores, no subsampling; same number of steps (diagnostic)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "uci")
    options = parser.parse_args()
    if options.table or options.curves:
        if options.table:
            print(table(options.out))
        if options.curves:
            plot_convergence(options.out, options.curves)
        return
    if options.dataset is None:
        parser.error("--dataset is required (or --table / --curves)")
    info = uci_info(options.dataset)
    num_splits = 1 if options.quick else min(options.splits or info["num_splits"], info["num_splits"])
    fit = fit_numpyro if options.backend == "numpyro" else fit_pyro
    payload = {"machine": machine(), "dataset": options.dataset, "backend": options.backend,
               "splits": num_splits, "hidden": info["hidden"], "batch": None if options.full_batch else BATCH,
               "num_particles": NUM_PARTICLES, "learning_rate": LEARNING_RATE,
               "epochs": info["epochs"] * options.epochs_factor}  # fmt: skip
    suffix = (
        "_quick" if options.quick else ("" if options.epochs_factor == 1 else f"_x{options.epochs_factor}")
    ) + ("_full_batch" if options.full_batch else "")
    path = options.out / f"uci_{options.dataset}_{options.backend}{suffix}.json"
    if path.exists() and not options.quick:  # keep the other methods' results of an earlier run
        earlier = json.loads(path.read_text())
        if earlier["splits"] == num_splits:
            payload.update({m: earlier[m] for m in METHOD_LABELS if m in earlier})
    for method in options.methods:
        rmses, lls, seconds, calls, curve = [], [], [], 0, []
        for split_index in range(num_splits):
            split = load_uci(options.dataset, split_index)
            epochs = info["epochs"] * options.epochs_factor
            steps = 20 if options.quick else epochs * math.ceil(len(split.y_train) / BATCH)
            batch = len(split.y_train) if options.full_batch else BATCH
            test_rmse, test_ll, secs, points = (fit_ivon if method == "ivon" else fit)(
                method, split, info["hidden"], steps, split_index, split_index == 0, not options.quick, batch
            )
            rmses.append(test_rmse)
            lls.append(test_ll)
            seconds.append(secs)
            calls = steps * NUM_PARTICLES
            curve = curve or points
            print(f"{options.dataset} {options.backend} {method} split {split_index}: RMSE "
                  f"{test_rmse:.3f}, test LL {test_ll:.3f} ({secs:.1f} s)", flush=True)  # fmt: skip
        rmse_mean, rmse_se = summarize(rmses)
        ll_mean, ll_se = summarize(lls)
        payload[method] = {
            "test_rmse_mean": rmse_mean, "test_rmse_se": rmse_se, "test_ll_mean": ll_mean,
            "test_ll_se": ll_se, "score_calls": calls, "seconds": float(np.mean(seconds)),
            "test_rmse": rmses, "test_ll": lls, "curve": curve,
        }  # fmt: skip
    options.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
