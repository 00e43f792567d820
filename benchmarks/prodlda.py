"""NumPyro's ProdLDA cut down (an amortized Dirichlet guide with a subsampled plate):
SVI against ProximalScoreVI at equal steps.

From NumPyro's ``examples/prodlda.py``: 600 documents of 80 words over a vocabulary of 100
drawn from 5 topics (Dirichlet(0.1) topics, Dirichlet(0.3) proportions, seed 0), a Flax
encoder guide ``Dirichlet(exp(clip(enc(x), -5, 5)))`` for each document's topic
proportions and a Flax decoder in the model, the plate subsampled 60 at a time, Adam(1e-2),
``--steps`` updates. SVI takes ``TraceMeanField_ELBO`` as the example does. Reported: the
``-ELBO`` of the fitted guide and decoder on all 600 documents (10 particles x 5 keys), each
true topic's best correlation with the decoder's, and seconds of ``run`` (compilation
included). ``--prox-weights`` and ``--average`` set ProximalScoreVI's options instead of its
defaults; ``--model-lr-scales`` runs every method with the decoder's (the model's params')
step size scaled (optax's ``multi_transform`` of two Adams; docs/guides.md, "Model params:
one optimizer step per update").

    python -m benchmarks.prodlda [--steps 1000] [--seeds 3] [--prox-weights 10] [--average off]
        [--model-lr-scales 1 0.05]

needs the ``flax`` extra; writes ``benchmarks/results/prodlda.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.module import flax_module
from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from benchmarks.common import (
    adam_with_decoder_scaled,
    add_engine_setting_arguments,
    engine_settings,
    row_method_label,
    save,
)
from numpyro_psvi import ProximalScoreVI

VOCAB, TOPICS, HIDDEN, DOCS, BATCH, WORDS = 100, 5, 32, 600, 60, 80
LR = 1e-2


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, counts):
        hidden = nn.softplus(nn.Dense(HIDDEN)(counts))
        hidden = nn.softplus(nn.Dense(HIDDEN)(hidden))
        return jnp.exp(jnp.clip(nn.Dense(TOPICS)(hidden), -5, 5))


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, proportions):
        return nn.log_softmax(nn.Dense(VOCAB)(proportions))


def corpus() -> tuple[np.ndarray, np.ndarray]:
    """The documents' word counts ``(DOCS, VOCAB)`` and the true topics ``(TOPICS, VOCAB)``."""
    rng = np.random.default_rng(0)
    topics = rng.dirichlet(np.full(VOCAB, 0.1), size=TOPICS)
    proportions = rng.dirichlet(np.full(TOPICS, 0.3), size=DOCS)
    counts = np.stack([rng.multinomial(WORDS, p) for p in proportions @ topics]).astype(np.float32)
    return counts, topics


def model(docs, batch=BATCH):
    decoder = flax_module("decoder", Decoder(), input_shape=(1, TOPICS))
    with numpyro.plate("documents", docs.shape[0], subsample_size=batch) as idx:
        counts = docs[idx]
        proportions = numpyro.sample("theta", dist.Dirichlet(jnp.ones(TOPICS)))
        logits = decoder(proportions)
        numpyro.sample("obs", dist.Multinomial(total_count=counts.sum(-1).max(), logits=logits), obs=counts)


def guide(docs, batch=BATCH):
    encoder = flax_module("encoder", Encoder(), input_shape=(1, VOCAB))
    with numpyro.plate("documents", docs.shape[0], subsample_size=batch) as idx:
        numpyro.sample("theta", dist.Dirichlet(encoder(docs[idx])))


def fit(method: str, engine_options: dict, seed: int, steps: int, model_lr_scale: float = 1.0) -> dict:
    docs, topics = corpus()
    docs = jnp.asarray(docs)
    optim = adam_with_decoder_scaled(LR, model_lr_scale)
    if method == "svi":
        engine = SVI(model, guide, optim, TraceMeanField_ELBO())
    else:
        engine = ProximalScoreVI(model, guide, optim, **engine_options)
    start = time.perf_counter()
    result = engine.run(jax.random.PRNGKey(seed), steps, docs, progress_bar=False)
    seconds = time.perf_counter() - start
    elbo = Trace_ELBO(num_particles=10)
    losses = [
        float(elbo.loss(jax.random.PRNGKey(i), result.params, model, guide, docs, DOCS)) for i in range(5)
    ]
    kernel = result.params["decoder$params"]["Dense_0"]
    weights = np.asarray(kernel["kernel"]) + np.asarray(kernel["bias"])
    learned = np.exp(weights - jax.scipy.special.logsumexp(weights, -1, keepdims=True))
    recovery = np.corrcoef(np.vstack([learned, topics]))[:TOPICS, TOPICS:].max(0)
    return {"neg_elbo": float(np.mean(losses)), "recovery": recovery.tolist(), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["svi", "psvi"], choices=["svi", "psvi"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    add_engine_setting_arguments(parser)
    parser.add_argument("--model-lr-scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--out", default="prodlda")
    options = parser.parse_args()
    rows = []
    for method, scale in itertools.product(options.methods, options.model_lr_scales):
        for engine_options in engine_settings(options) if method == "psvi" else [{}]:
            runs = [fit(method, engine_options, seed, options.steps, scale) for seed in range(options.seeds)]
            rows.append({"method": method, **engine_options, "model_lr_scale": scale, "runs": runs})
            print(
                method,
                engine_options,
                f"decoder lr x{scale:g}",
                [(round(r["neg_elbo"], 1), round(np.mean(r["recovery"]), 3)) for r in runs],
            )
    save(options.out, {"steps": options.steps, "rows": rows})
    print("\n| method | -ELBO (all documents) per seed | mean topic recovery per seed | seconds |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        label = row_method_label(row) + (
            f", decoder lr x{row['model_lr_scale']:g}" if row["model_lr_scale"] != 1 else ""
        )
        elbos = ", ".join(f"{run['neg_elbo']:,.0f}" for run in row["runs"])
        recovery = ", ".join(f"{np.mean(run['recovery']):.3f}" for run in row["runs"])
        seconds = ", ".join(f"{run['seconds']:.0f}" for run in row["runs"])
        print(f"| {label} | {elbos} | {recovery} | {seconds} |")


if __name__ == "__main__":
    main()
