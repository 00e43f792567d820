"""Domain code built on :mod:`numpyro_psvi` that the engines never import.

- :mod:`numpyro_psvi.contrib.models`: ready-made models (Gaussian targets,
  regressions, MLP classifiers), ``fan_in_prior`` for ``random_flax_module``, and
  ``FlatBayesianModule`` (a Flax module's weights as one flat latent) with
  ``module_classifier``;
- :mod:`numpyro_psvi.contrib.forecasting`: a Flax ``DLinear`` and ``forecaster``
  (needs flax: ``pip install "psvi[flax]"``);
- :mod:`numpyro_psvi.contrib.posteriordb`: Stan-faithful PosteriorDB models.

Each is the twin of the module of the same name in :mod:`pyro_psvi.contrib`.
"""
