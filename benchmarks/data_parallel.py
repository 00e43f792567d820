"""Data-parallel ProximalScoreVI: time and all-reduce volume per update against ranks.

A Bayesian MLP classifier (``FlatBayesianModule``, 784-256-10, ``D = 203,530``;
AutoNormal, S = 4, Adam) on synthetic MNIST-sized data (N = 16384; global batches of
2048 and 8192 split over the ranks) takes ``--updates`` updates on 1, 2, 4 ranks:

- Pyro: ``torch.distributed`` with gloo, one process per rank started here as
  ``torchrun`` would start it (one torch thread each); the floats each rank
  all-reduced are counted by :class:`pyro_psvi.parallel.ScoreReducer`.
- NumPyro (``--numpyro``): the same network in Flax, on 1, 2, 4 host devices of one
  process (``--xla_force_host_platform_device_count``); the floats reduced are read
  off the compiled update's jaxpr (the operands of its ``psum``/``pmean``).

Reported: the median time per update (after two warm-up updates), data points per
second, and floats all-reduced per update against ``D`` (the goal: at most ``3 D``
for a diagonal guide; DDP sends ``D`` per SGD step, ``S D`` per ``S`` steps). The score
phase is split over the ranks; the rest of the update (the inner steps, the trust
region) is replicated, so the speed-up grows with the batch.

    python -m benchmarks.data_parallel [--ranks 1 2 4] [--global-batches 2048 8192]
        [--updates 10] [--numpyro]

writes ``benchmarks/results/data_parallel.json``. On a multi-GPU machine::

    torchrun --nproc_per_node=8 -m benchmarks.data_parallel --resnet50 [--batch 32]

fits a Bayesian ResNet-50 (torchvision, ``D = 25,557,032``; AutoNormal, S = 4) on
synthetic ImageNet-sized batches (3x224x224, 1000 classes; ``--batch`` images per
GPU) with NCCL and prints the time and the bytes all-reduced per update: expected
``4 (2 D + S + 2)`` bytes = 204.5 MB in float32 (DDP: 102.2 MB per SGD step).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from functools import partial

NUM_DATA, HIDDEN, PARTICLES = 16384, 256, 4


def _pyro_fit(updates: int, batch: int, device: str = "cpu", resnet50: bool = False) -> dict:
    """One rank's fit (``batch``: the global batch on a CPU, images per GPU for the
    ResNet); returns its timings."""
    import pyro
    import torch
    import torch.distributed
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.autoguide.initialization import init_to_value

    from pyro_psvi import ProximalScoreVI
    from pyro_psvi.contrib.models import FlatBayesianModule, fan_in_prior, module_classifier

    ranks = int(os.environ.get("WORLD_SIZE", 1))
    if ranks > 1:
        torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if ranks > 1 else 0
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    pyro.set_rng_seed(0)
    generator = torch.Generator().manual_seed(1)
    if resnet50:
        try:
            import torchvision
        except ImportError as error:
            raise SystemExit("--resnet50 needs torchvision: pip install torchvision") from error

        net = torchvision.models.resnet50(num_classes=1000).to(device)
        num_data, per_rank = 1_281_167, batch
        x = torch.randn(per_rank * ranks, 3, 224, 224, generator=generator).to(device)
        y = torch.randint(0, 1000, (per_rank * ranks,), generator=generator).to(device)
        model_data = (x, y)
    else:
        net = torch.nn.Sequential(torch.nn.Linear(784, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))
        num_data, per_rank = NUM_DATA, batch // ranks
        x = torch.randn(NUM_DATA, 784, generator=generator)
        y = torch.randint(0, 10, (NUM_DATA,), generator=generator)
        model_data = (x, y)
    bayes_net = FlatBayesianModule(net, fan_in_prior())
    if resnet50:  # the synthetic batch stands for a plate over ImageNet's training set

        def model(x, y):
            data = pyro.plate("data", num_data, subsample_size=per_rank, device=x.device)
            index = data.indices % len(x)
            logits = bayes_net(x[index])
            with data:
                pyro.sample("y", pyro.distributions.Categorical(logits=logits), obs=y[index])
    else:
        model = partial(module_classifier, bayes_net, subsample_size=per_rank)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values={"weights": bayes_net.initial_weights}))
    svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), vectorize_particles=False)
    times = []
    for _ in range(updates + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        svi.update(*model_data)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    floats = svi.reducer.floats_reduced / (updates + 2) if svi.reducer is not None else 0
    if ranks > 1:
        torch.distributed.destroy_process_group()
    seconds = statistics.median(times[2:])
    return {
        "rank": rank, "ranks": ranks, "D": bayes_net.num_weights, "seconds_per_update": seconds,
        "points_per_second": per_rank * ranks / seconds, "floats_per_update": floats,
        "floats_per_update_over_D": floats / bayes_net.num_weights,
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_pyro(ranks: int, updates: int, batch: int) -> dict:
    """``ranks`` worker processes with the environment ``torchrun`` gives them."""
    port = _free_port()
    command = [sys.executable, "-m", "benchmarks.data_parallel", "--worker", "--updates", str(updates),
               "--batch", str(batch)]  # fmt: skip
    processes = []
    for rank in range(ranks):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if ranks > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [process.communicate()[0] for process in processes]
    if any(process.returncode for process in processes):
        raise RuntimeError(f"a rank failed: {[p.returncode for p in processes]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


NUMPYRO_WORKER = """
import json, os, statistics, sys, time
flags = "--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false"
os.environ["XLA_FLAGS"] = flags
import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
import flax.linen as nn
from numpyro.contrib.module import random_flax_module
from numpyro.infer.autoguide import AutoNormal
from numpyro_psvi import ProximalScoreVI

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense({hidden})(x)))

