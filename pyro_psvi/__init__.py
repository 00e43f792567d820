"""Pyro backend of psvi: proximal score-based variational inference."""

from psvi.schedules import bam_schedule
from pyro_psvi.baselines import GSM, BaM
from pyro_psvi.engine import ProximalScoreVI
from pyro_psvi.guides import GuideDensity, guide_density
from pyro_psvi.models import FlatBayesianModule, bayesian_module
from pyro_psvi.objective import proximal_objective, weighted_fisher

__all__ = [
    "GSM",
    "BaM",
    "FlatBayesianModule",
    "bam_schedule",
    "GuideDensity",
    "ProximalScoreVI",
    "bayesian_module",
    "guide_density",
    "proximal_objective",
    "weighted_fisher",
]
