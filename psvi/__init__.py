"""Backend-free helpers shared by ``numpyro_psvi`` and ``pyro_psvi`` (NumPy only)."""

__version__ = "0.1.0"
