"""Pyro backend of psvi (proximal score-based VI).

The Pyro engine (``pyro_psvi.ProximalScoreVI``) mirrors ``numpyro_psvi`` module by
module; it is not implemented yet (see the project's issue on the Pyro engine).
"""
