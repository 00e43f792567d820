"""IVON (Shen et al. 2024, "Variational Learning is Effective for Large Deep Networks";
the ``ivon-opt`` package) as a benchmark method beside ADVI and ProximalScoreVI.

IVON fits a diagonal Gaussian ``N(m, 1 / (ess * (h + delta)))`` by an Adam-cost natural
gradient step: ``h`` is an exponential average (``beta2``) of a reparameterization
(Price) estimate of the loss Hessian's diagonal. It targets the same Bayesian posterior as
the PPL runs when ``ess`` is the training-set size N, the loss is the mini-batch mean
negative log-likelihood and ``delta`` (its ``weight_decay``) is the prior precision over
N; priors other than a zero-mean Gaussian of one precision per parameter group are added
to the loss (divided by N). Budget: ``mc_samples = S`` gradient evaluations per step, the
score calls of S particles, and the same steps and mini-batches as the other methods.

The networks are the PPL models' twins in plain torch (same layers, priors and
initial means), so that the metrics come from the same functions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class IVONSettings:
    """IVON's hyperparameters. The defaults are IVON's published UCI recipe
    (``team-approx-bayes/ivon-experiments``, ``bdl_competition/run_uci.sh``), except
    ``ess`` and ``weight_decay``, which the benchmark sets from N and the prior."""

    lr: float = 0.02
    beta1: float = 0.9
    beta2: float = 0.999
    hess_init: float = 0.5


def make_ivon(groups: list[dict], num_train: int, num_particles: int, settings: IVONSettings):
    import ivon

    return ivon.IVON(
        groups, lr=settings.lr, ess=float(num_train), hess_init=settings.hess_init,
        beta1=settings.beta1, beta2=settings.beta2, mc_samples=num_particles,
    )  # fmt: skip


def train(optimizer, loss_fn, num_train: int, batch: int, steps: int, generator) -> None:
    """``steps`` IVON steps on mini-batches drawn without replacement within each step."""
    for _ in range(steps):
        idx = torch.randperm(num_train, generator=generator)[:batch]
        for _ in range(optimizer.mc_samples):
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                loss_fn(idx).backward()
        optimizer.step()


def draws(optimizer, forward, num_draws: int) -> np.ndarray:
    """``forward()`` at ``num_draws`` draws from IVON's posterior, stacked on axis 0."""
    out = []
    with torch.no_grad():
        for _ in range(num_draws):
            with optimizer.sampled_params():
                out.append(forward().numpy())
    return np.stack(out)


def fit_uci(split, hidden: int, steps: int, seed: int, batch: int, num_particles: int, num_draws: int,
            init: dict[str, np.ndarray], settings: IVONSettings = IVONSettings()):  # fmt: skip
    """The UCI BNN (``bnn_regression``: ReLU hidden layer, N(0, 1) weights, Gamma(6, 6) on the
    noise precision, here through its log, Jacobian included). Returns the predictive means
    (draws x test points) and the precisions (draws,) for ``benchmarks.uci.metrics``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(split.x_train), torch.as_tensor(split.y_train)
    x_test = torch.as_tensor(split.x_test)
    num_train = len(y)
    weights = [torch.nn.Parameter(torch.as_tensor(init[k]).clone()) for k in ("w1", "b1", "w2", "b2")]
    log_precision = torch.nn.Parameter(torch.log(torch.as_tensor(init["precision"])).clone())
    w1, b1, w2, b2 = weights

    def mean(inputs):
        return torch.relu(inputs @ w1 + b1) @ w2 + b2

    def loss(idx):
        residual = y[idx] - mean(x[idx])
        nll = 0.5 * (log_precision.exp() * residual**2 - log_precision).mean()
        # Gamma(6, 6) on exp(log_precision), with the Jacobian: 6 * t - 6 * exp(t).
        log_prior = 6.0 * log_precision - 6.0 * log_precision.exp()
        return nll - log_prior / num_train

    groups = [{"params": weights, "weight_decay": 1.0 / num_train},
              {"params": [log_precision], "weight_decay": 0.0}]  # fmt: skip
    optimizer = make_ivon(groups, num_train, num_particles, settings)
    train(optimizer, loss, num_train, batch, steps, generator)
    both = draws(optimizer, lambda: torch.cat([mean(x_test), log_precision.exp().reshape(1)]), num_draws)
    return both[:, :-1], both[:, -1]


@dataclass(frozen=True)
class Classifier:
    """A torch twin of a PPL classifier: its parameters (started at the PPL run's initial
    means), each one's prior precision (a zero-mean Gaussian) and its logits."""

    params: dict[str, torch.nn.Parameter]
    precisions: dict[str, float]
    logits: Callable[[torch.Tensor], torch.Tensor]


