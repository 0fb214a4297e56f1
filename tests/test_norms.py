"""The library's normalisations (overfocus_jax/models/norms.py): flax's parameters, statistics and outputs (to float
rounding), BatchNorm's running averages, and sums in blocks that stay blocks under jax.jit — closer to float64 than
one sequential float32 reduction where that loses precision (a GroupNorm over a large group)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax.models import norms

CASES = [(norms.BatchNorm(use_running_average=False, momentum=0.9),
          nn.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=False)),
         (norms.GroupNorm(num_groups=8, epsilon=1e-5), nn.GroupNorm(num_groups=8, epsilon=1e-5, use_fast_variance=False)),
         (norms.LayerNorm(), nn.LayerNorm(use_fast_variance=False))]


@pytest.mark.parametrize("mine, flax_norm", CASES, ids=["batch", "group", "layer"])
def test_same_variables_and_outputs_as_flax(mine, flax_norm):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 7, 7, 32)) * 3 + 1
  ours, theirs = mine.init(jax.random.PRNGKey(1), x), flax_norm.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  perturbed = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(2), a.shape), theirs)
  (out, state), (expected, expected_state) = (module.apply(perturbed, x, mutable=["batch_stats"])
                                              for module in (mine, flax_norm))
  np.testing.assert_allclose(out, expected, atol=2e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), state, expected_state)


def test_batch_norm_running_averages_and_inference_mode():
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 3, 3, 4)) * 2 + 5
  module = norms.BatchNorm(use_running_average=False, momentum=0.9)
  variables = module.init(jax.random.PRNGKey(1), x)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)  # not updated while initialising
  _, state = module.apply(variables, x, mutable=["batch_stats"])
  flat = np.asarray(x, np.float64).reshape(-1, 4)
  np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0), rtol=1e-5)
  frozen = norms.BatchNorm(use_running_average=True).apply({**variables, **state}, x)
  expected = (flat - 0.1 * flat.mean(0)) / np.sqrt(0.9 + 0.1 * flat.var(0) + 1e-5)
  np.testing.assert_allclose(np.asarray(frozen).reshape(-1, 4), expected, rtol=1e-4, atol=1e-5)


def test_blocked_sum_is_exact_on_integers_and_any_length():
  for n in (1, 7, 64, 65, 784, 1000, 4099):  # divisors, a prime past the block (padded), lengths below it
    values = (np.arange(n * 3) % 997).reshape(n, 3)  # sums below 2^24: exact in float32
    got = jax.jit(lambda v: norms.blocked_sum(v, 0))(jnp.asarray(values, jnp.float32))
    np.testing.assert_array_equal(got, values.sum(0))


def test_group_statistics_are_closer_to_float64_than_one_sequential_reduction():
  """A GroupNorm over (B, 28·28, 8, 16) activations of large magnitude: the blocked sums keep its output within a
  few float32 ulps of a float64 computation, less than half as far as flax's one reduction over the same values."""
  rng = np.random.default_rng(0)
  x = (rng.uniform(size=(4, 28, 28, 128)) * 500 + 100).astype(np.float32)
  variables = norms.GroupNorm(num_groups=8).init(jax.random.PRNGKey(0), x[:1])  # scale 1, bias 0
  grouped = x.astype(np.float64).reshape(4, -1, 8, 16)
  mean = grouped.mean(axis=(1, 3), keepdims=True)
  variance = ((grouped - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  reference = ((grouped - mean) / np.sqrt(variance + 1e-6)).reshape(x.shape)
  ours = np.asarray(jax.jit(norms.GroupNorm(num_groups=8).apply)(variables, x))
  theirs = np.asarray(jax.jit(nn.GroupNorm(num_groups=8, use_fast_variance=False).apply)(variables, x))
  error_ours, error_flax = np.max(np.abs(ours - reference)), np.max(np.abs(theirs - reference))
  assert error_ours < 1e-5 and error_ours < error_flax / 2, (error_ours, error_flax)
