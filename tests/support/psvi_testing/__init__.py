"""Backend-free helpers shared by the NumPyro and Pyro tests (targets with known
posteriors and the checks made on both backends' results). NumPy, SciPy and ArviZ only;
on the test path through ``pythonpath`` in setup.cfg."""
