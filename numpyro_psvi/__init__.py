"""NumPyro backend of psvi: proximal score-based variational inference."""

from numpyro_psvi.baselines import GSM, BaM
from numpyro_psvi.engine import EngineState, ScoreEngine
from numpyro_psvi.guides import GuideDensity, guide_density, guide_family
from numpyro_psvi.objective import proximal_objective, weighted_fisher
from numpyro_psvi.proximal import ProximalScoreVI
from psvi.objective import ProximalScoreMatching
from psvi.schedules import bam_schedule

__all__ = [
    "GSM",
    "BaM",
    "EngineState",
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
    :mod:`numpyro_psvi.arviz`, imported on first use (ArviZ is slow to import)."""
    if name in _ARVIZ_EXPORTS:
        from numpyro_psvi import arviz

        return getattr(arviz, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
