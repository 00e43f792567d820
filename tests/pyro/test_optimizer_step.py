"""The inner loop's grouped Adam step is PyroOptim's own step, to the bit."""

import pyro
import pyro.optim
import pytest
import torch

from pyro_psvi._compat import grouped_optimizer_step


def _params() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 2), "d": ()}
    return [
        pyro.param(name, torch.randn(shape, generator=generator)).unconstrained()
        for name, shape in shapes.items()
    ]


def _run(make_optim, step, num_steps: int = 6) -> list[torch.Tensor]:
    pyro.clear_param_store()
    params = _params()
    optim = make_optim()
    for t in range(num_steps):
        for i, param in enumerate(params):
            param.grad = torch.sin(param.detach() * (i + 1) + t)  # a deterministic gradient
        step(optim, params)
    return [param.detach().clone() for param in params]


def per_param(name: str) -> dict:
    # Different settings per param: three groups, with amsgrad and weight decay, with
    # decoupled weight decay (AdamW's), and plain.
    if name in ("a", "c"):
        return {"lr": 0.05, "betas": (0.8, 0.99), "amsgrad": True, "weight_decay": 0.1}
    if name == "b":
        return {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}
    return {"lr": 0.01}


@pytest.mark.parametrize(
    "make_optim",
    [
        lambda: pyro.optim.Adam({"lr": 0.02}),
        lambda: pyro.optim.Adam(per_param),
        lambda: pyro.optim.Adam({"lr": 0.02}, clip_args={"clip_norm": 0.5}),
        lambda: pyro.optim.ClippedAdam({"lr": 0.02}),
        lambda: pyro.optim.SGD({"lr": 0.02, "momentum": 0.9}),
    ],
    ids=["adam", "adam-per-param", "adam-clipped", "clipped-adam", "sgd"],
)
def test_grouped_step_equals_pyro_optims_step(make_optim):
    # The first step starts each param's state through PyroOptim itself; later Adam steps
    # go through torch's multi-tensor Adam (clipped params and other optimizers do not).
    grouped = _run(make_optim, grouped_optimizer_step)
    own = _run(make_optim, lambda optim, params: optim(params))
    for mine, theirs in zip(grouped, own, strict=True):
        assert torch.equal(mine, theirs)
    pyro.clear_param_store()
    assert not torch.equal(grouped[0], _params()[0])  # the params moved


def test_adam_params_take_the_grouped_path_after_their_first_step(monkeypatch):
    calls = []
    own_step = torch.optim.Adam.step
    monkeypatch.setattr(
        torch.optim.Adam, "step", lambda self, *a, **k: calls.append(1) or own_step(self, *a, **k)
    )
    _run(lambda: pyro.optim.Adam({"lr": 0.02}), grouped_optimizer_step, num_steps=6)
    assert len(calls) == 4  # the four params' first steps only
