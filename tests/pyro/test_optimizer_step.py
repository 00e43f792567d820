"""The inner loop's flat Adam steps are PyroOptim's own steps, to the bit."""

import pyro
import pyro.optim
import pytest
import torch

from pyro_psvi._compat import FlatAdamSteps


def _params() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 4), "b": (5,), "c": (2, 2), "d": ()}
    return [
        pyro.param(name, torch.randn(shape, generator=generator)).unconstrained()
        for name, shape in shapes.items()
    ]


def _gradient(param: torch.Tensor, i: int, t: int) -> torch.Tensor:
    return torch.sin(param.detach() * (i + 1) + t)  # deterministic, and read at the current value


def _own_steps(optim, params, updates: int, inner_steps: int) -> None:
    for t in range(updates * inner_steps):
        for i, param in enumerate(params):
            param.grad = _gradient(param, i, t)
        optim(params)


def _flat_steps(optim, params, updates: int, inner_steps: int, in_place=()) -> None:
    t = 0
    for _ in range(updates):
        with FlatAdamSteps(optim, params, in_place) as steps:
            for _ in range(inner_steps):
                assert all(steps.values[i] is params[i] for i in in_place)
                steps.step([_gradient(value, i, t) for i, value in enumerate(steps.values)])
                t += 1


def _run(make_optim, steps, updates: int = 3, inner_steps: int = 4):
    pyro.clear_param_store()
    params = _params()
    optim = make_optim()
    steps(optim, params, updates, inner_steps)
    values = [param.detach().clone() for param in params]
    return values, optim.get_state()


def per_param(name: str) -> dict:
    # Different settings per param: three groups, with amsgrad and weight decay, with
    # decoupled weight decay (AdamW's), and plain.
    if name in ("a", "c"):
        return {"lr": 0.05, "betas": (0.8, 0.99), "amsgrad": True, "weight_decay": 0.1}
    if name == "b":
        return {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True}
    return {"lr": 0.01, "maximize": True}


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
def test_flat_steps_equal_pyro_optims_steps(make_optim):
    # The first update starts each param's state through PyroOptim itself; later updates
    # step plain Adams on flat copies (clipped params and other optimizers do not).
    flat, flat_state = _run(make_optim, _flat_steps)
    own, own_state = _run(make_optim, _own_steps)
    for mine, theirs in zip(flat, own, strict=True):
        assert torch.equal(mine, theirs)
    for name, state in own_state.items():  # moments and step counts
        for key, value in state["state"][0].items():
            mine = flat_state[name]["state"][0][key]
            assert torch.equal(torch.as_tensor(mine), torch.as_tensor(value)), (name, key)
    pyro.clear_param_store()
    assert not torch.equal(flat[0], _params()[0])  # the params moved


def test_params_read_in_place_take_each_step_at_once():
    # A pyro.module's parameters are read where they are: every step updates them.
    flat, _ = _run(lambda: pyro.optim.Adam({"lr": 0.02}),
                   lambda *a: _flat_steps(*a, in_place=(0, 2)))  # fmt: skip
    own, _ = _run(lambda: pyro.optim.Adam({"lr": 0.02}), _own_steps)
    for mine, theirs in zip(flat, own, strict=True):
        assert torch.equal(mine, theirs)


def test_adam_params_take_the_flat_path_after_their_first_update(monkeypatch):
    calls = []
    own_step = torch.optim.Adam.step
    monkeypatch.setattr(
        torch.optim.Adam, "step", lambda self, *a, **k: calls.append(1) or own_step(self, *a, **k)
    )
    _run(lambda: pyro.optim.Adam({"lr": 0.02}), _flat_steps, updates=3, inner_steps=4)
    assert len(calls) == 4 * 4  # the four params' steps in the first update only


def test_params_and_moments_are_untouched_until_the_block_ends():
    pyro.clear_param_store()
    params = _params()
    optim = pyro.optim.Adam({"lr": 0.02})
    _own_steps(optim, params, updates=1, inner_steps=1)  # start the states
    before = [param.detach().clone() for param in params]
    with pytest.raises(KeyboardInterrupt), FlatAdamSteps(optim, params) as steps:
        steps.step([torch.ones_like(value) for value in steps.values])
        assert not torch.equal(steps.values[0], before[0])
        raise KeyboardInterrupt
    for param, old in zip(params, before, strict=True):
        assert torch.equal(param, old)
    assert all(state["state"][0]["step"] == 1 for state in optim.get_state().values())
