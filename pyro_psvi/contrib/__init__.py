"""Domain code built on :mod:`pyro_psvi` that the engines never import.

- :mod:`pyro_psvi.contrib.models`: ready-made models (Gaussian targets, regressions,
  MLP classifiers) and the Bayesian-network builders ``bayesian_module``,
  ``FlatBayesianModule``, ``fan_in_prior`` and ``module_classifier``;
- :mod:`pyro_psvi.contrib.forecasting`: ``DLinear``, ``Koopa`` and ``forecaster``;
- :mod:`pyro_psvi.contrib.posteriordb`: Stan-faithful PosteriorDB models.

Each is the twin of the module of the same name in :mod:`numpyro_psvi.contrib`.
"""
