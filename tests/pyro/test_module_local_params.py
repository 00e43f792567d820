"""``pyro.settings.set(module_local_params=True)``: params live in their modules (no
param store), and the engine fits, checkpoints and exports them exactly as it does
param-store params."""

from __future__ import annotations

import pyro
import pyro.distributions as pdist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam, PyroSample

import pyro_psvi

pytestmark = pytest.mark.usefixtures("fresh_pyro")


class Regression(PyroModule):
    """A subsampled linear regression with a sampled weight, a point-estimated offset
    (a plain ``nn.Parameter``) and a point-estimated noise scale (a ``PyroParam``)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = PyroSample(pdist.Normal(0.0, 1.0).expand([3]).to_event(1))
        self.offset = torch.nn.Parameter(torch.zeros(()))
        self.noise = PyroParam(torch.tensor(1.0), constraint=pdist.constraints.positive)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        weight, offset, noise = self.weight, self.offset, self.noise
        with pyro.plate("data", x.shape[0], subsample_size=20) as idx:
            mean = (x[idx] * weight).sum(-1) + offset
            pyro.sample("y", pdist.Normal(mean, noise), obs=y[idx])


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(100, 3, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.7 + 0.3 * torch.randn(100, generator=generator)
    return x, y


def _fit(module_local: bool, num_steps: int = 8):
    """Model, guide and engine built under the setting, then ``num_steps`` steps from seed 0."""
    with pyro.settings.context(module_local_params=module_local):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = Regression()
        guide = AutoNormal(model)
        engine = pyro_psvi.ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 0.05}), num_particles=4)
        losses = [engine.step(*_data()) for _ in range(num_steps)]
    return model, guide, engine, losses


def _values(model: Regression, guide: AutoNormal) -> dict[str, torch.Tensor]:
    """Every fitted value as the modules hold it (outside a run they read their own tensors)."""
    return {
        "loc": guide.locs.weight.detach().clone(),
        "scale": guide.scales.weight.detach().clone(),
        "offset": model.offset.detach().clone(),
        "noise": model.noise.detach().clone(),
    }


def test_module_local_params_take_the_same_steps_as_the_param_store():
    # Same seed, same model: the only difference is where the params live, so every
    # value must match bit for bit.
    model, guide, _, losses = _fit(module_local=False)
    expected = _values(model, guide)
    model, guide, _, local_losses = _fit(module_local=True)
    assert len(pyro.get_param_store()) == 0  # nothing went through the global store
    assert local_losses == losses
    for name, value in _values(model, guide).items():
        assert torch.equal(value, expected[name]), name
    assert not torch.equal(expected["offset"], torch.zeros(())), "the model params moved"


def test_two_module_local_fits_do_not_share_params():
    # The store would give a second AutoNormal on the same site names the first one's
    # params; module-local params are each module's own.
    model, guide, _, _ = _fit(module_local=True)
    fitted = _values(model, guide)
    with pyro.settings.context(module_local_params=True):
        fresh = AutoNormal(Regression())
        fresh(*_data())
        assert not torch.equal(fresh.locs.weight.detach(), fitted["loc"])


def test_module_local_checkpoint_resumes_exactly(tmp_path):
    model, guide, engine, _ = _fit(module_local=True, num_steps=5)
    engine.save(tmp_path / "ckpt")
    with pyro.settings.context(module_local_params=True):
        for _ in range(4):
            engine.step(*_data())
        expected = _values(model, guide)
        # A new process's view: fresh modules, their own (different) initial values.
        pyro.set_rng_seed(123)
        model = Regression()
        guide = AutoNormal(model)
        resumed = pyro_psvi.ProximalScoreVI(model, guide, pyro.optim.Adam({"lr": 0.05}), num_particles=4)
        resumed.load(tmp_path / "ckpt")
        for _ in range(4):
            resumed.step(*_data())
    for name, value in _values(model, guide).items():
        assert torch.equal(value, expected[name]), name
    assert resumed.num_score_calls == engine.num_score_calls


def test_module_local_load_refuses_another_device_by_name_and_loses_nothing(tmp_path):
    model, guide, _, _ = _fit(module_local=True, num_steps=3)
    expected = _values(model, guide)
    model, guide, engine, _ = _fit(module_local=True, num_steps=2)
    engine.save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"module_local_params.*\.to\('meta'\)"):
        engine.load(tmp_path / "ckpt", map_location="meta")
    with pyro.settings.context(module_local_params=True):
        engine.step(*_data())  # the third step, from the untouched params and Adam moments
    for name, value in _values(model, guide).items():
        assert torch.equal(value, expected[name]), name


def test_module_local_guides_export_to_arviz():
    pytest.importorskip("arviz")
    from pyro_psvi.arviz import vi_diagnostics

    x, y = _data()
    model, guide, _, _ = _fit(module_local=False)
    pyro.set_rng_seed(1)
    expected = vi_diagnostics(model, guide, x, y, num_samples=50)
    model, guide, _, _ = _fit(module_local=True)
    with pyro.settings.context(module_local_params=True):
        pyro.set_rng_seed(1)
        assert vi_diagnostics(model, guide, x, y, num_samples=50) == expected
