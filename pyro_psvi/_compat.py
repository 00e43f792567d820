"""Every use of a private Pyro or torch internal, in one place.

Tested with the Pyro and torch versions that ``pyproject.toml`` allows; a release that
renames one of these breaks only this module.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable
from typing import Any, NamedTuple

import torch
from pyro.infer import autoguide
from pyro.optim import PyroOptim
from pyro.optim.optim import _get_state_dict, _load_state_dict
from pyro.poutine.subsample_messenger import _Subsample as Subsample
from torch.distributions import Transform

__all__ = [
    "DenseGaussianLayout",
    "FlatAdamSteps",
    "apply",
    "dense_gaussian_layout",
    "Subsample",
    "forget_optimizers",
    "inverse",
    "is_block_autoregressive",
    "load_optimizer_states",
    "optimizer_states",
    "param_prefix",
    "StructuredLayout",
    "structured_layout",
    "tensor_version",
    "torch_optimizer",
]


class DenseGaussianLayout(NamedTuple):
    """How ``AutoGaussianDense`` assembles its joint Gaussian over the flat auxiliary
    latent from per-factor params (read from its ``_setup_prototype``).

    Attributes
    ----------
    site_shapes : dict
        ``{latent site: (batch_shape, event_shape)}`` in flat-vector order.
    size : int
        Length of the flat latent.
    scatter : dict
        ``{factor site: (info_index, precision_index)}``: where each factor's
        ``prec_sqrt @ white_vec`` and ``prec_sqrt @ prec_sqrt'`` entries add into the
        flat information vector and the flattened ``(size, size)`` precision.
    """

    site_shapes: dict[str, tuple[torch.Size, torch.Size]]
    size: int
    scatter: dict[str, tuple[torch.Tensor, torch.Tensor]]


def dense_gaussian_layout(guide: autoguide.AutoGaussian) -> DenseGaussianLayout:
    """The :class:`DenseGaussianLayout` of a set-up ``AutoGaussianDense``."""
    return DenseGaussianLayout(dict(guide._dense_shapes), guide._dense_size, dict(guide._dense_scatter))


class StructuredLayout(NamedTuple):
    """What ``AutoStructured`` fixed at set-up: its latent sites in sampling order, each
    one's ``(batch_shape, unconstrained event_shape)``, conditional and upstream sites."""

    site_shapes: dict[str, tuple[torch.Size, torch.Size]]
    conditionals: dict[str, Any]
    dependencies: dict[str, dict[str, Any]]


def structured_layout(guide: autoguide.AutoStructured) -> StructuredLayout:
    """The :class:`StructuredLayout` of a set-up ``AutoStructured``."""
    order = [name for name, _ in guide._sorted_sites]
    shapes = {name: (guide._batch_shapes[name], guide._unconstrained_event_shapes[name]) for name in order}
    return StructuredLayout(shapes, dict(guide.conditionals), dict(guide.dependencies))


def param_prefix(guide: autoguide.AutoGuide) -> str:
    """The prefix of an autoguide's param-store names (``"AutoNormal"`` by default)."""
    return guide._pyro_name


def inverse(transform: Transform, y: torch.Tensor) -> torch.Tensor:
    """``transform``'s inverse at ``y``, computed afresh: ``Transform.inv`` would return a
    cached inverse, stale once the transform's params have changed."""
    return transform._inverse(y)


def apply(transform: Transform, x: torch.Tensor) -> torch.Tensor:
    """``transform`` at ``x``, computed afresh: ``Transform.__call__`` returns its cached
    value for the tensor it was last called with, stale once the params have changed."""
    return transform._call(x)


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


_ADAM_SETTINGS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")


