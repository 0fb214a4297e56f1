"""Input attributions and map metrics, checked against closed forms on tiny linear models.

For f(x) = vec(x) @ W + b: ∇f_c = W[:, c], IG from zero = x ⊙ W[:, c] exactly; Grad-CAM of ψ(z) = mean_hw(z) @ W
is ReLU(z @ W[:, c] / (h w)); one-hot and uniform maps pin the metrics' extremes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax.explain import attributions as attr
from overfocus_jax.explain import metrics

B, H, W_, C, K = 4, 5, 6, 2, 3
D = H * W_ * C


def _linear(seed=0, classes=K):
  rng = np.random.default_rng(seed)
  weights = jnp.asarray(rng.normal(size=(D, classes)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(classes,)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(B, H, W_, C)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, classes, B), jnp.int32)
  logits_fn = lambda v: v.reshape(v.shape[0], -1) @ weights + bias
  return logits_fn, weights, x, labels


def _class_weights(weights, classes):
  return weights[:, classes].T.reshape(-1, H, W_, C)


@pytest.mark.parametrize("target", ["true", "predicted"])
def test_input_gradient_of_linear_model_is_the_class_weight(target):
  logits_fn, weights, x, labels = _linear()
  classes = labels if target == "true" else jnp.argmax(logits_fn(x), -1)
  got = attr.input_gradient(logits_fn, x, labels, target)
  np.testing.assert_allclose(got, _class_weights(weights, classes), rtol=1e-6, atol=1e-6)


def test_integrated_gradients_of_linear_model_is_exact():
  logits_fn, weights, x, labels = _linear()
  got = attr.integrated_gradients(logits_fn, x, labels, steps=3)
  np.testing.assert_allclose(got, x * _class_weights(weights, labels), rtol=1e-5, atol=1e-6)


def test_integrated_gradients_completeness_on_tanh_mlp():
  rng = np.random.default_rng(1)
  w1 = jnp.asarray(rng.normal(size=(D, 16)) / math.sqrt(D), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(16, K)) * 2.0, jnp.float32)
  logits_fn = lambda v: jnp.tanh(v.reshape(v.shape[0], -1) @ w1) @ w2
  x = jnp.asarray(rng.normal(size=(B, H, W_, C)) * 2.0, jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, B), jnp.int32)
  baseline = jnp.full_like(x, 0.3)
  got = attr.integrated_gradients(logits_fn, x, labels, baseline=baseline, steps=64)
  rows = jnp.arange(B)
  expected = logits_fn(x)[rows, labels] - logits_fn(baseline)[rows, labels]
  assert np.all(np.abs(expected) > 0.1), "degenerate test case"
  np.testing.assert_allclose(got.sum(axis=(1, 2, 3)), expected, rtol=0.01)


def test_grad_cam_of_linear_head_by_hand():
  rng = np.random.default_rng(2)
  h, w, k = 3, 4, 5
  head = jnp.asarray(rng.normal(size=(k, K)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(B, h, w, k)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, B), jnp.int32)
  classify_fn = lambda latent: jnp.mean(latent, axis=(1, 2)) @ head
  got = attr.grad_cam(lambda v: v, classify_fn, z, labels)
  expected = np.maximum(np.einsum("bhwk,bk->bhw", np.asarray(z), np.asarray(head[:, labels].T)) / (h * w), 0)
  assert got.shape == (B, h, w)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_grad_cam_on_tiny_resnet():
  # The model alone (no optimizer or train state): the conftest fixture costs seconds more to build.
  from overfocus_jax import config as config_lib
  from overfocus_jax.models import build_model
  config = config_lib.load_config_file(config_lib.default_config_path())
  config.resnet.update(dict(stem_features=8, stage_widths=(8, 16), stage_sizes=(1, 1), stage_strides=(1, 2)))
  model = build_model(config, 10)
  variables = model.init(jax.random.PRNGKey(0), (8, 8, 1))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
  labels = jnp.asarray([0, 3, 5, 9], jnp.int32)
  encode_fn = lambda v: model.encode(variables, v)[0]
  classify_fn = lambda z: model.classify(variables, z)[0]
  maps = jax.jit(lambda v, y: attr.grad_cam(encode_fn, classify_fn, v, y, "predicted"))(x, labels)
  z = encode_fn(x)
  assert maps.shape == z.shape[:3] and bool(jnp.all(maps >= 0))
  up = attr.upsample_to(maps, 8, 8)
  assert up.shape == (4, 8, 8)


def test_smoothgrad_without_noise_is_the_input_gradient_and_deterministic_with_it():
  rng = np.random.default_rng(3)
  w1 = jnp.asarray(rng.normal(size=(D, 8)) / math.sqrt(D), jnp.float32)
  logits_fn = lambda v: jnp.tanh(v.reshape(v.shape[0], -1) @ w1)[:, :K]
  x = jnp.asarray(rng.normal(size=(B, H, W_, C)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, K, B), jnp.int32)
  key = jax.random.PRNGKey(0)
  plain = attr.input_gradient(logits_fn, x, labels)
  np.testing.assert_allclose(attr.smoothgrad(logits_fn, x, labels, key, samples=3, noise_scale=0.0), plain,
                             rtol=1e-6, atol=1e-7)
  noisy = attr.smoothgrad(logits_fn, x, labels, key, samples=4)
  np.testing.assert_array_equal(noisy, attr.smoothgrad(logits_fn, x, labels, key, samples=4))
  assert not np.allclose(noisy, plain)


def test_to_heatmap_and_upsample_shapes():
  maps = jnp.asarray(np.random.default_rng(4).normal(size=(B, H, W_, C)), jnp.float32)
  heat = attr.to_heatmap(maps)
  np.testing.assert_allclose(heat, np.abs(np.asarray(maps)).sum(-1), rtol=1e-6)
  constant = attr.upsample_to(jnp.ones((2, 3, 3)), 7, 9)
  np.testing.assert_allclose(constant, np.ones((2, 7, 9)), rtol=1e-6)


N = 40


def _one_hot_and_uniform():
  one_hot = jnp.zeros((1, 5, 8)).at[0, 2, 3].set(2.5)
  uniform = jnp.full((1, 5, 8), 0.7)
  return one_hot, uniform


@pytest.mark.parametrize("share", [0.5, 0.33, 0.9])
def test_attribution_ratio_extremes(share):
  one_hot, uniform = _one_hot_and_uniform()
  np.testing.assert_allclose(metrics.attribution_ratio(one_hot, share), [1 / N], rtol=1e-6)
  np.testing.assert_allclose(metrics.attribution_ratio(uniform, share), [math.ceil(share * N) / N], rtol=1e-6)
  assert metrics.attribution_ratio(one_hot, share)[0] < metrics.attribution_ratio(uniform, share)[0]
  np.testing.assert_allclose(metrics.attribution_ratio(jnp.zeros((1, 5, 8)), share), [1.0])


def test_entropy_and_gini_extremes():
  one_hot, uniform = _one_hot_and_uniform()
  np.testing.assert_allclose(metrics.entropy(one_hot), [0.0], atol=1e-7)
  np.testing.assert_allclose(metrics.entropy(uniform), [math.log(N)], rtol=1e-6)
  np.testing.assert_allclose(metrics.normalised_entropy(uniform), [1.0], rtol=1e-6)
  np.testing.assert_allclose(metrics.gini(one_hot), [(N - 1) / N], rtol=1e-6)
  np.testing.assert_allclose(metrics.gini(uniform), [0.0], atol=1e-6)
  np.testing.assert_allclose(metrics.gini(jnp.zeros((1, 5, 8))), [0.0])
  batched = jnp.concatenate([one_hot, uniform])
  np.testing.assert_allclose(metrics.gini(batched), [(N - 1) / N, 0.0], atol=1e-6)


def _linear_softmax():
  """Two classes with opposite weights: p_c = sigmoid(2 x·w_c), monotone in the class's own contribution."""
  rng = np.random.default_rng(5)
  w = rng.normal(size=(D,))
  weights = jnp.asarray(np.stack([w, -w], axis=1), jnp.float32)
  x = jnp.asarray(rng.normal(size=(B, H, W_, C)), jnp.float32)
  labels = jnp.asarray([0, 1, 0, 1], jnp.int32)
  prob_fn = lambda v: jax.nn.softmax(0.3 * v.reshape(v.shape[0], -1) @ weights, axis=-1)
  return prob_fn, weights, x, labels