def mlp_classifier(init: dict[str, np.ndarray], prior_scale: float, scale_by_fan_in: bool) -> Classifier:
    """The MNIST MLP (``mlp_classifier``: tanh hidden layer, N(0, prior_scale^2) priors, or
    N(0, prior_scale^2 / fan_in) on the weight matrices)."""
    params = {k: torch.nn.Parameter(torch.tensor(np.array(init[k]))) for k in ("w1", "b1", "w2", "b2")}

    def logits(inputs):
        return torch.tanh(inputs @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

    def precision(name):
        fan_in = params[name].shape[0] if scale_by_fan_in and params[name].dim() > 1 else 1
        return fan_in / prior_scale**2

    return Classifier(params, {name: precision(name) for name in params}, logits)


def cnn_classifier(init: dict[str, np.ndarray]) -> Classifier:
    """The MNIST CNN (``benchmarks.mnist.cnn_classifier``: two 5x5 VALID convolutions with
    8 and 16 ReLU channels, each followed by 2x2 average pooling, then a dense layer;
    ``fan_in_prior()``: N(0, 1 / fan_in) on the kernels, N(0, 1) on the biases), from its
    Flax initial values (kernels ``(kh, kw, in, out)``, flattening in NHWC order)."""
    params = {
        key.split("/")[1]: torch.nn.Parameter(torch.tensor(np.array(value))) for key, value in init.items()
    }

    def conv(images, layer):
        kernel = params[f"PatchConv_{layer}.kernel"].permute(3, 2, 0, 1)  # (out, in, kh, kw)
        return F.avg_pool2d(F.relu(F.conv2d(images, kernel, params[f"PatchConv_{layer}.bias"])), 2)

    def logits(inputs):
        hidden = conv(conv(inputs.reshape(-1, 1, 28, 28), 0), 1)
        flat = hidden.permute(0, 2, 3, 1).reshape(hidden.shape[0], -1)
        return flat @ params["Dense_0.kernel"] + params["Dense_0.bias"]

    precisions = {name: float(np.prod(p.shape[:-1])) if p.dim() > 1 else 1.0 for name, p in params.items()}
    return Classifier(params, precisions, logits)


def fit_classifier(net: Classifier, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, *, steps: int,
                   seed: int, batch: int, num_particles: int, num_draws: int, settings: IVONSettings,
                   curve: tuple[np.ndarray, int, int] | None = None):  # fmt: skip
    """IVON on the classifier ``net`` (softmax likelihood, its priors as weight decay).
    Returns the test class probabilities at ``num_draws`` posterior draws (draws x images
    x classes) and, for ``curve = (inputs, every, draws)``, ``(step, probabilities)``
    every ``every`` steps."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y, x_test = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.long), torch.as_tensor(x_test)
    num_train = len(y)

    def loss(idx):
        return F.cross_entropy(net.logits(x[idx]), y[idx])

    groups = [{"params": [p], "weight_decay": net.precisions[k] / num_train} for k, p in net.params.items()]
    optimizer = make_ivon(groups, num_train, num_particles, settings)

    def probabilities(inputs, count):
        return draws(optimizer, lambda: torch.softmax(net.logits(inputs), -1), count)

    every = curve[1] if curve else steps
    points = []
    for done in range(0, steps, every):
        train(optimizer, loss, num_train, batch, min(every, steps - done), generator)
        if curve:
            points.append((done + every, probabilities(torch.as_tensor(curve[0]), curve[2])))
    return probabilities(x_test, num_draws), points


RESNET_RECIPE = IVONSettings(lr=0.2, beta1=0.9, beta2=0.99999, hess_init=0.5)
"""IVON's published ResNet recipe (``ivon-experiments``, ``bdl_indomain/train_ivon.sh``:
ResNet-20 on CIFAR-10), used with :func:`recipe_schedule`."""


def recipe_schedule(steps: int) -> Callable[[int], float]:
    """The learning-rate factor of IVON's ResNet recipe over ``steps`` steps: a linear
    warm-up from 1/5 over the first 5/200 of the run (its 5 of 200 epochs), then cosine
    annealing to 0."""
    warmup = max(1, round(steps * 5 / 200))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.2 + 0.8 * step / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    return factor


class FlatModuleIVON:
    """IVON on the network of a ``FlatBayesianModule`` (``net``), stepped like an SVI
    engine: ``step(x, y)`` takes one IVON step (``num_particles`` sampled-weight gradients
    on a mini-batch of ``batch`` rows drawn without replacement) on a twin of the network
    started at ``net.initial_weights``, with ``net``'s zero-mean Normal prior per parameter
    tensor as weight decay, and :meth:`posterior` gives IVON's Gaussian as the flat
    ``(loc, scale)`` of ``net``'s weights, so the benchmark can write it into the PPL
    guide and evaluate it with the same code as the other methods."""

    def __init__(self, net, num_train: int, batch: int, num_particles: int, steps: int,
                 settings: IVONSettings = RESNET_RECIPE, seed: int = 0) -> None:  # fmt: skip
        if bool((net.prior_loc != 0).any()):
            raise ValueError("IVON's weight decay is a zero-mean Gaussian prior; this prior has a mean")
        self.twin = copy.deepcopy(net.module)
        initial, params = net.unflatten(net.initial_weights), dict(self.twin.named_parameters())
        if list(params) != net.param_names:
            raise ValueError("the twin's parameters are not in the order of net's flat weights")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(initial[name])
                param.requires_grad_(True)
        groups = []
        for param, scale in zip(params.values(), torch.split(net.prior_scale, net.sizes), strict=True):
            if not bool((scale == scale[0]).all()):
                raise ValueError("IVON's weight decay is one prior precision per parameter tensor")
            groups.append({"params": [param], "weight_decay": float(scale[0]) ** -2 / num_train})
        self.optimizer = make_ivon(groups, num_train, num_particles, settings)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, recipe_schedule(steps))
        self.num_train, self.batch = num_train, batch
        self.generator = torch.Generator().manual_seed(seed)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        def loss(idx):
            return F.cross_entropy(self.twin(x[idx]), y[idx])

        train(self.optimizer, loss, self.num_train, self.batch, 1, self.generator)
        self.scheduler.step()

    def posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """IVON's flat mean and sd, in the order of ``net``'s flat weights."""
        loc = torch.cat([param.detach().reshape(-1) for param in self.twin.parameters()])
        scale = torch.cat([(group["ess"] * (group["hess"] + group["weight_decay"])).rsqrt()
                           for group in self.optimizer.param_groups])  # fmt: skip
        return loc, scale