class _FlatAdamGroup:
    """Params sharing one plain ``torch.optim.Adam`` setting and step count, with their
    values and Adam moments concatenated into flat tensors (one op per Adam stage)."""

    def __init__(self, settings: dict, members: list[tuple[torch.Tensor, dict]], in_place: list[int]) -> None:
        self.settings = settings
        self.params = [param for param, _ in members]
        self.states = [state for _, state in members]
        self.in_place = in_place
        keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if settings["amsgrad"] else [])
        with torch.no_grad():
            self.flat = {"param": torch.cat([param.detach().reshape(-1) for param in self.params])}
            self.flat.update({key: torch.cat([s[key].reshape(-1) for s in self.states]) for key in keys})
            self.step_count = self.states[0]["step"].clone()
            # Reused by every step: a fresh buffer of this size costs more than the op. The
            # gradient's is made by the first :meth:`step` (:meth:`step_flat` is given one).
            self.grad, self.denom = None, torch.empty_like(self.flat["param"])
        sizes = [param.numel() for param in self.params]
        self.views = {
            key: [part.view(param.shape) for part, param in zip(flat.split(sizes), self.params, strict=True)]
            for key, flat in self.flat.items()
        }
        for view in self.views["param"]:
            view.requires_grad_(True)

    def step(self, grads: list[torch.Tensor]) -> None:
        """torch's Adam (``_single_tensor_adam``'s and ``_multi_tensor_adam``'s
        arithmetic, op for op) on the flat tensors."""
        with torch.no_grad():
            if self.grad is None:
                self.grad = torch.empty_like(self.flat["param"])
            self.step_flat(torch.cat([grad.reshape(-1) for grad in grads], out=self.grad))

    def step_flat(self, grad: torch.Tensor) -> None:
        """:meth:`step` with the gradients concatenated in the flat tensor's layout."""
        lr, (beta1, beta2), eps, weight_decay, amsgrad, maximize, decoupled = (
            self.settings[name] for name in _ADAM_SETTINGS
        )
        flat = self.flat
        with torch.no_grad():
            if maximize:
                grad = -grad
            self.step_count.add_(1.0)
            if weight_decay != 0:
                if decoupled:
                    flat["param"].mul_(1 - lr * weight_decay)
                else:
                    grad = grad.add(flat["param"], alpha=weight_decay)
            flat["exp_avg"].lerp_(grad, 1 - beta1)
            flat["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = self.step_count.item()
            second = flat["exp_avg_sq"]
            if amsgrad:
                second = torch.maximum(flat["max_exp_avg_sq"], second, out=flat["max_exp_avg_sq"])
            denom = torch.sqrt(second, out=self.denom).div_((1 - beta2**step) ** 0.5).add_(eps)
            flat["param"].addcdiv_(flat["exp_avg"], denom, value=(lr / (1 - beta1**step)) * -1)
            if self.in_place:
                torch._foreach_copy_([self.params[j] for j in self.in_place],
                                     [self.views["param"][j] for j in self.in_place])  # fmt: skip

    def write_back(self, moments: bool = True) -> None:
        """Copy the flat values, and with ``moments`` the moments, into the params and
        their Adam states; without, free the flat values (the moments wait for
        :meth:`replace_moments`)."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.views["param"])
            if moments:
                for key, views in self.views.items():
                    if key != "param":
                        torch._foreach_copy_([state[key] for state in self.states], views)
                for state in self.states:
                    state["step"].copy_(self.step_count)
            else:
                del self.flat["param"], self.views["param"]
                self.grad = self.denom = None

    def replace_moments(self, keep: torch.Tensor, replaced: list[tuple[dict, str, torch.Tensor]]) -> None:
        """Give the Adam states new moment and step-count tensors: the flat ones where the
        0-dim ``keep`` holds, else equal to their own; each ``(state, key, old tensor)``
        goes to ``replaced`` as it is made (to undo them), and each flat moment is freed
        once written."""
        accepted = keep.device.type == "cpu" and bool(keep)  # read at once on a CPU
        with torch.no_grad():
            for key in [key for key in self.flat if key != "param"]:
                views = self.views.pop(key)
                for state, view in zip(self.states, views, strict=True):
                    old = state[key]
                    state[key] = view.clone() if accepted else torch.where(keep, view, old)
                    replaced.append((state, key, old))
                del views, self.flat[key]
            for state in self.states:
                old = state["step"]
                new = (
                    self.step_count.clone()
                    if accepted
                    else torch.where(keep.to(old.device), self.step_count, old)
                )
                state["step"] = new
                replaced.append((state, "step", old))

    def moments(self) -> list[torch.Tensor]:
        """The flat moments (not yet written when deferred)."""
        return [flat for key, flat in self.flat.items() if key != "param"]


def flat_adam_state(optim: PyroOptim, param: torch.Tensor) -> dict | None:
    """The Adam state :class:`FlatAdamSteps` steps ``param`` with on flat copies (a plain,
    started ``torch.optim.Adam`` of a dense real param, no clipping, none of
    ``capturable``, ``differentiable`` or ``fused``); ``None`` when it takes ``optim``'s
    own step."""
    adam = optim.optim_objs.get(param) if type(optim) is PyroOptim else None
    state = adam.state.get(param) if type(adam) is torch.optim.Adam else None
    if (
        not state
        or param.is_sparse
        or torch.is_complex(param)
        or optim.grad_clip.get(param) is not None
        or any(adam.param_groups[0].get(name) for name in ("capturable", "differentiable", "fused"))
    ):
        return None
    return state


class FlatAdamSteps:
    """Repeated steps of ``optim`` on ``params``, those whose torch optimizer is a plain,
    started ``torch.optim.Adam`` (a real dense param, no clipping, none of ``capturable``,
    ``differentiable`` or ``fused``) stepped on flat copies: one op per Adam stage for
    each set of settings and step count, where ``PyroOptim`` makes one Python-level
    ``Adam.step`` per param. The others (first steps, clipped params, other optimizers,
    schedulers) take ``optim``'s own step, in place. Bit-identical to ``optim``'s steps.

    Read and differentiate :attr:`values` (views of the flat copies, or the params
    themselves), give :meth:`step` their gradients, and leave the ``with`` block to copy
    the flat values and moments back into the params and ``optim``'s states; an exception
    inside it skips the copy. The flat params at the positions ``in_place`` (read where
    they are, e.g. a ``pyro.module``'s own parameters) are copied back at every step.
    With ``defer_moments`` the block copies back the values only: :meth:`write_moments`
    then gives the flat params' Adam states their moments (and nothing else, the states
    of the others having been stepped in place) and :meth:`undo_moments` takes them
    back, so the caller needs no copy of those states to undo a step.
    Optimizer step hooks do not run for flat params.
    """

    def __init__(
        self,
        optim: PyroOptim,
        params: list[torch.Tensor],
        in_place: Collection[int] = (),
        defer_moments: bool = False,
    ) -> None:
        members: dict[tuple, list[tuple[torch.Tensor, dict]]] = {}
        self.values = list(params)
        self._rest: list[int] = []
        self._defer_moments = defer_moments
        self._replaced: list[tuple[dict, str, torch.Tensor]] = []
        for i, param in enumerate(params):
            state = flat_adam_state(optim, param)
            if state is None:
                self._rest.append(i)
                continue
            settings = optim.optim_objs[param].param_groups[0]
            key = (*(settings.get(name) for name in _ADAM_SETTINGS), param.device, param.dtype,
                   state["step"].item())  # fmt: skip
            members.setdefault(key, []).append((i, param, state))
        self._groups = []
        for key, group in members.items():
            positions = [i for i, _, _ in group]
            flat = _FlatAdamGroup(
                dict(zip(_ADAM_SETTINGS, key, strict=False)),
                [(param, state) for _, param, state in group],
                [j for j, i in enumerate(positions) if i in in_place],
            )
            for i, view in zip(positions, flat.views["param"], strict=True):
                if i not in in_place:
                    self.values[i] = view
            self._groups.append((positions, flat))
        self._optim = optim
        self._params = params

    def flat_layout(self) -> tuple[torch.Tensor, list[int]] | None:
        """The flat tensor of the params' values and each param's offset in it, when all
        of them are stepped as one flat tensor (:meth:`step_flat`); else ``None``."""
        if self._rest or len(self._groups) != 1:
            return None
        positions, flat = self._groups[0]
        offsets = [0] * len(positions)
        starts = itertools.accumulate((param.numel() for param in flat.params), initial=0)
        for i, start in zip(positions, starts, strict=False):  # starts has one more
            offsets[i] = start
        return flat.flat["param"], offsets

    def step_flat(self, grad: torch.Tensor) -> None:
        """One step with the gradients in :meth:`flat_layout`'s layout."""
        self._groups[0][1].step_flat(grad)

    def step(self, grads: list[torch.Tensor]) -> None:
        """One step with ``grads``, aligned with :attr:`values`."""
        for positions, flat in self._groups:
            flat.step([grads[i] for i in positions])
        if self._rest:
            rest = [self._params[i] for i in self._rest]
            for i, param in zip(self._rest, rest, strict=True):
                param.grad = grads[i]
            self._optim(rest)
            for param in rest:
                param.grad = None

    def __enter__(self) -> FlatAdamSteps:
        return self

    def __exit__(self, error_type: type | None, *_: Any) -> None:
        if error_type is None:
            for _, flat in self._groups:
                flat.write_back(moments=not self._defer_moments)

    def moments(self) -> list[torch.Tensor]:
        """The flat params' moments, written back or (``defer_moments``) not yet."""
        return [moment for _, flat in self._groups for moment in flat.moments()]

    def write_moments(self, keep: torch.Tensor) -> None:
        """With ``defer_moments``, after the block: give the flat params' Adam states
        their stepped moments and step counts where the 0-dim ``keep`` holds (new tensors;
        the old ones are kept for :meth:`undo_moments` while this object lives)."""
        for _, flat in self._groups:
            flat.replace_moments(keep, self._replaced)

    def undo_moments(self) -> None:
        """Put back the Adam states' tensors :meth:`write_moments` replaced (all of them,
        also after an interrupt inside it)."""
        for state, key, old in reversed(self._replaced):
            state[key] = old
        self._replaced = []


def is_block_autoregressive(guide: autoguide.AutoNormalizingFlow) -> bool:
    """Whether a flow guide was built from block-autoregressive layers (they have no
    inverse); Pyro keeps only the factory it was given, so its name is matched."""
    factory = repr(getattr(guide, "_init_transform_fn", None))
    return "block_autoregressive" in factory or "BlockAutoregressive" in factory
