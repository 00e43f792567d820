"""Amortized guides against an exact posterior: the inner steps' worth (issue 24, item 3).

Factor analysis with known loadings (:func:`psvi.contrib.targets.factor_analysis`): N =
2,000 points ``x_n`` in R^10, three latents ``z_n ~ N(0, I)`` each, ``x_n ~ N(W z_n,
I)``. The guide is an encoder (``numpyro.module`` / ``pyro.module``) from ``x_n`` to a
diagonal Normal's loc and log-scale: ``linear`` (one dense layer: the exact posterior is
in its family) or ``mlp`` (a softplus hidden layer of 32, as the VAE's encoder).
Protocols: ``args``, the VAE's (batches of B = 100 passed as the model's arguments, every
point once per epoch; the engine sees a full plate), and ``plate`` (the model's own
subsampled plate, the guide encoding the plate's members; the engine's reshuffled
batches, SVI's independent ones). Methods: ``SVI(Trace_ELBO(4))``, ProximalScoreVI at its
defaults, and at each ``--inner-steps``; the user's Adam at each ``--lrs``; seeds 0 ..
``--seeds`` - 1 (the encoder's initial weights and the batches).

At each checkpoint, the guide's posterior on 1,000 held-out points against the exact
one: the worst latent's RMS (over the points) mean error in exact posterior sds, the
smallest and largest sd ratio (each latent's geometric mean over the points), and the
seconds of the updates since the first (set-up and compilation excluded, the checks too).

    python -m benchmarks.amortized [--backends numpyro pyro] [--protocols args plate]
        [--encoders linear mlp] [--lrs 0.001 0.01] [--inner-steps 20 5 3] [--seeds 3]

writes ``benchmarks/results/amortized.json`` (``--out``) and prints a summary table
(docs/guides.md, "Amortized guides against an exact posterior", has the runs).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import numpy as np

from benchmarks.common import save
from psvi.contrib.targets import factor_analysis, factor_analysis_posterior

NUM, BATCH, HIDDEN, PARTICLES = 2000, 100, 32, 4
CHECKPOINTS = (100, 300, 600, 1000, 2000, 3000)
LOADINGS, TRAIN = factor_analysis(NUM, seed=1)
_, TEST = factor_analysis(1000, seed=2)
LATENTS = LOADINGS.shape[1]

# A fit: ``step(batch)`` (``batch`` ignored under the plate protocol), ``sync()`` and
# ``encode(x) -> (loc, scale)`` of the current guide.
Fit = tuple[Callable, Callable, Callable]


def numpyro_fit(protocol: str, encoder: str, inner_steps: int | None, lr: float, seed: int) -> Fit:
    """``inner_steps``: -1 for SVI, ``None`` for the engine's default."""
    import jax
    import jax.numpy as jnp
    import numpyro
    from jax.example_libraries import stax
    from numpyro import handlers
    from numpyro.infer import SVI, Trace_ELBO

    from numpyro_psvi import ProximalScoreVI
    from numpyro_psvi.contrib.models import amortized_normal_guide, factor_analysis_model

    train = jnp.asarray(TRAIN)
    output = stax.Dense(2 * LATENTS)
    network = output if encoder == "linear" else stax.serial(stax.Dense(HIDDEN), stax.Softplus, output)
    subsample_size = None if protocol == "args" else BATCH
    model = factor_analysis_model(LOADINGS, subsample_size)
    guide = amortized_normal_guide(network, LATENTS, subsample_size)
    full_guide = amortized_normal_guide(network, LATENTS)  # every point, for the checks
    optim = numpyro.optim.Adam(lr)
    if inner_steps == -1:
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES))
    else:
        engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, inner_steps=inner_steps)
    state = [engine.init(jax.random.PRNGKey(seed), train[:BATCH] if protocol == "args" else train)]
    update = jax.jit(engine.update)

    def step(batch):
        state[0] = update(state[0], jnp.asarray(batch) if protocol == "args" else train)[0]

    def encode(x):
        substituted = handlers.substitute(full_guide, data=engine.get_params(state[0]))
        fn = handlers.trace(handlers.seed(substituted, 0)).get_trace(jnp.asarray(x))["z"]["fn"].base_dist
        return np.asarray(fn.loc), np.asarray(fn.scale)

    return step, lambda: jax.block_until_ready(state[0]), encode


def pyro_fit(protocol: str, encoder: str, inner_steps: int | None, lr: float, seed: int) -> Fit:
    """As :func:`numpyro_fit`."""
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO

    from pyro_psvi import ProximalScoreVI
    from pyro_psvi.contrib.models import amortized_normal_guide, factor_analysis_model

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    train = torch.tensor(TRAIN)
    dim = train.shape[-1]
    output = torch.nn.Linear(dim if encoder == "linear" else HIDDEN, 2 * LATENTS)
    network = output if encoder == "linear" else torch.nn.Sequential(
        torch.nn.Linear(dim, HIDDEN), torch.nn.Softplus(), output
    )  # fmt: skip
    subsample_size = None if protocol == "args" else BATCH
    model = factor_analysis_model(LOADINGS, subsample_size)
    guide = amortized_normal_guide(network, LATENTS, subsample_size)
    full_guide = amortized_normal_guide(network, LATENTS)
    optim = pyro.optim.Adam({"lr": lr})
    if inner_steps == -1:
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True))
    else:
        engine = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, inner_steps=inner_steps)

    def step(batch):
        engine.step(torch.as_tensor(batch) if protocol == "args" else train)

    def encode(x):
        with torch.no_grad():
            fn = pyro.poutine.trace(full_guide).get_trace(torch.as_tensor(x)).nodes["z"]["fn"].base_dist
        return fn.loc.numpy(), fn.scale.numpy()

    return step, lambda: None, encode


