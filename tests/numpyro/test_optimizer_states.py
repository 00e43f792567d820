"""``numpyro_psvi._compat.with_entries_of``: the model params' values and optimizer state
taken from another state of the same optimizer (their first inner step's), the rest
kept; and ``with_step_count``: a state as if its optimizer had taken a given number of
steps (the model params' step counts one per update); for every layout of NumPyro's
optimizers."""

import jax
import jax.numpy as jnp
import numpyro
import optax
import pytest
from numpyro.optim import optax_to_numpyro

from numpyro_psvi._compat import with_entries_of, with_step_count

PARAMS = {"body": jnp.ones(3), "decoder$params": {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}}


def _labels(params):
    return {name: "decoder" if name.startswith("decoder") else "rest" for name in params}


# Each optimizer, and the per-param entries of its state (the value included): Adam's
# moments, Momentum's velocity, none for SGD.
OPTIMIZERS = {
    "Adam": (numpyro.optim.Adam(1e-2), 3),
    "ClippedAdam": (numpyro.optim.ClippedAdam(1e-2), 3),
    "SGD": (numpyro.optim.SGD(1e-2), 1),
    "Momentum": (numpyro.optim.Momentum(1e-2, 0.9), 2),
    "optax adam": (optax_to_numpyro(optax.adam(1e-2)), 3),
    "optax chain": (optax_to_numpyro(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))), 3),
    # the decoder's Adam (value and moments); the other params' momentum is masked there
    "optax multi_transform": (
        optax_to_numpyro(
            optax.multi_transform(
                {"decoder": optax.adam(1e-3), "rest": optax.sgd(1e-2, momentum=0.9)}, _labels
            )
        ),
        3,
    ),
}
# Optimizers whose steps depend on their count: schedules (jax.example_libraries' step,
# optax's and inject_hyperparams' counts) and Adam's bias correction.
COUNTED = {
    "Adam": numpyro.optim.Adam(1e-2),
    "SGD with a schedule": numpyro.optim.SGD(lambda step: 1e-2 * 0.5**step),
    "optax adam with a schedule": optax_to_numpyro(optax.adam(optax.exponential_decay(1e-2, 1, 0.5))),
    "optax inject_hyperparams": optax_to_numpyro(
        optax.inject_hyperparams(optax.adam)(learning_rate=optax.exponential_decay(1e-2, 1, 0.5))
    ),
    "optax multi_transform": OPTIMIZERS["optax multi_transform"][0],
}


def _step(optim, grad_value, state):
    grads = jax.tree.map(lambda x: jnp.full_like(x, grad_value), PARAMS)
    return optim.update(grads, state, value=jnp.zeros(()))


@pytest.mark.parametrize("name", COUNTED)
def test_a_state_set_to_a_step_count_steps_as_after_that_many_steps(name):
    # Zero gradients leave these optimizers' params and moments where they were and
    # advance only their counts: three of them make the reference for a count of 3.
    optim = COUNTED[name]
    start = optim.init(PARAMS)
    counted = _step(optim, 0.0, _step(optim, 0.0, _step(optim, 0.0, start)))
    ours, reference, uncounted = (
        jax.tree.leaves(optim.get_params(_step(optim, 1.0, state)))
        for state in (with_step_count(start, 3), counted, start)
    )
    assert all(jnp.array_equal(got, want) for got, want in zip(ours, reference, strict=True))
    # and the count matters: the first step from the start is another
    assert not all(jnp.array_equal(got, want) for got, want in zip(uncounted, reference, strict=True))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_entries_of_the_named_params_come_from_the_source_state(name):
    optim, entries_per_param = OPTIMIZERS[name]

    def step(grad_value, state):
        return _step(optim, grad_value, state)

    first = step(1.0, optim.init(PARAMS))
    later = step(-2.0, step(-2.0, first))
    held = with_entries_of(later, first, {"decoder$params"})
    assert jax.tree.structure(held) == jax.tree.structure(later)
    # Where `first` and `later` differ, each leaf of `held` is one of theirs: `first`'s
    # for exactly the decoder's entries (its 2 arrays, each with its per-param state),
    # `later`'s for the rest (the body's entries, the step counts).
    from_first = from_later = 0
    for got, one, other in zip(*map(jax.tree.leaves, (held, first, later)), strict=True):
        if not jnp.array_equal(one, other):
            from_first += bool(jnp.array_equal(got, one))
            from_later += bool(jnp.array_equal(got, other))
    assert from_first == 2 * entries_per_param
    assert from_first + from_later == sum(
        not jnp.array_equal(a, b) for a, b in zip(*map(jax.tree.leaves, (first, later)), strict=True)
    )
    params = optim.get_params(held)
    assert all(
        jnp.array_equal(a, b)
        for a, b in zip(
            *(jax.tree.leaves(p["decoder$params"]) for p in (params, optim.get_params(first))), strict=True
        )
    )
    assert jnp.array_equal(params["body"], optim.get_params(later)["body"])
    step(0.5, held)  # a state the optimizer steps on
