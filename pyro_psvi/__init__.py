"""Pyro backend of psvi: proximal score-based variational inference."""

from psvi.objective import ProximalScoreMatching
from psvi.schedules import bam_schedule
from pyro_psvi.baselines import GSM, BaM
from pyro_psvi.engine import ScoreEngine
from pyro_psvi.guides import GuideDensity, guide_density, guide_family
from pyro_psvi.objective import proximal_objective, weighted_fisher
from pyro_psvi.proximal import ProximalScoreVI

__all__ = [
    "GSM",
    "BaM",
    "GuideDensity",
    "ProximalScoreMatching",
    "ProximalScoreVI",
    "ScoreEngine",
    "bam_schedule",
    "guide_density",
    "guide_family",
    "mode_coverage",
    "proximal_objective",
    "to_inference_data",
    "vi_diagnostics",
    "weighted_fisher",
]

_ARVIZ_EXPORTS = ("mode_coverage", "to_inference_data", "vi_diagnostics")


def __getattr__(name: str):
    """``to_inference_data``, ``vi_diagnostics`` and ``mode_coverage`` from
    :mod:`pyro_psvi.arviz`, imported on first use (ArviZ is slow to import)."""
    if name in _ARVIZ_EXPORTS:
        from pyro_psvi import arviz

        return getattr(arviz, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
