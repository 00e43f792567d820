"""Step cost and peak memory of Bayesian ResNets and ViTs on one GPU (issue 12).

Networks (random initialisation, 10 classes; only the cost is measured, on one
mini-batch of ``--batch`` random images):

- torchvision's ``resnet18``, ``resnet50``, ``resnet101``, ``vit_b_16`` and ``vit_l_32``
  (3 x ``--image-size``^2 inputs; BatchNorm in training mode, as SGD trains it);
- ``resnet_gn<width>``: the ResNet-18 layout of :mod:`benchmarks.scale` (GroupNorm,
  1 x 28 x 28 inputs) at a channel width, e.g. ``resnet_gn192`` (D = 1.0e8);
- ``flax_resnet_gn<width>``: its Flax twin, for the NumPyro methods.

Methods, each timed as the median of ``--repeats`` steps after two warm-ups (the device
synchronised around each step), with the peak memory the step allocates above what the
network and data hold (``torch.cuda.max_memory_allocated``, or for NumPyro the JAX
device's ``peak_bytes_in_use`` in a process of its own), also in D-vectors (``4 D``
bytes):

- ``sgd``: ``S`` plain SGD steps of the network (the reference for the ratio);
- ``advi_flat`` / ``psvi_flat``: ``SVI`` + ``Trace_ELBO(S)`` and ``ProximalScoreVI``
  (defaults, ``S`` particles, ``vectorize_particles=False``) on ``FlatBayesianModule``
  (one flat site), AutoNormal (scale 0.01), ``fan_in_prior()``, Adam(1e-3);
- ``advi_plain`` / ``psvi_plain``: the same on ``bayesian_module`` (one site per tensor);
- ``numpyro_sgd`` / ``numpyro_advi`` / ``numpyro_psvi``: :mod:`benchmarks.scale`'s
  NumPyro methods (``random_flax_module``, one site per tensor, ``jax.jit`` updates).

    python -m benchmarks.scale_gpu [--models resnet50 vit_l_32 ...] [--methods sgd psvi_flat ...]
        [--batch 32] [--image-size 224] [--particles 4] [--repeats 5] [--budget SECONDS]
        [--device cuda] [--out PATH] [--table]

NumPyro methods run the ``flax_`` networks and the others the torch ones. Rows merge into
``benchmarks/results/scale_gpu.json`` (``--out``) as they are measured,
keyed by network and method, so a run cut short keeps what it measured; a row that would
start after ``--budget`` seconds is skipped. ``--memory-snapshots DIR`` saves each torch row's
CUDA allocation history (``torch.cuda.memory._dump_snapshot``: what is allocated at the
peak, with stacks), and ``--memory-report FILE --num-weights D`` prints what one holds at its
peak. ``--table`` prints the table for
``docs/scale.md`` from the JSON. ``--device cpu`` runs the same code on a CPU (the slow
test, small networks; no peak memory there).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside torch on one GPU

import pyro  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS  # noqa: E402
from benchmarks.scale import _make_numpyro_step, _make_step, resnet_gn  # noqa: E402

TORCHVISION = ("resnet18", "resnet50", "resnet101", "vit_b_16", "vit_l_32")


def build_network(name: str, image_size: int, device: torch.device) -> tuple[torch.nn.Module, tuple]:
    """The network ``name`` on ``device`` and the shape of one input image."""
    with torch.device(device):
        if name.startswith("resnet_gn"):
            return resnet_gn(int(name.removeprefix("resnet_gn"))), (1, 28, 28)
        if name not in TORCHVISION:
            raise ValueError(f"unknown network {name!r}: use {', '.join(TORCHVISION)} or resnet_gn<width>")
        import torchvision.models

        keywords = {"image_size": image_size} if name.startswith("vit") else {}
        return getattr(torchvision.models, name)(num_classes=10, **keywords), (3, image_size, image_size)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_torch(name: str, method: str, options: argparse.Namespace) -> dict:
    """One (network, method) row of the Pyro/torch methods, in this process."""
    device = torch.device(options.device)
    torch.manual_seed(0)
    net, image_shape = build_network(name, options.image_size, device)
    num_weights, num_tensors = sum(p.numel() for p in net.parameters()), len(list(net.parameters()))
    x = torch.randn(2 * options.batch, *image_shape, device=device)
    y = torch.randint(0, 10, (2 * options.batch,), device=device)
    pyro.clear_param_store()  # the previous row's guide params, before the baseline
    gc.collect()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        if options.memory_snapshots:
            torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    step = _make_step(method, net, x, y, options.particles, batch=options.batch)
    times = []
    for i in range(options.repeats + 2):  # two warm-ups
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None
    if device.type == "cuda" and options.memory_snapshots:  # for torch.cuda's memory_viz
        options.memory_snapshots.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(options.memory_snapshots / f"{name}_{method}.pickle"))
        torch.cuda.memory._record_memory_history(enabled=None)
    return _row(name, method, num_weights, num_tensors, times, peak)


def measure_numpyro(name: str, method: str, options: argparse.Namespace) -> dict:
    """One row of the NumPyro methods (call in a process of its own: the peak is the process's)."""
    import jax

    width = int(name.removeprefix("flax_resnet_gn"))
    step, num_weights, num_tensors = _make_numpyro_step(method, width, options.particles)
    times = []
    for i in range(options.repeats + 2):  # two warm-ups (the first compiles)
        start = time.perf_counter()
        step()  # blocks until the update is done
        if i >= 2:
            times.append(time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    return _row(name, method, num_weights, num_tensors, times, stats.get("peak_bytes_in_use"))


def _row(name: str, method: str, num_weights: int, num_tensors: int, times: list, peak: int | None) -> dict:
    return {"network": name, "method": method, "num_weights": num_weights, "num_tensors": num_tensors,
            "seconds": statistics.median(times), "peak_extra_bytes": peak,
            "peak_extra_d_vectors": None if peak is None else peak / (4 * num_weights)}  # fmt: skip


def _merge(path: Path, row: dict, setting: dict) -> None:
    """Add ``row`` to the JSON at ``path``, replacing the same network and method's."""
    payload = json.loads(path.read_text()) if path.exists() else {**setting, "rows": []}
    key = (row["network"], row["method"])
    payload["rows"] = [r for r in payload["rows"] if (r["network"], r["method"]) != key] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))


