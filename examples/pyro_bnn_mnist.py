"""A Bayesian MLP classifier on MNIST in Pyro: ``FlatBayesianModule``, SVI against
ProximalScoreVI at equal score calls.

A plain ``torch.nn`` MLP (784-100-10) made Bayesian with ``FlatBayesianModule`` (one
flat weight vector, ``N(0, 1/fan_in)`` priors), the likelihood ``module_classifier``
with mini-batches from the model's subsampled plate, an ``AutoNormal`` guide started at
the network's initial weights; both engines take the same steps with 4 particles and
the user's ``Adam(1e-3)``. Prints test accuracy, NLL and ECE of the posterior
predictive (50 draws).

MNIST is read from ``mnist.npz`` in ``--data`` (or ``$PSVI_MNIST``); ``--download``
fetches it with torchvision.

    python examples/pyro_bnn_mnist.py --data DIR [--steps 3000] [--train 20000] [--quick]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal, init_to_value

from psvi.contrib.datasets import load_mnist
from psvi.metrics import classification_report
from pyro_psvi import ProximalScoreVI
from pyro_psvi.contrib.models import FlatBayesianModule, fan_in_prior, module_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder holding mnist.npz")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--train", type=int, default=20000, help="training images")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="600 steps on 5000 images")
    args = parser.parse_args()
    steps, num_train = (600, 5000) if args.quick else (args.steps, args.train)
    torch.set_num_threads(2)

    data = load_mnist(num_train=num_train, root=args.data, download=args.download)
    x, y, x_test, y_test = (torch.as_tensor(a) for a in data)
    for name in ("SVI", "ProximalScoreVI"):
        pyro.clear_param_store()
        torch.manual_seed(0)
        net = FlatBayesianModule(
            torch.nn.Sequential(torch.nn.Linear(784, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10)),
            fan_in_prior(),
        )
        model = partial(module_classifier, net, subsample_size=args.batch)
        guide = AutoNormal(
            model, init_loc_fn=init_to_value(values={"weights": net.initial_weights}), init_scale=0.01
        )
        optim = pyro.optim.Adam({"lr": 1e-3})
        if name == "SVI":
            engine = SVI(model, guide, optim, Trace_ELBO(num_particles=4))
        else:  # FlatBayesianModule runs one particle per forward pass, as S SGD steps would
            engine = ProximalScoreVI(model, guide, optim, num_particles=4, vectorize_particles=False)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step(x, y)
        seconds = time.perf_counter() - start
        predictive = Predictive(
            partial(module_classifier, net), guide=guide, num_samples=50, return_sites=["probs"]
        )
        with torch.no_grad():
            probs = predictive(x_test)["probs"].numpy()
        report = classification_report(probs, y_test.numpy())
        print(
            f"{name:16s} {steps} steps, {4 * steps} score calls, {seconds:5.1f} s: accuracy "
            f"{report['accuracy']:.4f}, NLL {report['nll']:.4f}, ECE {report['ece']:.4f}"
        )
        median_sd = np.median(guide.scales.weights.detach().numpy())
        print(f"{'':16s} median posterior sd of the weights {median_sd:.4f}")


if __name__ == "__main__":
    main()
