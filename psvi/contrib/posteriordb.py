"""PosteriorDB targets: data and reference summaries (NumPy only).

Five posteriors from posteriordb: eight schools (centered and non-centered), arK,
diamonds and low_dim_gauss_mix. Four ship with the package
(``psvi/contrib/data/posteriordb``); diamonds and the reference draws are read from a
local copy of posteriordb's folders (``root`` argument, else ``$PSVI_POSTERIORDB``).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

NAMES = (
    "eight_schools-eight_schools_noncentered",
    "eight_schools-eight_schools_centered",
    "arK-arK",
    "low_dim_gauss_mix-low_dim_gauss_mix",
    "diamonds-diamonds",
)
SHIPPED = Path(__file__).parent / "data" / "posteriordb"


class Posterior(NamedTuple):
    """A posterior: its ``data`` (arrays by Stan name), and per reference parameter
    (Stan names, e.g. ``"theta[1]"``) the reference ``mean`` and ``std``."""

    name: str
    data: dict[str, np.ndarray]
    reference_mean: dict[str, float]
    reference_std: dict[str, float]


def _folder(name: str, root: str | os.PathLike | None) -> Path:
    if name not in NAMES:
        raise ValueError(f"Unknown posterior {name!r}; available: {', '.join(NAMES)}.")
    for base in (root, os.environ.get("PSVI_POSTERIORDB"), SHIPPED):
        if base and (Path(base) / name / "data.json").is_file():
            return Path(base) / name
    raise FileNotFoundError(
        f"Posterior {name!r} is not shipped with psvi; pass root= (the folder holding "
        "posteriordb's '<name>/data.json') or set PSVI_POSTERIORDB."
    )


def load(name: str, root: str | os.PathLike | None = None) -> Posterior:
    """Load a posterior's data and reference summary."""
    folder = _folder(name, root)
    data = {k: np.asarray(v) for k, v in json.loads((folder / "data.json").read_text()).items()}
    summary = json.loads((folder / "reference_summary.json").read_text())["parameters"]
    return Posterior(
        name,
        data,
        {k: float(v["mean"]) for k, v in summary.items()},
        {k: float(v["std"]) for k, v in summary.items()},
    )


def reference_draws(name: str, root: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The reference NUTS draws (all chains pooled) by Stan parameter name."""
    folder = _folder(name, root)
    path = folder / "reference_draws.json.gz"
    if not path.is_file():
        raise FileNotFoundError(f"No reference draws for {name!r} under {folder}.")
    with gzip.open(path, "rt") as f:
        chains = json.load(f)
    return {k: np.concatenate([np.asarray(c[k]) for c in chains]) for k in chains[0]}


def flatten(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Site values ``(..., n)`` to Stan scalar names ``name[i]`` (1-based), draws first."""
    out = {}
    for site, value in values.items():
        value = np.asarray(value)
        if value.ndim <= 1:
            out[site] = value
        else:
            for i in range(value.shape[-1]):
                out[f"{site}[{i + 1}]"] = value[..., i]
    return out