rng = np.random.default_rng(1)
x = jnp.asarray(rng.normal(size=({num_data}, 784)), jnp.float32)
y = jnp.asarray(rng.integers(0, 10, {num_data}))
devices = {devices}

def model(x, y):
    net = random_flax_module("net", MLP(), dist.Normal(0.0, 0.1), input_shape=(1, 784))
    with numpyro.plate("data", x.shape[0], subsample_size={global_batch} // devices):
        xb, yb = numpyro.subsample(x, event_dim=1), numpyro.subsample(y, event_dim=0)
        numpyro.sample("y", dist.Categorical(logits=net(xb)), obs=yb)

mesh = jax.sharding.Mesh(jax.devices()[:devices], ("data",)) if devices > 1 else False
svi = ProximalScoreVI(model, AutoNormal(model), numpyro.optim.Adam(1e-3), num_particles={particles},
                      data_parallel=mesh)
state = svi.init(jax.random.PRNGKey(0), x, y)
update = jax.jit(svi.update)
jaxpr = jax.make_jaxpr(svi.update)(state, x, y)

def inner_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(getattr(value, "jaxpr", None), "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from inner_jaxprs(item)

def reduced(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("psum"):
            total += sum(int(np.prod(v.aval.shape)) for v in eqn.invars)
        for value in eqn.params.values():
            for inner in inner_jaxprs(value):
                total += reduced(inner)
    return total

floats = reduced(jaxpr.jaxpr)
params = svi.optim.get_params(state.optim_state)
D = sum(int(np.prod(v.shape)) for k, v in params.items() if k.endswith("auto_loc"))
times = []
for _ in range({updates} + 2):
    start = time.perf_counter()
    state, loss = update(state, x, y)
    loss.block_until_ready()
    times.append(time.perf_counter() - start)
seconds = statistics.median(times[2:])
print(json.dumps({{"ranks": devices, "D": D, "seconds_per_update": seconds,
                  "points_per_second": {global_batch} / seconds, "floats_per_update": floats,
                  "floats_per_update_over_D": floats / D}}))
"""


def run_numpyro(devices: int, updates: int, batch: int) -> dict:
    code = NUMPYRO_WORKER.format(
        devices=devices, hidden=HIDDEN, num_data=NUM_DATA, global_batch=batch,
        particles=PARTICLES, updates=updates,
    )  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    base = rows[0]["seconds_per_update"]
    lines = ["| ranks | D | s / update | speed-up | points / s | floats all-reduced / update | / D |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['ranks']} | {row['D']:,} | {row['seconds_per_update']:.4f} | "
            f"{base / row['seconds_per_update']:.2f} | {row['points_per_second']:.0f} | "
            f"{row['floats_per_update']:,.0f} | {row['floats_per_update_over_D']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--global-batches", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--numpyro", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resnet50", action="store_true", help="the Bayesian ResNet-50 (run under torchrun)")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    parser.add_argument("--batch", type=int, default=32, help="images per rank (--resnet50)")
    options = parser.parse_args()
    if options.worker or options.resnet50:
        import torch

        if not options.resnet50:
            torch.set_num_threads(1)
        device = options.device if options.resnet50 else "cpu"
        report = _pyro_fit(options.updates, options.batch, device, options.resnet50)
        if report["rank"] == 0:
            if options.resnet50:
                report["bytes_per_update"] = 4 * report["floats_per_update"]
                report["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
            print(json.dumps(report))
        return
    from benchmarks.common import save

    payload = {"updates": options.updates, "num_particles": PARTICLES, "runs": []}
    for batch in options.global_batches:
        pyro_rows = [run_pyro(ranks, options.updates, batch) for ranks in options.ranks]
        print(f"Pyro, torch.distributed (gloo), global batch {batch}:")
        print(table(pyro_rows))
        run = {"global_batch": batch, "pyro": pyro_rows}
        if options.numpyro:
            run["numpyro"] = [run_numpyro(devices, options.updates, batch) for devices in options.ranks]
            print(f"NumPyro, shard_map over host devices, global batch {batch}:")
            print(table(run["numpyro"]))
        payload["runs"].append(run)
    print(save("data_parallel", payload))


if __name__ == "__main__":
    main()
