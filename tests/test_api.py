"""The functional API (``import overfocus_jax as ofx``), in optax's manner: each mask function with and without jit
on hand-computed expectations (ties included), traced hyperparameters equal static ones, ``vmap`` over rates equals a
loop, gradients reach the encoder through ``z̃`` and none flow through a mask, ``aux["mask"]`` is the mask applied,
bad arguments are a ``ValueError`` naming the argument, and the namespace is what ``__all__`` says."""

import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import overfocus_jax as ofx
from overfocus_jax.challenge import masks


def linear_pool_head(weights):
  """ψ(z) = mean_hw(z) @ W: ∂ψ_c/∂z = W[:, c] / HW at every position."""
  return lambda z: jnp.mean(z, axis=(1, 2)) @ weights


def unit_head(n: int):
  """One class whose logit is Σ z: the attribution of every unit is its own value (A = ReLU(z))."""
  return lambda z: jnp.sum(z.reshape(z.shape[0], -1), axis=-1, keepdims=True) * jnp.ones((1, 1))


def random_case(batch=6, size=(3, 3, 8), classes=10, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  z = jax.nn.relu(jax.random.normal(keys[0], (batch, *size)))
  weights = jax.random.normal(keys[1], (size[-1], classes))
  labels = jax.random.randint(keys[2], (batch,), 0, classes)
  return linear_pool_head(weights), z, labels


# ------------------------------------------------------------------------------------------- the namespace


def test_every_public_name_resolves_and_nothing_else_is_offered():
  assert ofx.__all__ == sorted(ofx.__all__) and len(ofx.__all__) == len(set(ofx.__all__))
  for name in ofx.__all__:
    assert getattr(ofx, name) is not None, name
    assert name in dir(ofx)
  with pytest.raises(AttributeError, match="no attribute 'StepInfo'"):
    ofx.StepInfo  # noqa: B018


def test_importing_the_library_changes_nothing_and_pulls_in_no_application_package():
  """In a fresh process: every public name and the pure layer imported; no ml_collections, grain, orbax or TFDS;
  no compilation cache, no XLA flags, no malloc setting (test_host_memory.py checks glibc's behaviour)."""
  code = """
import json, os, sys
flags = os.environ.get("XLA_FLAGS")
import jax
cache = jax.config.jax_compilation_cache_dir
import overfocus_jax as ofx
[getattr(ofx, name) for name in ofx.__all__]
import overfocus_jax.challenge, overfocus_jax.challenge.invariance, overfocus_jax.models, overfocus_jax.explain.metrics
from overfocus_jax import host_memory
app = sorted({m.split(".")[0] for m in sys.modules} & {"ml_collections", "grain", "orbax", "tensorflow_datasets",
                                                      "tensorflow", "tensorboardX"})
print(json.dumps({"app": app, "flags": os.environ.get("XLA_FLAGS") == flags,
                  "cache": jax.config.jax_compilation_cache_dir == cache, "malloc": host_memory.status(),
                  "backends": bool(sys.modules["jax._src.xla_bridge"].backends_are_initialized())}))
"""
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result == {"app": [], "flags": True, "cache": True, "malloc": "not applied (call retain_host_memory())",
                    "backends": False}, result


# ------------------------------------------------------------------------------------------- SGDrop's masks


class SGDropMaskTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_topk_drops_exactly_the_count_ties_to_the_lower_index(self):
    z = jnp.array([[5.0, 0.0, 5.0, 2.0, 5.0, 1.0, 3.0]]).reshape(1, 1, 7, 1)  # A = z: ⌈0.25·7⌉ = 2 of three 5s
    mask, aux = self.variant(lambda z: ofx.sgdrop_mask(unit_head(7), z, jnp.array([0]), rule="topk", rate=0.25,
                                                       granularity="element", batch_fraction=1.0))(z)
    np.testing.assert_array_equal(mask.ravel(), [0, 1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(aux["attribution"], z)
    assert bool(aux["chosen"][0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_quantile_is_the_formula_as_written(self):
    # Distinct: quantile([1..5], 0.75) = 4 → only the 5 is dropped (topk would drop ⌈1.25⌉ = 2).
    distinct = jnp.array([3.0, 1.0, 5.0, 2.0, 4.0]).reshape(1, 1, 5, 1)
    # Ties at the threshold all stay: quantile([0, 0, 0, 7, 9], 0.75) = 7 → the 9 alone.
    tied = jnp.array([0.0, 7.0, 0.0, 9.0, 0.0]).reshape(1, 1, 5, 1)
    equal = jnp.full((1, 1, 5, 1), 2.0)  # an all-equal map loses nothing
    fn = self.variant(lambda z: ofx.sgdrop_mask(unit_head(5), z, jnp.array([0]), rule="quantile", rate=0.25,
                                                granularity="element", batch_fraction=1.0)[0])
    np.testing.assert_array_equal(fn(distinct).ravel(), [1, 1, 0, 1, 1])
    np.testing.assert_array_equal(fn(tied).ravel(), [1, 1, 1, 0, 1])
    np.testing.assert_array_equal(fn(equal).ravel(), [1, 1, 1, 1, 1])
    expected = (np.asarray(distinct) <= np.quantile(np.asarray(distinct), 0.75)).astype(np.float32)
    np.testing.assert_array_equal(fn(distinct), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_mass_drops_the_fewest_units_holding_the_share(self):
    z = jnp.array([0.0, 5.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]).reshape(1, 1, 10, 1)  # total 10
    fn = self.variant(lambda z, mass: ofx.sgdrop_mask(unit_head(10), z, jnp.array([0]), rule="mass", mass=mass,
                                                      rate=0.3, granularity="element", batch_fraction=1.0)[0])
    np.testing.assert_array_equal(np.flatnonzero(fn(z, 0.5).ravel() == 0), [1])           # the 5 holds half
    np.testing.assert_array_equal(np.flatnonzero(fn(z, 0.8).ravel() == 0), [1, 2])        # 5 + 3 = 8
    np.testing.assert_array_equal(np.flatnonzero(fn(z, 1.0).ravel() == 0), [1, 2, 3])     # the cap ⌈3⌉ = 3

  @chex.variants(with_jit=True, without_jit=True)
  def test_batch_fraction_masks_a_random_share_of_the_batch(self):
    head, z, labels = random_case(batch=8)
    mask, aux = self.variant(lambda z, key: ofx.sgdrop_mask(head, z, labels, rule="topk", rate=0.3,
                                                            granularity="spatial", batch_fraction=0.5, key=key))(
                                                                z, jax.random.PRNGKey(3))
    chex.assert_shape(mask, (8, 3, 3, 1))
    chosen = np.asarray(aux["chosen"])
    assert chosen.sum() == 4
    np.testing.assert_array_equal(np.asarray(mask)[~chosen], 1.0)              # the others are untouched
    np.testing.assert_array_equal(np.sum(np.asarray(mask)[chosen] == 0, axis=(1, 2, 3)), 3)  # ⌈0.3·9⌉


@pytest.mark.parametrize("rule", ["topk", "quantile", "mass"])
@pytest.mark.parametrize("granularity", ["element", "spatial", "channel"])
def test_a_traced_rate_gives_the_static_rate_s_mask(rule, granularity):
  head, z, labels = random_case(batch=5, size=(4, 4, 16))
  key = jax.random.PRNGKey(0)
  kwargs = dict(rule=rule, granularity=granularity, key=key)
  traced = jax.jit(lambda rate, mass, fraction: ofx.sgdrop_mask(head, z, labels, rate=rate, mass=mass,
                                                                batch_fraction=fraction, **kwargs)[0])
  for rate, mass, fraction in ((0.047, 0.5, 1.0), (0.1, 0.25, 0.5), (0.25, 0.9, 0.6), (1 / 3, 1.0, 0.2),
                               (0.5, 0.5, 0.5), (0.9, 0.1, 1.0)):
    static = ofx.sgdrop_mask(head, z, labels, rate=rate, mass=mass, batch_fraction=fraction, **kwargs)[0]
    np.testing.assert_array_equal(traced(rate, mass, fraction), static, err_msg=f"{rate=} {mass=} {fraction=}")


@pytest.mark.parametrize("rule", ["topk", "quantile", "mass"])
def test_vmap_over_eight_rates_equals_eight_calls(rule):
  head, z, labels = random_case(batch=4)
  rates = jnp.array([0.05, 0.1, 0.2, 0.25, 1 / 3, 0.4, 0.5, 0.75])

  def mask(rate):
    return ofx.sgdrop_mask(head, z, labels, rate=rate, rule=rule, granularity="element", batch_fraction=1.0)[0]

  stacked = jax.jit(jax.vmap(mask))(rates)
  chex.assert_shape(stacked, (8, *z.shape))
  for i, rate in enumerate(rates.tolist()):
    np.testing.assert_array_equal(stacked[i], mask(rate), err_msg=f"{rate=}")
  if rule == "topk":  # and the counts are the exact ⌈ρN⌉
    counts = np.sum(np.asarray(stacked) == 0, axis=(2, 3, 4))
    np.testing.assert_array_equal(counts, np.ceil(np.round(np.asarray(rates)[:, None] * 72, 6)).repeat(4, 1))


def test_a_traced_count_equals_the_static_count_on_a_grid():
  fractions = [0.0, 0.01, 0.047, 0.1, 0.25, 0.28, 1 / 3, 1 / 3.2, 0.3, 0.5, 0.6, 0.7, 0.9, 0.99]
  sizes = [1, 2, 7, 9, 25, 49, 64, 100, 128, 196, 512, 1000, 6272]
  traced = jax.jit(jax.vmap(lambda fraction, size: masks.unit_count(fraction, size), in_axes=(0, None)),
                   static_argnums=1)
  for size in sizes:
    np.testing.assert_array_equal(traced(jnp.array(fractions), size),
                                  [masks.drop_count(f, size) for f in fractions], err_msg=f"{size=}")


# ------------------------------------------------------------------------------------------- RSC's masks


class RSCMaskTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_spatial_and_channel_masks_hand_built(self):
    weights = jnp.array([[2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # 3 channels; class 0 reads them, class 1 nothing
    # Sample 0 hand-built; sample 1 all zeros, whose confidence no mask changes: with batch_percent 0.5 the threshold
    # is the second-largest change (sample 1's, 0), so sample 0 alone keeps its mask.
    z = jnp.zeros((2, 3, 1, 3)).at[0, 0, 0, 0].set(1.0).at[0, 1, 0, 1].set(5.0).at[0, 2, 0, 2].set(4.0)
    fn = self.variant(lambda z, p: ofx.rsc_mask(linear_pool_head(weights), z, jnp.array([0, 0]),
                                                jax.random.PRNGKey(0), spatial_probability=p, batch_percent=0.5))
    spatial, aux = fn(z, 1.0)  # scores Σ_c z·W[:, 0]/3: 2/3, 5/3, −4/3 → position 1
    assert bool(aux["spatial"]) and aux["chosen"].tolist() == [True, False]
    np.testing.assert_array_equal(spatial[0, :, 0, 0], [1, 0, 1])
    np.testing.assert_array_equal(spatial[1], 1.0)
    channel, aux = fn(z, 0.0)  # mean_hw(grad) = W/3: channel 0 highest
    assert not bool(aux["spatial"]) and aux["chosen"].tolist() == [True, False]
    np.testing.assert_array_equal(channel[0, 0, 0], [0, 1, 1])

  @chex.variants(with_jit=True, without_jit=True)
  def test_domainbed_mask_hand_built(self):
    weights = jnp.array([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    features = jnp.array([[1.0, 1.0, 1.0], [0.1, 0.1, 5.0], [2.0, 2.0, 0.0]])
    mask, aux = self.variant(lambda f: ofx.rsc_domainbed_mask(lambda f: f @ weights, f, jnp.array([0, 0, 0])))(
        features)
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 1, 1], [1, 1, 1]])  # sample 0 changes most
    np.testing.assert_array_equal(aux["chosen"], [True, False, False])


def test_rsc_traced_hyperparameters_give_the_static_masks():
  head, z, labels = random_case(batch=16, size=(4, 4, 32))
  key = jax.random.PRNGKey(7)
  traced = jax.jit(lambda s, c, p, b: ofx.rsc_mask(head, z, labels, key, spatial_fraction=s, channel_fraction=c,
                                                   spatial_probability=p, batch_percent=b)[0])
  for s, c, p, b in ((1 / 3, 1 / 3.2, 1.0, 0.3), (0.25, 0.5, 0.0, 0.5), (0.047, 0.1, 1.0, 0.7)):
    static = ofx.rsc_mask(head, z, labels, key, spatial_fraction=s, channel_fraction=c, spatial_probability=p,
                          batch_percent=b)[0]
    np.testing.assert_array_equal(traced(s, c, p, b), static)
  features = jax.nn.relu(jax.random.normal(key, (16, 24)))
  dense = lambda f: f @ jax.random.normal(jax.random.PRNGKey(1), (24, 5))  # noqa: E731
  flabels = labels % 5
  traced = jax.jit(lambda f, b: ofx.rsc_domainbed_mask(dense, features, flabels, feature_drop=f, batch_drop=b)[0])
  for f, b in ((1 / 3, 1 / 3), (0.1, 0.5), (0.47, 0.05)):
    np.testing.assert_array_equal(traced(f, b), ofx.rsc_domainbed_mask(dense, features, flabels, feature_drop=f,
                                                                       batch_drop=b)[0])


# ------------------------------------------------------------------------------------------- the regularizers


def regularizers():
  return {"sgdrop": ofx.sgdrop(ramp_steps=0), "sgdrop_paper": ofx.sgdrop(rule="topk", rate=0.1,
                                                                         granularity="element", batch_fraction=1.0,
                                                                         ramp_steps=0),
          "sgdrop_quantile_rescaled": ofx.sgdrop(rule="quantile", rate=0.3, rescale=True, ramp_steps=5),
          "rsc": ofx.rsc(batch_percent=0.5), "rsc_curriculum": ofx.rsc(curriculum_steps=3)}


@pytest.mark.parametrize("name", list(regularizers()))
def test_aux_mask_is_the_mask_applied_and_gradients_reach_z_but_not_the_mask(name):
  reg = regularizers()[name]
  head, z, labels = random_case(batch=8)
  z = z + 0.1  # strictly positive: z̃ / z recovers the multiplier
  key = jax.random.PRNGKey(2)
  state = reg.init(None)
  out, new_state, aux = jax.jit(lambda state, z: reg.apply(state, head, z, labels, key))(state, z)
  mask = np.asarray(aux["mask"])
  assert set(np.unique(mask)) <= {0.0, 1.0} and mask.min() == 0.0
  multiplier = np.asarray(out) / np.asarray(z)
  np.testing.assert_array_equal(multiplier == 0, np.broadcast_to(mask, z.shape) == 0)
  if "rescaled" not in name:
    np.testing.assert_allclose(multiplier, np.broadcast_to(mask, z.shape), rtol=1e-6)
  assert int(new_state["count"]) == 1
  # ∂ Σ (z̃ · c) / ∂z = c · multiplier: the mask is a constant, the gradient reaches z through z̃ alone.
  cotangent = jax.random.normal(jax.random.PRNGKey(9), z.shape)
  grad = jax.grad(lambda z: jnp.sum(reg.apply(state, head, z, labels, key)[0] * cotangent))(z)
  np.testing.assert_allclose(grad, np.asarray(cotangent) * multiplier, rtol=1e-5, atol=1e-6)
  for value in aux.values():
    chex.assert_tree_all_finite(value)


def test_domainbed_regularizer_reports_its_mask():
  features = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (8, 12))) + 0.1
  dense = lambda f: f @ jax.random.normal(jax.random.PRNGKey(1), (12, 4))  # noqa: E731
  reg = ofx.rsc_domainbed()
  out, state, aux = reg.apply(reg.init(None), dense, features, jnp.arange(8) % 4, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out, features * aux["mask"]) and state == ()


def test_the_sgdrop_ramp_counts_its_own_steps():
  """ramp_steps=4: the masked share grows over the regularizer's own first four applies, then holds."""
  reg = ofx.sgdrop(rule="topk", rate=0.5, granularity="element", batch_fraction=1.0, ramp_steps=4)
  head, z, labels = random_case(batch=2, size=(2, 2, 10))
  apply = jax.jit(lambda state: reg.apply(state, head, z, labels, jax.random.PRNGKey(0)))
  state, dropped = reg.init(None), []
  for _ in range(6):
    _, state, aux = apply(state)
    dropped.append(int(np.sum(np.asarray(aux["mask"])[0] == 0)))
  assert dropped == [5, 10, 15, 20, 20, 20]  # ⌈s·20⌉, s = 1/4, 2/4, 3/4, 1


def test_identity_and_stateless_and_chain():
  head, z, labels = random_case()
  out, state, aux = ofx.identity().apply((), head, z, labels, jax.random.PRNGKey(0))
  assert out is z and aux == {}
  halve = ofx.stateless(lambda classify_fn, z, labels, key: (z * 0.5, {"mask": jnp.full(z.shape[:1] + (1, 1, 1),
                                                                                         0.5)}))
  chained = ofx.chain(halve, ofx.sgdrop(ramp_steps=0))
  out, states, aux = chained.apply(chained.init(None), head, z, labels, jax.random.PRNGKey(0))
  assert states[0] == () and int(states[1]["count"]) == 1
  np.testing.assert_allclose(out, z * aux["mask"], rtol=1e-6)


def test_the_ema_teacher_without_its_inputs_fails_when_traced():
  reg = ofx.sgdrop(ema_decay=0.99, ramp_steps=0)
  assert reg.needs_teacher
  head, z, labels = random_case()
  with pytest.raises(ValueError, match="teacher is needed"):
    jax.jit(lambda state: reg.apply(state, head, z, labels, jax.random.PRNGKey(0)))(reg.init({"params": {}}))


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, argument", [
    (dict(rule="percentile"), "rule"),
    (dict(granularity="pixel"), "granularity"),
    (dict(target="other"), "target"),
    (dict(rate=1.0, rule="topk"), "rate"),
    (dict(rate=-0.1, rule="quantile"), "rate"),
    (dict(rate=0.0, rule="mass"), "rate"),
    (dict(mass=1.5), "mass"),
    (dict(batch_fraction=0.0), "batch_fraction"),
    (dict(scale=1.5), "scale"),
])
def test_sgdrop_mask_bad_arguments_name_the_argument(kwargs, argument):
  head, z, labels = random_case()
  with pytest.raises(ValueError, match=rf"\b{argument}\b"):
    ofx.sgdrop_mask(head, z, labels, key=jax.random.PRNGKey(0), **kwargs)


def test_shapes_that_do_not_fit_name_the_argument():
  head, z, labels = random_case()
  with pytest.raises(ValueError, match=r"needs z of shape \(B, H, W, C\)"):
    ofx.sgdrop_mask(head, z.reshape(6, -1), labels, granularity="spatial", key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="labels must be one class per sample"):
    ofx.sgdrop_mask(head, z, labels[:3], key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="labels must be integer"):
    ofx.sgdrop_mask(head, z, labels.astype(jnp.float32), key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="key is needed"):
    ofx.sgdrop_mask(head, z, labels)
  with pytest.raises(ValueError, match=r"rsc needs z of shape \(B, H, W, C\)"):
    ofx.rsc_mask(head, z.reshape(6, -1), labels, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="labels must be one class per sample"):
    ofx.rsc_mask(head, z, labels[:2], jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"pooled features of shape \(B, D\)"):
    ofx.rsc_domainbed_mask(head, z, labels)


@pytest.mark.parametrize("make, argument", [
    (lambda: ofx.sgdrop(), "ramp_steps"),
    (lambda: ofx.sgdrop(ramp_steps=-1), "ramp_steps"),
    (lambda: ofx.sgdrop(ramp_steps=0, ema_decay=1.0), "ema_decay"),
    (lambda: ofx.rsc(), "curriculum_steps"),
    (lambda: ofx.rsc(curriculum_steps=0), "curriculum_steps"),
    (lambda: ofx.rsc(batch_percent=1.0), "batch_percent"),
    (lambda: ofx.rsc(batch_percent=0.3, spatial_fraction=1.2), "spatial_fraction"),
    (lambda: ofx.rsc(batch_percent=0.3, spatial_probability=-0.5), "spatial_probability"),
    (lambda: ofx.rsc_domainbed(feature_drop=1.0), "feature_drop"),
    (lambda: ofx.rsc_domainbed(batch_drop=-0.1), "batch_drop"),
])
def test_regularizer_factories_name_the_bad_argument(make, argument):
  with pytest.raises(ValueError, match=rf"\b{argument}\b"):
    make()


# ------------------------------------------------------------------------------------------- any model


class TinyLinen(nn.Module):
  """A researcher's own Linen CNN: encode/classify without a ``train`` keyword."""

  def setup(self):
    self.conv = nn.Conv(8, (3, 3))
    self.dense = nn.Dense(10)

  def __call__(self, x):
    return self.classify(self.encode(x))

  def encode(self, x):
    return nn.relu(self.conv(x))

  def classify(self, z):
    return self.dense(jnp.mean(z, axis=(1, 2)))


class TinyNNX(nnx.Module):
  """A researcher's own NNX CNN with batch norm and dropout."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.dense = nnx.Linear(8, 10, rngs=rngs)

  def encode(self, x):
    return nnx.relu(self.norm(self.conv(x)))

  def classify(self, z):
    return self.dense(self.drop(jnp.mean(z, axis=(1, 2))))


def test_linen_fns_and_the_attributions_take_a_bare_linen_module():
  module = TinyLinen()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  labels = jnp.arange(4)
  variables = module.init(jax.random.PRNGKey(1), x)
  encode_fn, classify_fn = ofx.linen_fns(module, variables)
  np.testing.assert_allclose(classify_fn(encode_fn(x)), module.apply(variables, x), rtol=1e-6)
  z, attribution = ofx.latent_attribution(encode_fn, classify_fn, x, labels)
  chex.assert_shape(attribution, z.shape)
  mask, _ = ofx.sgdrop_mask(classify_fn, z, labels, key=jax.random.PRNGKey(0))
  chex.assert_shape(mask, (4, 8, 8, 1))
  layers = ofx.linen_feature_layers(module, variables, (8, 8, 1))
  assert layers == {"conv": (8, 8, 8)}
  # Grad-CAM at the conv layer is Grad-CAM on the model cut there: a = conv(x), head(a) = classify(relu(a)).
  probe = ofx.linen_probe(module, variables, "conv")
  expected = ofx.grad_cam(lambda x: ofx.layer_activation(probe, x), lambda a: classify_fn(nn.relu(a)), x, labels)
  assert float(jnp.max(expected)) > 0
  np.testing.assert_allclose(ofx.layer_grad_cam(probe, x, labels), expected, rtol=1e-5, atol=1e-6)


def test_nnx_fns_probe_and_grad_cam_leave_the_model_as_it_is():
  model = TinyNNX(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
  labels = jnp.arange(4)
  encode_fn, classify_fn = ofx.nnx_fns(model)
  assert not model.norm.use_running_average and not model.drop.deterministic  # still in training mode
  logits = jax.jit(lambda x: classify_fn(encode_fn(x)))(x)
  assert np.allclose(logits, jax.jit(lambda x: classify_fn(encode_fn(x)))(x))  # deterministic: evaluation mode
  assert ofx.nnx_feature_layers(model, (8, 8, 1)) == {"conv": (8, 8, 8), "norm": (8, 8, 8)}
  cam = jax.jit(lambda x: ofx.layer_grad_cam(ofx.nnx_probe(model, "norm"), x, labels))(x)
  # Grad-CAM at the norm layer is Grad-CAM on the model cut there: a = norm(conv(x)), head(a) = classify(relu(a)).
  evaluating = nnx.view(model, deterministic=True, use_running_average=True)
  expected = ofx.grad_cam(lambda x: evaluating.norm(evaluating.conv(x)),
                          lambda a: evaluating.classify(nnx.relu(a)), x, labels)
  chex.assert_shape(cam, (4, 8, 8))
  assert float(jnp.max(expected)) > 0
  np.testing.assert_allclose(cam, expected, rtol=1e-5, atol=1e-6)
  assert not model.norm.use_running_average  # the probe ran on a copy
  with pytest.raises(ValueError, match="not a submodule"):
    ofx.nnx_probe(model, "nowhere")(x, 0.0)


def test_the_train_step_takes_a_bare_linen_module_and_an_nnx_module():
  """``make_train_step`` on a user's Linen module (wrapped in ``models.Model``: no ``train`` keyword needed) and on an
  NNX module (``models.NNXModel``): a few SGDrop steps lower the loss on a fixed batch, batch statistics move."""
  import optax
  from overfocus_jax.models import Model, NNXModel
  from overfocus_jax.train import state as state_lib
  from overfocus_jax.train.step import make_train_step
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 1))
  batch = {"image": x, "label": jnp.arange(16, dtype=jnp.int32) % 10}
  for model in (Model(TinyLinen(), "tiny_linen"), NNXModel(TinyNNX(nnx.Rngs(0)), "tiny_nnx")):
    tx = optax.adam(1e-2)
    regularizer = ofx.sgdrop(ramp_steps=0, batch_fraction=1.0)
    state = state_lib.create_train_state(model, tx, seed=0, input_shape=(8, 8, 1), regularizer=regularizer)
    step = jax.jit(make_train_step(model, tx, regularizer=regularizer))
    losses = []
    start_stats = state.batch_stats
    for _ in range(20):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], (model.name, losses)
    assert 0 < float(metrics["sgdrop_dropped_fraction"]) < 1
    if model.name == "tiny_nnx":
      assert not np.allclose(state.batch_stats["norm"]["mean"], start_stats["norm"]["mean"])


def test_the_public_docstring_examples_run():
  """Every ``>>>`` example in the docstrings of ``ofx.__all__`` (the API reference shows them) gives its output."""
  import doctest
  finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  examples = [test for name in ofx.__all__ for test in finder.find(getattr(ofx, name), name) if test.examples]
  assert examples, "no docstring example found"
  for test in examples:
    runner.run(test)
  assert runner.summarize(verbose=False).failed == 0
