"""User-written guides with local latents in a subsampled plate (issue 24, item 4): SVI
against ProximalScoreVI at equal score calls, on a target whose posterior is exact.

The hierarchical target of the local-latent tests (``psvi.contrib.targets``: N = 40
members, one local ``z_i`` and ``s_i`` each, a global ``mu``; mean-field exact), batches
of B = 10 drawn by the plate. Guides: the "indexing" guide (params over the plate's full
size, indexed by the guide's own plate indices: the TBIP notebook's pattern) and
AutoNormal. Each fit: S = 4 particles, ``--updates`` updates (SVI: ``Trace_ELBO(4)``, the
same score calls), the user's Adam at each ``--lrs``, seeds 0 .. ``--seeds`` - 1.
Reported per site: the largest |fitted mean - exact| / exact sd and the largest
|log(fitted sd / exact sd)| over the site's coordinates.

    python -m benchmarks.user_guide_locals [--updates 1500] [--lrs 0.05 0.01] [--seeds 3]

writes ``benchmarks/results/user_guide_locals.json`` and prints the table for
docs/guides.md.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from benchmarks.common import save
from numpyro_psvi import ProximalScoreVI
from psvi.contrib.targets import hierarchical_data, hierarchical_posterior

NUM, BATCH = 40, 10
SITES = ("mu", "z", "s")


def model(y, w):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("data", NUM, subsample_size=BATCH) as idx:
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        numpyro.sample("s", dist.LogNormal(0.5, 0.5))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y[idx])
        numpyro.sample("w", dist.Normal(mu, 1.0), obs=w[idx])


def indexing_guide(y, w):
    positive = constraints.positive
    mu_loc = numpyro.param("mu_loc", 0.0)
    mu_scale = numpyro.param("mu_scale", 1.0, constraint=positive)
    z_loc = numpyro.param("z_loc", jnp.zeros(NUM))
    z_scale = numpyro.param("z_scale", jnp.ones(NUM), constraint=positive)
    s_loc = numpyro.param("s_loc", jnp.zeros(NUM))
    s_scale = numpyro.param("s_scale", jnp.ones(NUM), constraint=positive)
    numpyro.sample("mu", dist.Normal(mu_loc, mu_scale))
    with numpyro.plate("data", NUM, subsample_size=BATCH) as idx:
        numpyro.sample("z", dist.Normal(z_loc[idx], z_scale[idx]))
        numpyro.sample("s", dist.LogNormal(s_loc[idx], s_scale[idx]))


def fit(method: str, guide_name: str, lr: float, seed: int, updates: int, data) -> dict[str, float]:
    guide = indexing_guide if guide_name == "indexing" else AutoNormal(model)
    optim = numpyro.optim.Adam(lr)
    if method == "svi":
        engine = SVI(model, guide, optim, Trace_ELBO(num_particles=4))
    else:
        engine = ProximalScoreVI(model, guide, optim, num_particles=4)
    params = engine.run(jax.random.PRNGKey(seed), updates, *data, progress_bar=False).params
    exact = hierarchical_posterior(*map(np.asarray, data))
    errors = {}
    for site in SITES:
        loc, sd = (np.asarray(v) for v in exact[site])
        names = (f"{site}_loc", f"{site}_scale") if guide_name == "indexing" else (
            f"{site}_auto_loc", f"{site}_auto_scale")  # fmt: skip
        errors[f"{site}_mean_err"] = float(np.max(np.abs(np.asarray(params[names[0]]) - loc) / sd))
        errors[f"{site}_log_sd_ratio"] = float(np.max(np.abs(np.log(np.asarray(params[names[1]]) / sd))))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=1500)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.01])
    parser.add_argument("--seeds", type=int, default=3)
    options = parser.parse_args()
    data = tuple(map(jnp.asarray, hierarchical_data(NUM)))
    rows = []
    for guide_name in ("indexing", "autonormal"):
        for lr in options.lrs:
            for method in ("svi", "psvi"):
                runs = [
                    fit(method, guide_name, lr, seed, options.updates, data) for seed in range(options.seeds)
                ]
                row = {"guide": guide_name, "lr": lr, "method": method, "runs": runs}
                row.update({key: float(np.median([r[key] for r in runs])) for key in runs[0]})
                rows.append(row)
                print(
                    row["guide"],
                    lr,
                    method,
                    {k: round(v, 3) for k, v in row.items() if k.endswith(("err", "ratio"))},
                )
    save("user_guide_locals", {"updates": options.updates, "num_particles": 4, "rows": rows})
    print(
        "\n| guide | Adam lr | method | " + " | ".join(f"{s} mean err / log sd ratio" for s in SITES) + " |"
    )
    print("|" + " --- |" * (3 + len(SITES)))
    for row in rows:
        cells = [f"{row[f'{s}_mean_err']:.3f} / {row[f'{s}_log_sd_ratio']:.3f}" for s in SITES]
        print(f"| {row['guide']} | {row['lr']} | {row['method']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
