"""One rank of a data-parallel Pyro fit, or the one-process fit it must reproduce.

Run as ``python -m psvi_testing.pyro_data_parallel CASE STEPS OUT [options] [+ CASE ...]``
(fits separated by ``+`` run one after the other, in one process group) with the
``torch.distributed`` environment variables of a rank (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``: what ``torchrun`` sets), or without them for one
process (or call :func:`run_fits` in the test's process); ``--batch`` is the plate's
``subsample_size`` (one rank's batch). Rank 0 (or the one process) writes the final
params, the losses and the counters to ``OUT`` (``.npz``).

Cases: ``normal`` (AutoNormal), ``mvn`` (AutoMultivariateNormal), ``param`` (AutoNormal
and a ``pyro.param`` noise scale in the model), ``user`` (a hand-written mean-field
guide). Options: ``--load PATH`` resumes a
checkpoint, ``--save PATH`` writes one at the end, ``--fail-at K`` makes rank 1's model
raise at step ``K``, ``--hang-at K`` makes rank 1 hang for three timeouts before step
``K`` (a rank stuck outside the score phase), ``--timeout T`` the all-reduce timeout,
``--seed-by-rank`` seeds each rank differently, ``--gsm`` fits with GSM,
``--non-finite-at K`` gives rank 1 an infinite log joint at step ``K``,
``--given-indices`` passes each rank its share of a batch the script draws
(``subsample=``, as from a ``DistributedSampler``). Rank ``r > 0`` writes ``OUT`` with
``-rank<r>`` before ``.npz``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.distributed
from pyro import poutine
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from pyro_psvi import GSM, ProximalScoreVI
from pyro_psvi.parallel import ScoreReducer

NUM_DATA = 64
JOB_SEPARATOR = "+"


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_DATA, 3, generator=generator, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(
        NUM_DATA, generator=generator, dtype=torch.float64
    )
    return x, y


def make_model(batch: int, learn_noise: bool, now: dict, enumerated: bool = False):
    """The regression; ``now`` says what this step does: ``fail`` (raise), ``non_finite``
    (an infinite log joint), ``indices`` (the rank's own batch, passed to the plate)."""

    def model(x: torch.Tensor, y: torch.Tensor) -> None:
        if now["fail"]:
            raise RuntimeError("a model error on rank 1")
        w = pyro.sample("w", dist.Normal(torch.zeros(3, dtype=x.dtype), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        if learn_noise:
            positive = dist.constraints.positive
            noise = pyro.param("noise", torch.tensor(0.5, dtype=x.dtype), constraint=positive)
        else:
            noise = torch.tensor(0.3, dtype=x.dtype)
        if now["non_finite"]:  # a non-finite log joint and score (inf passes Pyro's validation)
            pyro.factor("inf", (w.sum(-1) + b) * float("inf"))
        given = now["indices"]
        plate = pyro.plate(
            "data", NUM_DATA, subsample_size=None if given is not None else batch, subsample=given
        )
        with plate as index:
            mean = (x[index] * w).sum(-1) + b
            if enumerated:  # an outlier indicator per point, summed out
                outlier = dist.Bernoulli(torch.tensor(0.3, dtype=x.dtype))
                mean = mean + 2.0 * pyro.sample("z", outlier, infer={"enumerate": "parallel"})
            pyro.sample("y", dist.Normal(mean, noise), obs=y[index])

    return model


def user_guide(x: torch.Tensor, y: torch.Tensor) -> None:
    positive = dist.constraints.positive
    loc_w = pyro.param("loc_w", torch.zeros(3, dtype=x.dtype))
    scale_w = pyro.param("scale_w", torch.full((3,), 0.5, dtype=x.dtype), constraint=positive)
    loc_b = pyro.param("loc_b", torch.zeros((), dtype=x.dtype))
    scale_b = pyro.param("scale_b", torch.tensor(0.5, dtype=x.dtype), constraint=positive)
    pyro.sample("w", dist.Normal(loc_w, scale_w).to_event(1))
    pyro.sample("b", dist.Normal(loc_b, scale_b))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=["normal", "mvn", "param", "user", "enum"])
    parser.add_argument("steps", type=int)
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=16, help="the plate's subsample_size (per rank)")
    parser.add_argument("--load")
    parser.add_argument("--save")
    parser.add_argument("--fail-at", type=int)
    parser.add_argument("--hang-at", type=int)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--seed-by-rank", action="store_true", help="a different seed on each rank")
    parser.add_argument("--gsm", action="store_true", help="fit with GSM instead (case mvn)")
    parser.add_argument("--non-finite-at", type=int, help="rank 1's log joint is infinite at this step")
    parser.add_argument("--given-indices", action="store_true", help="pass each rank's batch to the plate")
    return parser


def fit(options: argparse.Namespace, distributed: bool) -> None:
    """One fit; this rank writes its results to ``options.out`` (rank ``r > 0``: with
    ``-rank<r>`` before ``.npz``)."""
    rank = torch.distributed.get_rank() if distributed else 0
    pyro.clear_param_store()
    pyro.set_rng_seed(rank if options.seed_by_rank else 0)
    now = {"fail": False, "non_finite": False, "indices": None}
    model = make_model(options.batch, options.case == "param", now, options.case == "enum")
    world = torch.distributed.get_world_size() if distributed else 1
    auto = AutoMultivariateNormal if options.case == "mvn" else AutoNormal
    guide = user_guide if options.case == "user" else auto(poutine.block(model, hide=["z"]))
    reducer = ScoreReducer(timeout=options.timeout) if distributed else False
    if options.gsm:
        svi = GSM(model, guide, data_parallel=reducer)
    else:
        svi = ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 0.05}), data_parallel=reducer)
    if options.load:
        svi.load(options.load)
    x, y = data()
    losses = []
    for step in range(options.steps):
        if options.hang_at == step and rank == 1:
            time.sleep(3 * options.timeout)
        now["fail"] = options.fail_at == step and rank == 1
        now["non_finite"] = options.non_finite_at == step and rank == 1
        if options.given_indices:  # a global batch of 16 drawn by the script, split as a sampler would
            batch = torch.randperm(NUM_DATA, generator=torch.Generator().manual_seed(100 + step))[:16]
            now["indices"] = batch.chunk(world)[rank]
        losses.append(svi.step(x, y))
    if options.save:
        svi.save(options.save)
    floats_reduced = reducer.floats_reduced if reducer else 0  # in the steps
    diagnostics = {}
    if not options.gsm:  # collectives: every rank calls them
        diagnostics = {"evaluate_loss": svi.evaluate_loss(x, y), "fisher": svi.fisher_divergence(x, y)}
    params = {name: value.detach().numpy() for name, value in pyro.get_param_store().items()}
    out = options.out if rank == 0 else options.out.replace(".npz", f"-rank{rank}.npz")
    np.savez(
            out, losses=np.array(losses), num_score_calls=svi.num_score_calls,
            num_rejected=svi.num_rejected, floats_reduced=floats_reduced,
            **diagnostics,
            **{f"param:{name}": value for name, value in params.items()},
        )  # fmt: skip


def run_fits(argv: list[str]) -> None:
    """The fits ``argv`` lists, separated by ``+``, one after the other in this process
    (one process group for all of them when the rank's environment is set)."""
    jobs, job = [], []
    for word in [*argv, JOB_SEPARATOR]:
        if word == JOB_SEPARATOR:
            jobs.append(_parser().parse_args(job))
            job = []
        else:
            job.append(word)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    for options in jobs:
        fit(options, distributed)
    if distributed:
        # Leave together, then exit without tearing gloo down: a rank whose peer has
        # already closed its sockets can abort in the teardown ("terminate called ..."),
        # the suspected cause of one CI failure whose failing rank went unreported.
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_fits(sys.argv[1:])
