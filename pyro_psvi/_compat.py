"""Every use of a private Pyro or torch internal, in one place.

Tested with the Pyro and torch versions that ``pyproject.toml`` allows; a release that
renames one of these breaks only this module.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pyro.infer import autoguide
from pyro.optim import PyroOptim
from pyro.optim.optim import _get_state_dict, _load_state_dict
from pyro.poutine.subsample_messenger import _Subsample as Subsample
from torch.distributions import Transform
from torch.optim.adam import adam as functional_adam

__all__ = [
    "Subsample",
    "forget_optimizers",
    "grouped_optimizer_step",
    "inverse",
    "is_block_autoregressive",
    "load_optimizer_states",
    "optimizer_states",
    "param_prefix",
    "tensor_version",
    "torch_optimizer",
]


def param_prefix(guide: autoguide.AutoGuide) -> str:
    """The prefix of an autoguide's param-store names (``"AutoNormal"`` by default)."""
    return guide._pyro_name


def inverse(transform: Transform, y: torch.Tensor) -> torch.Tensor:
    """``transform``'s inverse at ``y``, computed afresh: ``Transform.inv`` would return a
    cached inverse, stale once the transform's params have changed."""
    return transform._inverse(y)


def tensor_version(tensor: torch.Tensor) -> int:
    """torch's counter of in-place changes to ``tensor``."""
    return tensor._version


def torch_optimizer(optim: PyroOptim, param: torch.Tensor) -> torch.optim.Optimizer | None:
    """The torch optimizer ``optim`` keeps for ``param`` (``None`` before its first step);
    for an LR scheduler, the optimizer it wraps."""
    optimizer = optim.optim_objs.get(param)
    return getattr(optimizer, "optimizer", optimizer)


def forget_optimizers(optim: PyroOptim, params: Iterable[torch.Tensor]) -> None:
    """Drop the torch optimizers ``optim`` keeps for ``params`` (their tensors are being
    replaced; the new tensors' optimizers start from ``optim.set_state``)."""
    for param in params:
        optim.optim_objs.pop(param, None)


def optimizer_states(optim: PyroOptim, params: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The state dicts of the torch optimizers ``optim`` keeps for ``params``, keyed by
    our names for them (``PyroOptim.get_state`` keys by param-store name, which
    module-local params do not have)."""
    return {name: _get_state_dict(optim.optim_objs[p]) for name, p in params.items() if p in optim.optim_objs}


def load_optimizer_states(optim: PyroOptim, params: dict[str, torch.Tensor], states: dict[str, dict]) -> None:
    """Give each of ``params`` named in ``states`` a torch optimizer holding that state,
    as ``PyroOptim`` builds one at a param's first step."""
    for name, state in states.items():
        param = params[name]
        optimizer = optim.optim_objs[param] = optim._get_optim(param)
        optim.grad_clip[param] = optim._get_grad_clip(param)
        _load_state_dict(optimizer, state)


def grouped_optimizer_step(optim: PyroOptim, params: list[torch.Tensor]) -> None:
    """``optim(params)``, with the params whose torch optimizer is a plain
    ``torch.optim.Adam`` stepped together: one multi-tensor (``foreach``) call of torch's
    functional Adam per set of hyperparameters, instead of one ``Adam.step`` per param,
    whose Python overhead is most of a small network's inner step. Such a param needs a
    started state (after its first step), a gradient, a real dtype, no gradient clipping
    and none of Adam's ``capturable``, ``differentiable`` or ``fused`` options; the
    others, and every optimizer other than ``PyroOptim``'s Adam (schedulers included),
    take ``optim``'s own step. Optimizer step hooks are not run for the grouped params."""
    groups: dict[tuple, list[tuple[torch.Tensor, dict]]] = {}
    rest = []
    for param in params:
        adam = optim.optim_objs.get(param) if type(optim) is PyroOptim else None
        state = adam.state.get(param) if type(adam) is torch.optim.Adam else None
        group = adam.param_groups[0] if state else None
        if (
            not state
            or param.grad is None
            or param.grad.is_sparse
            or torch.is_complex(param)
            or optim.grad_clip.get(param) is not None
            or group.get("capturable")
            or group.get("differentiable")
            or group.get("fused")
        ):
            rest.append(param)
            continue
        settings = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")
        key = (*(group.get(name) for name in settings), param.device, param.dtype)
        groups.setdefault(key, []).append((param, state))
    if rest:
        optim(rest)
    for (lr, (beta1, beta2), eps, weight_decay, amsgrad, maximize, decoupled, *_), members in groups.items():
        with torch.no_grad():
            functional_adam(
                [param for param, _ in members],
                [param.grad for param, _ in members],
                [state["exp_avg"] for _, state in members],
                [state["exp_avg_sq"] for _, state in members],
                [state["max_exp_avg_sq"] for _, state in members] if amsgrad else [],
                [state["step"] for _, state in members],
                foreach=True,
                # Only where set: older torch releases have neither the argument nor the setting.
                **({"decoupled_weight_decay": True} if decoupled else {}),
                amsgrad=amsgrad,
                beta1=beta1,
                beta2=beta2,
                lr=lr,
                weight_decay=weight_decay,
                eps=eps,
                maximize=maximize,
            )


def is_block_autoregressive(guide: autoguide.AutoNormalizingFlow) -> bool:
    """Whether a flow guide was built from block-autoregressive layers (they have no
    inverse); Pyro keeps only the factory it was given, so its name is matched."""
    factory = repr(getattr(guide, "_init_transform_fn", None))
    return "block_autoregressive" in factory or "BlockAutoregressive" in factory