def test_deletion_and_insertion_rank_a_perfect_map_above_a_random_one():
  prob_fn, weights, x, labels = _linear_softmax()
  perfect = jax.nn.relu(x * _class_weights(weights, labels))
  random_map = jax.random.uniform(jax.random.PRNGKey(0), (B, H, W_))
  del_p, ins_p = metrics.deletion_insertion_curves(prob_fn, x, perfect, labels, steps=10)
  del_r, ins_r = metrics.deletion_insertion_curves(prob_fn, x, random_map, labels, steps=10)
  assert del_p.shape == (B, 11)
  rows = jnp.arange(B)
  np.testing.assert_allclose(del_p[:, 0], prob_fn(x)[rows, labels], rtol=1e-6)
  np.testing.assert_allclose(ins_p[:, 0], prob_fn(jnp.zeros_like(x))[rows, labels], rtol=1e-6)
  np.testing.assert_allclose(del_p[:, -1], ins_p[:, 0], rtol=1e-6)
  np.testing.assert_allclose(ins_p[:, -1], del_p[:, 0], rtol=1e-6)
  assert np.all(metrics.auc(del_p) < metrics.auc(del_r))
  assert np.all(metrics.auc(ins_p) > metrics.auc(ins_r))


def test_auc_trapezoid():
  np.testing.assert_allclose(metrics.auc(jnp.asarray([[0.0, 0.5, 1.0], [1.0, 1.0, 1.0]])), [0.5, 1.0])


