"""PosteriorDB data: the shipped posteriors load."""

import pytest

from psvi.contrib import posteriordb

SHIPPED = [n for n in posteriordb.NAMES if (posteriordb.SHIPPED / n).is_dir()]


def test_shipped_posteriors_load():
    assert set(SHIPPED) == set(posteriordb.NAMES) - {"diamonds-diamonds"}
    post = posteriordb.load("arK-arK")
    assert post.data["y"].shape == (200,) and set(post.reference_mean) >= {"alpha", "beta[5]", "sigma"}
    with pytest.raises(ValueError, match="Unknown posterior"):
        posteriordb.load("radon")