def print_table(path: Path) -> None:
    payload = json.loads(path.read_text())
    sgd = {(r["network"], r["method"].startswith("numpyro")): r["seconds"] for r in payload["rows"]
           if r["method"].endswith("sgd")}  # fmt: skip
    print(f"{payload['device']}; batch {payload['batch']}, S = {payload['particles']}\n")
    print("| network | D | tensors | method | s / step | ratio to S SGD steps | peak extra GB | D-vectors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in payload["rows"]:
        reference = sgd.get((r["network"], r["method"].startswith("numpyro")))
        ratio = f"{r['seconds'] / reference:.2f}" if reference else "-"
        peak, vectors = r["peak_extra_bytes"], r["peak_extra_d_vectors"]
        gigabytes, vectors = ("-", "-") if peak is None else (f"{peak / 2**30:.2f}", f"{vectors:.1f}")
        print(f"| {r['network']} | {r['num_weights']:.2e} | {r['num_tensors']} | {r['method']} | "
              f"{r['seconds']:.4f} | {ratio} | {gigabytes} | {vectors} |")  # fmt: skip


def memory_report(path: Path, num_weights: int, top: int = 25) -> list[dict]:
    """What is allocated at the peak of a ``--memory-snapshots`` file, grouped by the first
    three frames in Pyro, the engine or the benchmarks, in D-vectors (``4 D`` bytes).

    The file is torch's own pickle (``torch.cuda.memory._dump_snapshot``): read only
    snapshots this script wrote.
    """
    import pickle

    with open(path, "rb") as f:
        trace = pickle.load(f)["device_traces"][0]
    live, current, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    groups: dict[str, list[int]] = {}
    for event in at_peak.values():
        frames = [f for f in event["frames"] if any(part in f["filename"] for part in ("pyro", "benchmarks"))]
        key = " <- ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in frames[:3]) or "?"
        size, count = groups.get(key, [0, 0])
        groups[key] = [size + event["size"], count + 1]
    rows = [{"where": key, "d_vectors": size / (4 * num_weights), "allocations": count}
            for key, (size, count) in sorted(groups.items(), key=lambda item: -item[1][0])]  # fmt: skip
    return rows[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TORCHVISION))
    parser.add_argument("--methods", nargs="+", default=["sgd", "advi_flat", "psvi_flat"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=float("inf"), help="start no row after this many s")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale_gpu.json")
    parser.add_argument("--table", action="store_true", help="print the table from --out and stop")
    parser.add_argument(
        "--memory-snapshots", type=Path, help="a folder for each row's CUDA allocation history"
    )
    parser.add_argument("--one", nargs=2, metavar=("NETWORK", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-report", type=Path, help="print the peak's breakdown of a snapshot and stop"
    )
    parser.add_argument("--num-weights", type=int, help="D of the snapshot's network (with --memory-report)")
    options = parser.parse_args()
    if options.memory_report:
        for row in memory_report(options.memory_report, options.num_weights):
            print(f"{row['d_vectors']:6.2f} D  {row['allocations']:4d}  {row['where']}")
        return
    if options.table:
        print_table(options.out)
        return
    if options.one:
        print(json.dumps(measure_numpyro(*options.one, options)))
        return
    if options.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU, {torch.get_num_threads()} torch threads"
    setting = {"device": device_name, "batch": options.batch, "particles": options.particles,
               "image_size": options.image_size, "torch": torch.__version__}  # fmt: skip
    started = time.perf_counter()
    for name in options.models:
        for method in options.methods:
            if method.startswith("numpyro") != name.startswith("flax"):
                continue  # the NumPyro methods run the Flax networks, the others the torch ones
            if time.perf_counter() - started > options.budget:
                print(f"{name} {method}: skipped (past the {options.budget:.0f} s budget)", flush=True)
                continue
            try:
                if method.startswith("numpyro"):
                    command = [sys.executable, "-m", "benchmarks.scale_gpu", "--one", name, method,
                               "--particles", str(options.particles),
                               "--repeats", str(options.repeats)]  # fmt: skip
                    out = subprocess.run(command, check=True, capture_output=True, text=True)
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                else:
                    row = measure_torch(name, method, options)
            except (RuntimeError, subprocess.CalledProcessError) as error:  # e.g. out of memory
                detail = getattr(error, "stderr", None) or str(error)
                print(f"{name} {method}: failed: {detail[-2000:]}", flush=True)
                continue
            finally:
                gc.collect()
                if options.device == "cuda":
                    torch.cuda.empty_cache()
            _merge(options.out, row, setting)
            peak = row["peak_extra_d_vectors"]
            print(f"{name} (D={row['num_weights']:.2e}) {method}: {row['seconds']:.4f} s"
                  + ("" if peak is None else f", +{row['peak_extra_bytes'] / 2**30:.2f} GB ({peak:.1f} D)"),
                  flush=True)  # fmt: skip
    print_table(options.out)


if __name__ == "__main__":
    main()