FITS = {"numpyro": numpyro_fit, "pyro": pyro_fit}


def errors(encode: Callable) -> tuple[float, float, float]:
    """The worst latent's RMS mean error in exact posterior sds, and the smallest and
    largest sd ratio (each latent's geometric mean over the held-out points)."""
    loc, scale = encode(TEST)
    mean, sd = factor_analysis_posterior(LOADINGS, TEST)
    rms = np.sqrt(np.mean(((loc - mean) / sd) ** 2, axis=0))
    ratios = np.exp(np.mean(np.log(scale / sd), axis=0))
    return float(rms.max()), float(ratios.min()), float(ratios.max())


def run(backend: str, protocol: str, encoder: str, inner_steps: int | None, lr: float, seed: int) -> dict:
    """One fit's checks at :data:`CHECKPOINTS`."""
    step, sync, encode = FITS[backend](protocol, encoder, inner_steps, lr, seed)
    order = np.random.default_rng(100 + seed).permutation(NUM)
    per_epoch = NUM // BATCH

    def batch(i: int) -> np.ndarray:
        nonlocal order
        if i % per_epoch == 0 and i > 0:
            order = np.random.default_rng(100 + seed + i).permutation(NUM)
        j = i % per_epoch
        return TRAIN[order[j * BATCH : (j + 1) * BATCH]]

    step(batch(0))  # set-up, compilation
    sync()
    checks, elapsed, done = [], 0.0, 1
    for checkpoint in CHECKPOINTS:
        start = time.perf_counter()
        for i in range(done, checkpoint):
            step(batch(i))
        sync()
        elapsed += time.perf_counter() - start
        done = checkpoint
        mean_error, low, high = errors(encode)
        checks.append({"updates": checkpoint, "mean_error": mean_error, "sd_low": low, "sd_high": high,
                       "seconds": elapsed})  # fmt: skip
    return {"seed": seed, "checks": checks}


def method_label(inner_steps: int | None) -> str:
    named = {-1: "SVI", None: "ProximalScoreVI, defaults"}
    return named.get(inner_steps, f"ProximalScoreVI, K = {inner_steps}")


def in_band(check: dict) -> bool:
    """Means within 0.2 sd and sds within 20% (the project's bar for exact posteriors)."""
    return check["mean_error"] <= 0.2 and check["sd_low"] >= 0.8 and check["sd_high"] <= 1.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["numpyro", "pyro"], choices=sorted(FITS))
    parser.add_argument("--protocols", nargs="+", default=["args", "plate"], choices=["args", "plate"])
    parser.add_argument("--encoders", nargs="+", default=["linear", "mlp"], choices=["linear", "mlp"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[5, 3], help="besides the defaults")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="amortized")
    options = parser.parse_args()
    methods = [-1, None, *options.inner_steps]
    rows = []
    configs = itertools.product(options.backends, options.protocols, options.encoders, options.lrs, methods)
    for backend, protocol, encoder, lr, inner_steps in configs:
        runs = [run(backend, protocol, encoder, inner_steps, lr, seed) for seed in range(options.seeds)]
        config = {"backend": backend, "protocol": protocol, "encoder": encoder, "lr": lr}
        rows.append({**config, "inner_steps": inner_steps, "method": method_label(inner_steps), "runs": runs})
        print(backend, protocol, encoder, lr, method_label(inner_steps), [
            [round(check["mean_error"], 2) for check in one["checks"]] for one in runs
        ], flush=True)  # fmt: skip
    save(options.out, {"num": NUM, "batch": BATCH, "particles": PARTICLES, "checkpoints": CHECKPOINTS,
                       "rows": rows})  # fmt: skip
    print(
        "\n| backend | protocol | encoder | Adam | method | updates to the band | worst mean error at "
        "300 / 1,000 / 3,000 updates | sd ratios at 3,000 | seconds per 1,000 updates |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        reach = [next((c["updates"] for c in one["checks"] if in_band(c)), None) for one in row["runs"]]
        worst = [max((c["mean_error"] for one in row["runs"] for c in one["checks"] if c["updates"] == u),
                     default=float("nan")) for u in (300, 1000, 3000)]  # fmt: skip
        last = [one["checks"][-1] for one in row["runs"]]
        seconds = (
            np.median([one["checks"][-1]["seconds"] for one in row["runs"]]) * 1000 / (CHECKPOINTS[-1] - 1)
        )
        cells = (
            row["backend"], row["protocol"], row["encoder"], f"{row['lr']:g}", row["method"],
            ", ".join("-" if r is None else str(r) for r in reach),
            " / ".join(f"{w:.2f}" for w in worst),
            f"{min(c['sd_low'] for c in last):.2f}-{max(c['sd_high'] for c in last):.2f}",
            f"{seconds:.1f}",
        )  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
