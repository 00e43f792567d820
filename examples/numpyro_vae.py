"""A variational autoencoder in NumPyro, fitted with SVI and with ProximalScoreVI.

NumPyro's ``examples/vae.py`` on scikit-learn's binarized 8x8 digits (shipped with
scikit-learn, nothing to download): a ``stax`` decoder in the model (its weights are a
``numpyro.module``, learned jointly with the guide) and an amortized guide, an encoder
network giving each image's ``q(z | x)``. The batches are the model's arguments, as in
NumPyro's example. Both engines take the same updates with 4 particles each and report
the held-out ``-ELBO`` per image (Trace_ELBO with 64 particles, the same for both).

    python examples/numpyro_vae.py [--epochs 20] [--quick]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import sklearn.datasets
from jax.example_libraries import stax
from numpyro.infer import SVI, Trace_ELBO

from numpyro_psvi import ProximalScoreVI

LATENT, HIDDEN = 4, 64


def encoder(hidden: int, latent: int):
    return stax.serial(
        stax.Dense(hidden), stax.Softplus, stax.FanOut(2),
        stax.parallel(stax.Dense(latent), stax.serial(stax.Dense(latent), stax.Exp)),
    )  # fmt: skip


def decoder(hidden: int, pixels: int):
    return stax.serial(stax.Dense(hidden), stax.Softplus, stax.Dense(pixels), stax.Sigmoid)


def model(batch: jax.Array) -> None:
    num, pixels = batch.shape
    decode = numpyro.module("decoder", decoder(HIDDEN, pixels), (num, LATENT))
    with numpyro.plate("batch", num):
        z = numpyro.sample("z", dist.Normal(0, 1).expand([LATENT]).to_event(1))
        numpyro.sample("obs", dist.Bernoulli(decode(z)).to_event(1), obs=batch)


def guide(batch: jax.Array) -> None:
    num, pixels = batch.shape
    encode = numpyro.module("encoder", encoder(HIDDEN, LATENT), (num, pixels))
    loc, scale = encode(batch)
    with numpyro.plate("batch", num):
        numpyro.sample("z", dist.Normal(loc, scale).to_event(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="3 epochs")
    args = parser.parse_args()
    epochs = 3 if args.quick else args.epochs

    images = sklearn.datasets.load_digits().data / 16.0 > 0.5
    order = np.random.default_rng(0).permutation(len(images))
    train = jnp.asarray(images[order[:1500]], jnp.float32)
    test = jnp.asarray(images[order[1500:]], jnp.float32)

    engines = {
        "SVI (Trace_ELBO)": SVI(model, guide, numpyro.optim.Adam(args.lr), Trace_ELBO(num_particles=4)),
        "ProximalScoreVI": ProximalScoreVI(model, guide, numpyro.optim.Adam(args.lr), num_particles=4),
    }
    held_out = Trace_ELBO(num_particles=64)
    for name, engine in engines.items():
        state = engine.init(jax.random.PRNGKey(0), train[: args.batch])
        update = jax.jit(engine.update)
        start = time.perf_counter()
        for epoch in range(epochs):
            for i in range(0, len(train) - args.batch + 1, args.batch):
                state, loss = update(state, train[i : i + args.batch])
            params = engine.get_params(state)
            test_loss = held_out.loss(jax.random.PRNGKey(1), params, model, guide, test) / len(test)
            print(
                f"{name:17s} epoch {epoch + 1:2d}: training -ELBO per batch {float(loss):8.1f}, "
                f"held-out -ELBO per image {float(test_loss):6.2f}"
            )
        print(f"{name}: {time.perf_counter() - start:.1f} s (with compilation)\n")


if __name__ == "__main__":
    main()
