"""Time per step of ProximalScoreVI vs SVI(Trace_ELBO), both backends, equal particles.

Cases (``--cases``), each with its model's subsampled plate, S = 4 particles for every
engine, Adam(1e-3):

- ``digits/AutoNormal``, ``digits/AutoDiagonalNormal``: a 64-50-10 tanh MLP on the 8x8
  digits, N(0, 1) priors on its 3,760 weights, mini-batches of 64, particles in one
  vectorized pass;
- ``resnet16``: the ResNet-18-layout network of ``benchmarks.scale`` at width 16 (D =
  7.0e5), AutoNormal, mini-batches of 32 random 28x28 images, particles one pass each;
  Pyro on ``FlatBayesianModule`` (one flat site), NumPyro on ``random_flax_module`` (one
  site per tensor).

The engines of a case are timed in interleaved blocks (A B A B ...) in one process; the
ratio of medians of the per-block means is reported. Torch runs on one thread
(docs/pitfalls.md: shared cores); NumPyro updates are jitted.

    python -m benchmarks.step_cost [--cases ...] [--backends ...] [--blocks 7] [--steps 40] [--out NAME]
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
CASES = ("digits/AutoNormal", "digits/AutoDiagonalNormal", "resnet16")
RESNET_WIDTH = 16
# (blocks, steps per block) for the ResNet, whose steps take seconds.
RESNET_TIMING = (5, 2)


def _median_block_times(
    steppers: dict[str, Callable[[], None]], blocks: int, steps: int, warm_up: int = 3
) -> dict:
    """Each stepper's median seconds per step over ``blocks`` interleaved blocks of
    ``steps``, after ``warm_up`` untimed steps of each (compilation, lazy set-up; more to
    time a fit's steady state rather than its start)."""
    for step in steppers.values():
        for _ in range(warm_up):
            step()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(blocks):
        for name, step in steppers.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def _engine_labels(inner_steps: tuple[int | None, ...]) -> dict[str, int | None]:
    return {("PSVI default K" if k is None else f"PSVI K={k}"): k for k in inner_steps}


def numpyro_steppers(case: str, inner_steps: tuple[int | None, ...]) -> dict[str, Callable[[], None]]:
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
    from numpyro.infer.initialization import init_to_value

    from numpyro_psvi import ProximalScoreVI
    from numpyro_psvi.contrib.models import mlp_classifier, mlp_init_values

    if case == "resnet16":
        from benchmarks.scale import BATCH as RESNET_BATCH
        from benchmarks.scale import flax_resnet_gn, numpyro_resnet_model

        key = jax.random.PRNGKey(0)
        x = jax.random.normal(key, (4 * RESNET_BATCH, 28, 28, 1))
        y = jax.random.randint(key, (4 * RESNET_BATCH,), 0, 10)
        model = numpyro_resnet_model(flax_resnet_gn(RESNET_WIDTH))[0]

        def guide():
            return AutoNormal(model, init_scale=0.01)

    else:
        data = load_digits()
        x, y = jax.numpy.asarray(data.x_train), jax.numpy.asarray(data.y_train)
        guide_class = AutoNormal if case.endswith("/AutoNormal") else AutoDiagonalNormal

        def model(x, y):
            mlp_classifier(x, y, subsample_size=BATCH)

        def guide():
            init = init_to_value(values=mlp_init_values(x.shape[1]))
            return guide_class(model, init_loc_fn=init, init_scale=0.01)

    # Particles in one vmapped pass for every case and engine (NumPyro's ResNet included).
    loss = Trace_ELBO(PARTICLES, vectorize_particles=True)
    engines = {"Trace_ELBO": SVI(model, guide(), numpyro.optim.Adam(1e-3), loss)}
    for label, k in _engine_labels(inner_steps).items():
        engines[label] = ProximalScoreVI(model, guide(), numpyro.optim.Adam(1e-3), num_particles=PARTICLES,
                                         inner_steps=k, vectorize_particles=True)  # fmt: skip
    steppers = {}
    for name, engine in engines.items():
        state = [engine.init(jax.random.PRNGKey(0), x, y)]
        update = jax.jit(engine.update)

        def step(update=update, state=state):
            state[0], loss = update(state[0], x, y)
            loss.block_until_ready()

        steppers[name] = step
    return steppers


def pyro_steppers(case: str, inner_steps: tuple[int | None, ...]) -> dict[str, Callable[[], None]]:
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal, init_to_value

    from pyro_psvi import ProximalScoreVI
    from pyro_psvi.contrib.models import mlp_classifier, mlp_init_values

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if case == "resnet16":
        from benchmarks.scale import BATCH as RESNET_BATCH
        from benchmarks.scale import pyro_resnet_model, resnet_gn

        x, y = torch.randn(4 * RESNET_BATCH, 1, 28, 28), torch.randint(0, 10, (4 * RESNET_BATCH,))
        model, init = pyro_resnet_model(resnet_gn(RESNET_WIDTH))
        guide_class, vectorize, nesting = AutoNormal, False, {}
    else:
        data = load_digits()
        x = torch.as_tensor(data.x_train, dtype=torch.float32)
        y = torch.as_tensor(data.y_train)
        init = mlp_init_values(x.shape[1])
        guide_class = AutoNormal if case.endswith("/AutoNormal") else AutoDiagonalNormal
        vectorize, nesting = True, {"max_plate_nesting": 1}

        def model(x, y):
            mlp_classifier(x, y, subsample_size=BATCH)

    engines = {}
    for i, (name, k) in enumerate({"Trace_ELBO": -1, **_engine_labels(inner_steps)}.items()):
        # One guide per engine, each under its own name in the shared param store.
        guide = guide_class(model, init_loc_fn=init_to_value(values=init), init_scale=0.01)
        guide._pyro_name = f"guide{i}"
        optim = pyro.optim.Adam({"lr": 1e-3})
        if k == -1:
            loss = Trace_ELBO(num_particles=PARTICLES, vectorize_particles=vectorize, **nesting)
            engines[name] = SVI(model, guide, optim, loss)
        else:
            engines[name] = ProximalScoreVI(model, guide, optim, num_particles=PARTICLES, inner_steps=k,
                                            vectorize_particles=vectorize)  # fmt: skip
    return {name: (lambda e=engine: e.step(x, y)) for name, engine in engines.items()}


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
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--backends", nargs="+", choices=("numpyro", "pyro"), default=["numpyro", "pyro"])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="step_cost", help="the JSON's name in benchmarks/results/")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    for case in args.cases:
        # The default (K = 5 for these guides with a subsampled plate) first, then 20 and 1.
        inner_steps = (None,) if case == "resnet16" else (None, 20, 1)
        blocks, steps = RESNET_TIMING if case == "resnet16" else (args.blocks, args.steps)
        for backend in args.backends:
            make = numpyro_steppers if backend == "numpyro" else pyro_steppers
            steppers = make(case, inner_steps)
            medians = _median_block_times(steppers, blocks, steps)
            base = medians["Trace_ELBO"]
            rows = {
                name: {"ms_per_step": 1e3 * t, "ratio_to_trace_elbo": t / base} for name, t in medians.items()
            }
            if backend == "pyro" and case == CASES[0]:
                rows["profile_psvi_default"] = profile(steppers["PSVI default K"], steps)
            results[f"{backend} {case}"] = rows
            for name, row in rows.items():
                if isinstance(row, dict):
                    print(f"{backend:8s} {case:26s} {name:15s} {row['ms_per_step']:9.2f} ms "
                          f"{row['ratio_to_trace_elbo']:5.2f}x", flush=True)  # fmt: skip
    payload = {
        "cases": list(args.cases),
        "num_particles": PARTICLES,
        "blocks": args.blocks,
        "steps_per_block": args.steps,
        "resnet_blocks_steps": RESNET_TIMING,
        "torch_threads": 1,
        "results": results,
    }
    print("wrote", save(args.out, payload))


if __name__ == "__main__":
    main()