def test_jit_matches_eager():
  logits_fn, _, x, labels = _linear()
  key = jax.random.PRNGKey(1)
  z = jnp.asarray(np.random.default_rng(6).normal(size=(B, 3, 4, 5)), jnp.float32)
  head = jnp.asarray(np.random.default_rng(7).normal(size=(5, K)), jnp.float32)
  classify_fn = lambda latent: jnp.mean(latent, axis=(1, 2)) @ head
  maps = jnp.abs(x)
  calls = [
      (lambda x, y: attr.input_gradient(logits_fn, x, y, "predicted"), (x, labels)),
      (lambda x, y, k: attr.smoothgrad(logits_fn, x, y, k, samples=3), (x, labels, key)),
      (lambda x, y: attr.integrated_gradients(logits_fn, x, y, steps=4), (x, labels)),
      (lambda z, y: attr.grad_cam(lambda v: v, classify_fn, z, y), (z, labels)),
      (lambda m: attr.upsample_to(m, 6, 8), (z[..., 0],)),
      (attr.to_heatmap, (x,)),
      (lambda m: metrics.attribution_ratio(m, 0.5), (maps,)),
      (metrics.entropy, (maps,)),
      (metrics.normalised_entropy, (maps,)),
      (metrics.gini, (maps,)),
      (lambda x, m, y: metrics.deletion_insertion_curves(lambda v: jax.nn.softmax(logits_fn(v)), x, m, y,
                                                         steps=4), (x, maps, labels)),
      (metrics.auc, (maps[:, 0, 0],)),
  ]
  for fn, args in calls:
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           jax.jit(fn)(*args), fn(*args))
