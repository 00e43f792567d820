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


def fit_mlp_classifier(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, init: dict[str, np.ndarray],
                       *, prior_scale: float, scale_by_fan_in: bool, steps: int, seed: int, batch: int,
                       num_particles: int, num_draws: int, settings: IVONSettings,
                       curve: tuple[np.ndarray, int, int] | None = None):  # fmt: skip
    """The MNIST MLP (``mlp_classifier``: tanh hidden layer, N(0, prior_scale^2) priors, or
    N(0, prior_scale^2 / fan_in) on the weight matrices). Returns the test class
    probabilities at ``num_draws`` posterior draws (draws x images x classes) and, for
    ``curve = (inputs, every, draws)``, ``(step, probabilities)`` every ``every`` steps."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x, y, x_test = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.long), torch.as_tensor(x_test)
    num_train = len(y)
    params = {k: torch.nn.Parameter(torch.tensor(np.array(init[k]))) for k in ("w1", "b1", "w2", "b2")}

    def logits(inputs):
        return torch.tanh(inputs @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

    def loss(idx):
        return F.cross_entropy(logits(x[idx]), y[idx])

    def precision(name):
        fan_in = params[name].shape[0] if scale_by_fan_in and params[name].dim() > 1 else 1
        return fan_in / prior_scale**2

    groups = [{"params": [p], "weight_decay": precision(k) / num_train} for k, p in params.items()]
    optimizer = make_ivon(groups, num_train, num_particles, settings)

    def probabilities(inputs, count):
        return draws(optimizer, lambda: torch.softmax(logits(inputs), -1), count)

    every = curve[1] if curve else steps
    points = []
    for done in range(0, steps, every):
        train(optimizer, loss, num_train, batch, min(every, steps - done), generator)
        if curve:
            points.append((done + every, probabilities(torch.as_tensor(curve[0]), curve[2])))
    return probabilities(x_test, num_draws), points
