"""NumPyro backend of psvi: proximal score-based variational inference."""

from numpyro_psvi.baselines import GSM, BaM
from numpyro_psvi.engine import ProximalScoreVI, PSVIState, load_state, save_state
from numpyro_psvi.guides import GuideDensity, guide_density
from numpyro_psvi.objective import proximal_objective, weighted_fisher
from psvi.schedules import bam_schedule

__all__ = [
    "GSM",
    "BaM",
    "bam_schedule",
    "GuideDensity",
    "PSVIState",
    "ProximalScoreVI",
    "guide_density",
    "load_state",
    "proximal_objective",
    "save_state",
    "weighted_fisher",
]
