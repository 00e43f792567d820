"""Time per step of ProximalScoreVI vs SVI(Trace_ELBO), both backends, digits MLP.

Same model (64-50-10 tanh MLP, N(0, 1) priors, mini-batch 64 from the model's
plate), same guide (AutoNormal), same number of particles. The engines are timed in
interleaved blocks (A B A B ...) in one process; the ratio of medians is reported.
Torch runs on one thread (docs/pitfalls.md: shared cores).

    python -m benchmarks.step_cost [--blocks 7] [--steps 50]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable

import jax

from benchmarks.common import save
from psvi.contrib.datasets import load_digits

BATCH = 64
PARTICLES = 4


def _median_block_times(steppers: dict[str, Callable[[], None]], blocks: int, steps: int) -> dict:
    for step in steppers.values():  # warm up (compilation, lazy set-up)
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(blocks):
        for name, step in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def numpyro_steppers(inner_steps: tuple[int, ...]) -> dict[str, Callable[[], None]]:
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.infer.initialization import init_to_value

    from numpyro_psvi import ProximalScoreVI
    from numpyro_psvi.contrib.models import mlp_classifier, mlp_init_values

    data = load_digits()
    x, y = jax.numpy.asarray(data.x_train), jax.numpy.asarray(data.y_train)

    def model(x, y):
        mlp_classifier(x, y, subsample_size=BATCH)

    def guide():
        return AutoNormal(
            model, init_loc_fn=init_to_value(values=mlp_init_values(x.shape[1])), init_scale=0.01
        )

    engines = {"Trace_ELBO": SVI(model, guide(), numpyro.optim.Adam(1e-3), Trace_ELBO(PARTICLES))}
    for k in inner_steps:
        engines[f"PSVI K={k}"] = ProximalScoreVI(
            model, guide(), numpyro.optim.Adam(1e-3), num_particles=PARTICLES, inner_steps=k
        )
    steppers = {}
    for name, engine in engines.items():
        state = [engine.init(jax.random.PRNGKey(0), x, y)]
        update = jax.jit(engine.update)

        def step(update=update, state=state):
            state[0], loss = update(state[0], x, y)
            loss.block_until_ready()

        steppers[name] = step
    return steppers


def pyro_steppers(inner_steps: tuple[int, ...]) -> tuple[dict[str, Callable[[], None]], Callable]:
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal, init_to_value

    from pyro_psvi import ProximalScoreVI
    from pyro_psvi.contrib.models import mlp_classifier, mlp_init_values

    torch.set_num_threads(1)
    data = load_digits()
    x = torch.as_tensor(data.x_train, dtype=torch.float32)
    y = torch.as_tensor(data.y_train)

    def model(x, y):
        mlp_classifier(x, y, subsample_size=BATCH)

    engines = {}
    for i, name in enumerate(["Trace_ELBO"] + [f"PSVI K={k}" for k in inner_steps]):
        # One guide per engine, each under its own name in the shared param store.
        guide = AutoNormal(
            model, init_loc_fn=init_to_value(values=mlp_init_values(x.shape[1])), init_scale=0.01
        )
        guide._pyro_name = f"guide{i}"
        optim = pyro.optim.Adam({"lr": 1e-3})
        if name == "Trace_ELBO":
            loss = Trace_ELBO(num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1)
            engines[name] = SVI(model, guide, optim, loss)
        else:
            k = int(name.split("=")[1])
            engines[name] = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, inner_steps=k)
    steppers = {name: (lambda e=engine: e.step(x, y)) for name, engine in engines.items()}
    return steppers, steppers[f"PSVI K={inner_steps[0]}"]


def profile(step: Callable[[], None], steps: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(8)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    # 5 first: the default for this model (diagonal guide, subsampled plate), profiled.
    inner_steps = (5, 20, 1)
    results = {}
    for backend, make in (("numpyro", numpyro_steppers), ("pyro", pyro_steppers)):
        made = make(inner_steps)
        steppers, profiled = made if isinstance(made, tuple) else (made, None)
        medians = _median_block_times(steppers, args.blocks, args.steps)
        base = medians["Trace_ELBO"]
        results[backend] = {
            name: {"ms_per_step": 1e3 * t, "ratio_to_trace_elbo": t / base} for name, t in medians.items()
        }
        if profiled is not None:
            results[backend]["profile_psvi_default"] = profile(profiled, args.steps)
    print(f"{'backend':8s} {'engine':12s} {'ms/step':>8s} {'ratio':>6s}")
    for backend, rows in results.items():
        for name, row in rows.items():
            if isinstance(row, dict):
                print(f"{backend:8s} {name:12s} {row['ms_per_step']:8.3f} {row['ratio_to_trace_elbo']:6.2f}")
    print(results["pyro"]["profile_psvi_default"])
    payload = {
        "model": "digits MLP 64-50-10, AutoNormal, batch 64",
        "num_particles": PARTICLES,
        "blocks": args.blocks,
        "steps_per_block": args.steps,
        "torch_threads": 1,
        "results": results,
    }
    print("wrote", save("step_cost", payload))


if __name__ == "__main__":
    main()
