"""Backend-free support for benchmarks, examples and tests (NumPy only).

- :mod:`psvi.contrib.datasets`: digits, UCI (the PBP splits), MNIST and ETT loaders;
  data come from a ``root=`` argument or an environment variable, and are downloaded
  only when asked (``download=True``);
- :mod:`psvi.contrib.posteriordb`: PosteriorDB data and reference summaries (four
  posteriors ship with the package);
- :mod:`psvi.contrib.targets`: Gaussian and conjugate-regression targets with known
  posteriors;
- :mod:`psvi.contrib.plots`: convergence and reliability plots (needs matplotlib).

The engines of :mod:`numpyro_psvi` and :mod:`pyro_psvi` never import this package.
"""
