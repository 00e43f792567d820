"""Backend-free pieces shared by ``numpyro_psvi`` and ``pyro_psvi`` (NumPy only)."""

from psvi.objective import ProximalScoreMatching

__version__ = "0.1.0"

__all__ = ["ProximalScoreMatching"]
