"""SGDrop and RSC as pure functions: exact masks, hand-built examples, gradients, the EMA teacher, jit, bad
arguments. Nothing here reads a config or runs the train loop (test_regularizers_in_training.py does)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax.challenge import TeacherInputs, attribution, masks, rsc, sgdrop


# The paper's unit and batch (element units, every sample), on which the hand-built cases below are written; the
# library's defaults (spatial units, half of each batch) are tested in test_sgdrop_defaults.py.
PAPER_SETTING = dict(rule="topk", granularity="element", batch_fraction=1.0, ramp_steps=0)


def paper_sgdrop(**fields):
  return sgdrop.sgdrop(**{**PAPER_SETTING, **fields})


def apply_once(regularizer, classify_fn, z, labels, key, count=0, variables=None):
  """One ``apply`` from the regularizer's initial state at step ``count``: ``(z̃, metrics)``."""
  state = regularizer.init(variables)
  if count:
    state = {**state, "count": jnp.int32(count)}
  out, _, metrics = regularizer.apply(state, classify_fn, z, labels, key)
  return out, metrics


def linear_pool_head(weights):
  """ψ(z) = mean_hw(z) @ W: ∂ψ_c/∂z = W[:, c] / HW at every position (a closed form for the tests)."""
  return lambda z: jnp.mean(z, axis=(1, 2)) @ weights


# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("fraction, scores, count, dropped", [
    # fraction, one row of N scores, ⌈fraction·N⌉ and the indices of the highest scores, all worked out by hand
    (0.0, [3, 1, 4, 1, 5, 9, 2, 6, 5], 0, []),                     # ⌈0⌉ = 0 of 9
    (0.01, [2, 7, 1, 8, 2], 1, [3]),                               # ⌈0.05⌉ = 1 of 5: the 8
    (0.1, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], 1, [5]),                 # 0.1·10 = 1 of 10: the 9
    (0.3, [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], 3, [4, 5, 7]),           # 3 of 10: 9, 6, then the first of the tied 5s
    (0.25, [5, 0, 5, 2, 5, 1, 3], 2, [0, 2]),                      # ⌈1.75⌉ = 2 of 7: the lower two of three tied 5s
    (0.5, [1, 1, 1, 1, 1, 1, 1], 4, [0, 1, 2, 3]),                 # ⌈3.5⌉ = 4 of 7, all tied: the lowest indices
    (1 / 3, [0, 1, 2, 0, 1, 2, 0, 1, 2], 3, [2, 5, 8]),            # 9/3 = 3 of 9: the three 2s
    (0.99, [4, 4], 2, [0, 1]),                                     # ⌈1.98⌉ = 2 of 2: everything
    (0.5, [7], 1, [0]),                                            # ⌈0.5⌉ = 1 of 1
    # float noise: 0.28·25 is 7.000000000000001 in binary, yet 7 are dropped, not 8: the five 4s, then two 3s
    (0.28, [0, 1, 2, 3, 4] * 5, 7, [3, 4, 8, 9, 14, 19, 24]),
    (1 / 3, list(range(49)), 17, list(range(32, 49))),             # ⌈16.33⌉ = 17 of a 7×7 map (the official ⌈HW/3⌉)
])
def test_top_k_drop_mask_drops_exactly_ceil(fraction, scores, count, dropped):
  assert len(dropped) == count  # the table itself
  expected = np.ones((2, len(scores)), np.float32)
  expected[:, dropped] = 0.0
  # two identical rows, each with its own top k (one top 2k over the whole batch would drop unevenly)
  mask = masks.top_k_drop_mask(jnp.array([scores, scores], jnp.float32), fraction)
  np.testing.assert_array_equal(np.asarray(mask), expected)


def test_drop_count_is_robust_to_float_noise():
  assert masks.drop_count(0.28, 25) == 7  # 0.28 * 25 == 7.000000000000001 in binary
  assert masks.drop_count(1 / 3, 49) == 17  # the official ⌈HW/3⌉ on a 7×7 map
  assert masks.drop_count(1 / 3.2, 512) == 160  # the official ⌈C/3.2⌉ on ResNet-18
  with pytest.raises(ValueError, match="fraction"):
    masks.drop_count(1.0, 10)


def test_ties_are_broken_towards_the_lower_index():
  mask = masks.top_k_drop_mask(jnp.array([[1.0, 5.0, 5.0, 5.0, 0.0]]), 0.4)  # k = 2 of three tied fives
  np.testing.assert_array_equal(mask, [[1, 0, 0, 1, 1]])


# ------------------------------------------------------------------------------------------------ SGDrop


def test_attribution_is_relu_of_gradient_times_activation():
  weights = jnp.array([[1.0, -2.0], [3.0, 0.5]])  # C=2 channels, 2 classes
  z = jnp.array([[[[1.0, 2.0], [-1.0, 1.0]]]])  # (1, 1, 2, 2): HW = 2
  got = attribution.gradient_times_activation(linear_pool_head(weights), z, jnp.array([1]))
  grad = weights[:, 1] / 2  # [-1, 0.25]
  np.testing.assert_allclose(got, np.maximum(np.asarray(z) * np.asarray(grad), 0))


def test_sgdrop_drops_the_most_salient_units_hand_built():
  # one channel, 2×2 positions; the head weights every position equally, so A = ReLU(z / 4)
  weights = jnp.array([[1.0, -1.0]])
  z = jnp.array([[[[0.1], [4.0]], [[2.0], [-3.0]]]])  # (1, 2, 2, 1)
  out, metrics = apply_once(paper_sgdrop(rate=0.5), linear_pool_head(weights), z, jnp.array([0]),
                            jax.random.PRNGKey(0))
  np.testing.assert_allclose(out[0, :, :, 0], [[0.1, 0.0], [0.0, -3.0]])  # 4.0 and 2.0 dropped
  assert float(metrics["sgdrop_dropped_fraction"]) == 0.5


@pytest.mark.parametrize("granularity,shape", [("element", (4, 3, 3, 8)), ("spatial", (4, 3, 3, 1)),
                                                ("channel", (4, 1, 1, 8))])
def test_sgdrop_granularity_mask_shapes_and_counts(granularity, shape):
  attr = jax.random.uniform(jax.random.PRNGKey(1), (4, 3, 3, 8))
  mask = sgdrop.saliency_mask(attr, 0.25, granularity, rule="topk")
  chex.assert_shape(mask, shape)
  units = int(np.prod(shape[1:]))
  np.testing.assert_array_equal(np.sum(np.asarray(mask).reshape(4, -1) == 0, axis=1), math.ceil(0.25 * units))


def test_sgdrop_spatial_sums_attribution_over_channels():
  attr = jnp.zeros((1, 2, 2, 3)).at[0, 1, 0, :].set(1.0).at[0, 0, 1, 0].set(2.5)  # sums: (1,0)=3, (0,1)=2.5
  mask = sgdrop.saliency_mask(attr, 0.25, "spatial", rule="topk")
  np.testing.assert_array_equal(mask[0, :, :, 0], [[1, 1], [0, 1]])


def test_no_gradient_flows_through_the_mask():
  weights = jax.random.normal(jax.random.PRNGKey(2), (8, 10))
  z = jax.random.normal(jax.random.PRNGKey(3), (4, 3, 3, 8))
  labels = jnp.array([0, 1, 2, 3])
  reg = paper_sgdrop(rate=0.3, granularity="element")
  cotangent = jax.random.normal(jax.random.PRNGKey(4), z.shape)
  out, _ = apply_once(reg, linear_pool_head(weights), z, labels, jax.random.PRNGKey(0))
  grad = jax.grad(lambda zz: jnp.sum(apply_once(reg, linear_pool_head(weights), zz, labels, jax.random.PRNGKey(0))[0]
                                     * cotangent))(z)
  mask = (np.asarray(out) != 0).astype(np.float32)
  np.testing.assert_allclose(grad, np.asarray(cotangent) * mask, rtol=1e-6)  # exactly the mask: nothing else


def test_sgdrop_rescale_and_batch_fraction():
  weights = jax.random.normal(jax.random.PRNGKey(2), (8, 10))
  z = jnp.abs(jax.random.normal(jax.random.PRNGKey(3), (8, 2, 2, 8))) + 0.1
  labels = jnp.arange(8)
  out, metrics = apply_once(paper_sgdrop(rate=0.25, rescale=True, batch_fraction=0.5),
                            linear_pool_head(weights), z, labels, jax.random.PRNGKey(5))
  touched = np.any(np.asarray(out) != np.asarray(z), axis=(1, 2, 3))
  assert touched.sum() == 4 and float(metrics["sgdrop_batch_fraction"]) == 0.5
  kept = (np.asarray(out) != 0) & touched[:, None, None, None]
  np.testing.assert_allclose(np.asarray(out)[kept], np.asarray(z)[kept] / 0.75, rtol=1e-6)


def test_sgdrop_attributes_with_its_ema_teacher_and_moves_it():
  """With ema_decay the state is the teacher; each apply first moves it toward the step's online variables, then
  attributes with the teacher's encoder and head, and masks the online z."""
  z = jnp.ones((1, 1, 1, 2))
  # a toy "model": encode scales the image per channel by variables["params"]["scale"]; classify sums the channels
  encode = lambda variables, x: x * variables["params"]["scale"]
  classify = lambda variables, latent: jnp.sum(latent, axis=(1, 2, 3))[:, None]
  online = {"params": {"scale": jnp.array([5.0, 0.0])}, "batch_stats": {}}    # the online net finds channel 0 salient
  teacher = {"params": {"scale": jnp.array([0.0, 10.0])}, "batch_stats": {}}  # the teacher channel 1
  reg = paper_sgdrop(rate=0.5, ema_decay=0.9)
  assert reg.needs_teacher
  inputs = TeacherInputs(variables=online, images=jnp.ones((1, 1, 1, 2)), encode=encode, classify=classify)
  start = {"count": jnp.int32(0), "ema": teacher}
  out, state, _ = reg.apply(start, lambda latent: classify(online, latent), z, jnp.array([0]),
                            jax.random.PRNGKey(0), teacher=inputs)
  np.testing.assert_allclose(state["ema"]["params"]["scale"], [0.5, 9.0], rtol=1e-6)  # 0.9·teacher + 0.1·online
  np.testing.assert_array_equal(out.ravel(), [1.0, 0.0])  # the teacher's choice: channel 1 dropped
  assert reg.init(online)["ema"]["params"]["scale"].tolist() == [5.0, 0.0]  # starts as a copy
  with pytest.raises(ValueError, match="teacher is needed"):
    reg.apply(start, lambda latent: classify(online, latent), z, jnp.array([0]), jax.random.PRNGKey(0))


def test_sgdrop_predicted_target_attributes_the_argmax():
  weights = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # class c reads channel c
  z = jnp.array([[[[3.0, 1.0]]]])  # predicted class 0, true label 1
  out, _ = apply_once(paper_sgdrop(rate=0.5, target="predicted"), linear_pool_head(weights), z, jnp.array([1]),
                      jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out.ravel(), [0.0, 1.0])
  out, _ = apply_once(paper_sgdrop(rate=0.5, target="true"), linear_pool_head(weights), z, jnp.array([1]),
                      jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out.ravel(), [3.0, 0.0])


@pytest.mark.parametrize("kwargs", [dict(rate=1.0), dict(rate=-0.1), dict(granularity="pixel"),
                                    dict(target="other"), dict(batch_fraction=0.0), dict(rule="top_k"),
                                    dict(rule="mass", mass=0.0), dict(rule="mass", mass=1.2),
                                    dict(rule="mass", rate=0.0), dict(ramp_steps=-1.0)])
def test_sgdrop_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    sgdrop.sgdrop(**{"ramp_steps": 0, **kwargs})


# ------------------------------------------------------------------------------------------------ the mass rule


@pytest.mark.parametrize("share, cap, scores, dropped", [
    # share m, cap c, one row of scores, and the indices dropped, worked out by hand (totals in the comments)
    (0.5, 0.3, [0, 5, 3, 2, 0, 0, 0, 0, 0, 0], [1]),          # total 10: the 5 alone holds half
    (0.5, 0.3, [4, 4, 1, 1, 0, 0, 0, 0, 0, 0], [0, 1]),       # 4 < 5, 4 + 4 ≥ 5: both 4s
    (0.5, 0.3, [1] * 10, [0, 1, 2]),                          # uniform: half needs 5, the cap ⌈3⌉ stops at 3
    (1.0, 0.5, [0, 5, 3, 2, 0, 0, 0, 0, 0, 0], [1, 2, 3]),    # all of it: every positive unit, no zero one
    (0.5, 0.3, [0] * 10, []),                                 # no attribution: nothing to drop
    (0.6, 0.3, [2, 0, 2, 0, 2, 0, 0, 0, 0, 0], [0, 2]),       # total 6: ties, lower index first; 2 + 2 ≥ 3.6
    (0.5, 0.3, [-3, 2, 0, 2, 0, 0, 0, 0, 0, 0], [1]),         # negative scores count as 0: total 4, the first 2
    (0.25, 0.1, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0], [0]),         # total 45: a quarter needs 9 + 8, the cap ⌈1⌉ is 1
    (1.0, 0.9, [5], []),                                      # one unit (a 1×1 map): never emptied
    (1.0, 0.9, [5, 1], [0]),                                  # ⌈0.9 · 2⌉ = 2, but one unit always stays
])
def test_mass_drop_mask_hand_built(share, cap, scores, dropped):
  expected = np.ones((1, len(scores)), np.float32)
  expected[0, dropped] = 0.0
  np.testing.assert_array_equal(masks.mass_drop_mask(jnp.array([scores], jnp.float32), share, cap), expected)


def test_mass_rule_never_empties_a_one_by_one_map():
  """Spatial units on a 1×1 map: the exact-count rule drops the only position; the mass rule keeps it, whatever its
  share and cap."""
  weights = jnp.ones((8, 1))
  z = jnp.arange(1.0, 9.0).reshape(1, 1, 1, 8)
  mass_out, metrics = apply_once(paper_sgdrop(rule="mass", mass=1.0, rate=0.9, granularity="spatial"),
                                 linear_pool_head(weights), z, jnp.array([0]), jax.random.PRNGKey(0))
  np.testing.assert_array_equal(mass_out, z)
  assert float(metrics["sgdrop_dropped_fraction"]) == 0.0
  quantile_out, _ = apply_once(paper_sgdrop(rule="topk", rate=0.1, granularity="spatial"),
                               linear_pool_head(weights), z, jnp.array([0]), jax.random.PRNGKey(0))
  assert not np.any(np.asarray(quantile_out))


def test_mass_rule_in_sgdrop_follows_the_concentration_not_the_unit_count():
  """One salient unit: the mass rule drops it alone; the exact-count rule at the same ρ drops ⌈ρN⌉ units."""
  weights = jnp.ones((8, 1))  # one class reading every channel
  z = jnp.full((1, 1, 1, 8), 0.01).at[0, 0, 0, 3].set(10.0)  # channel 3 carries almost all the evidence
  mass_out, metrics = apply_once(paper_sgdrop(rule="mass", mass=0.5, rate=0.5), linear_pool_head(weights), z,
                                 jnp.array([0]), jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(mass_out).ravel() == 0), [3])
  assert float(metrics["sgdrop_dropped_fraction"]) == 1 / 8
  quantile_out, _ = apply_once(paper_sgdrop(rule="topk", rate=0.5), linear_pool_head(weights), z,
                               jnp.array([0]), jax.random.PRNGKey(0))
  assert int(np.sum(np.asarray(quantile_out) == 0)) == 4
  # rescaled, the mass rule scales each sample's kept units by N / kept: here 8 / 7
  rescaled, _ = apply_once(paper_sgdrop(rule="mass", mass=0.5, rate=0.5, rescale=True), linear_pool_head(weights), z,
                           jnp.array([0]), jax.random.PRNGKey(0))
  np.testing.assert_allclose(np.asarray(rescaled).ravel()[[0, 7]], [0.01 * 8 / 7] * 2, rtol=1e-6)


@pytest.mark.parametrize("rule", ["topk", "mass"])
def test_ramp_grows_the_drop_from_nothing_over_the_ramp(rule):
  """A 10-step ramp: step 0 drops ⌈0.1·k⌉ units (topk) or a tenth of the share (mass), step 4 half, step 9 and later
  exactly what the unramped rule drops."""
  weights = jnp.ones((10, 1))
  z = jnp.arange(1.0, 11.0).reshape(1, 1, 1, 10)  # attribution ∝ z: unit 9 the largest
  head = linear_pool_head(weights)
  reg = paper_sgdrop(rule=rule, rate=0.5, mass=1.0, ramp_steps=10)
  dropped = {}
  for step in (0, 4, 9, 25):
    out, _ = apply_once(reg, head, z, jnp.array([0]), jax.random.PRNGKey(0), count=step)
    dropped[step] = int(np.sum(np.asarray(out) == 0))
  unramped, _ = apply_once(paper_sgdrop(rule=rule, rate=0.5, mass=1.0), head, z, jnp.array([0]),
                           jax.random.PRNGKey(0))
  # topk: k = ⌈0.5·10⌉ = 5, scaled by 0.1, 0.5, 1 → 1, 3 (⌈2.5⌉), 5 units. mass (m = 1, cap 5), of a total 55:
  # share 0.1 → 5.5, the 10 alone; share 0.5 → 27.5, 10 + 9 + 8 = 27 falls short, so 4 units; share 1 → the cap, 5
  assert dropped == ({0: 1, 4: 3, 9: 5, 25: 5} if rule == "topk" else {0: 1, 4: 4, 9: 5, 25: 5})
  assert int(np.sum(np.asarray(unramped) == 0)) == 5
  # rescaled during the ramp, the kept units are scaled by N / kept: at step 0 one unit is dropped, so by 10 / 9
  rescaled, _ = apply_once(paper_sgdrop(rule=rule, rate=0.5, mass=1.0, ramp_steps=10, rescale=True), head, z,
                           jnp.array([0]), jax.random.PRNGKey(0))
  np.testing.assert_allclose(np.asarray(rescaled).ravel()[0], 1.0 * 10 / 9, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ RSC


def test_rsc_spatial_and_channel_masks_hand_built():
  weights = jnp.array([[2.0], [1.0], [-1.0]])  # 3 channels, 1 class: mean_hw(grad) = W / HW
  z = jnp.zeros((1, 3, 1, 3)).at[0, 0, 0, 0].set(1.0).at[0, 1, 0, 1].set(5.0).at[0, 2, 0, 2].set(4.0)
  _, grad = attribution.class_score_gradient(linear_pool_head(weights), z, jnp.array([0]))
  # spatial scores Σ_c z·W/3: positions (0)=2/3, (1)=5/3, (2)=-4/3 → ⌈3/3⌉ = 1 dropped: position 1
  np.testing.assert_array_equal(rsc.spatial_mask(z, grad, 1 / 3)[0, :, 0, 0], [1, 0, 1])
  # channel scores W/3: channel 0 highest → ⌈3/3.2⌉ = 1 dropped
  np.testing.assert_array_equal(rsc.channel_mask(grad, 1 / 3.2)[0, 0, 0], [0, 1, 1])


def test_rsc_batch_selection_hand_built():
  p_before = jnp.array([0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
  p_after = jnp.array([0.1, 0.8, 0.5, 0.9, 0.95, 0.2, 0.85, 0.7, 0.3, 0.6])
  # changes (− 1e-4, clamped): .8 .1 .4 0 0 .7 .05 .2 .6 .3; sorted desc: .8 .7 .6 .4 .3 .2 .1 .05 0 0
  # percent 0.3 → position 3 → threshold 0.4 → strictly above: samples 0 (.8), 5 (.7), 8 (.6)
  assert rsc.selection_position(10, 0.3) == 3
  chosen = rsc.most_challenged(rsc.confidence_change(p_before, p_after), 3)
  np.testing.assert_array_equal(np.flatnonzero(chosen), [0, 5, 8])
  assert not np.any(rsc.most_challenged(rsc.confidence_change(p_before, p_before), 5))  # nobody lost confidence
  # Where the reference reads its threshold: Python's round, half to even, in float64 (15 · 0.3 = 4.5 → 4; float32
  # would give 4.5000002 → 5), and inside the batch where it would index past it.
  assert [rsc.selection_position(15, 0.3), rsc.selection_position(5, 0.3), rsc.selection_position(4, 0.9)] == [4, 2, 3]
  assert [rsc.official_percent(s) for s in range(4)] == [3.0 / 10 + (e / 10) * 2.0 / 10 for e in (0, 10, 20, 30)]


def test_rsc_curriculum():
  np.testing.assert_allclose(rsc.curriculum_percent(jnp.array([0, 1, 2, 3, 4])), [0.3, 0.5, 0.7, 0.9, 0.9], rtol=1e-6)
  # The regularizer counts its own steps: with 10-step stages, steps 0-9 at 0.3, 10-19 at 0.5, from 30 on 0.9.
  weights = jax.random.normal(jax.random.PRNGKey(0), (16, 10))
  z = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(1), (8, 4, 4, 16)))
  labels = jnp.arange(8) % 10
  reg = rsc.rsc(curriculum_steps=10)
  apply = jax.jit(lambda state: reg.apply(state, linear_pool_head(weights), z, labels, jax.random.PRNGKey(0)))
  state, seen = reg.init(None), {}
  for step in range(45):
    _, state, metrics = apply(state)
    seen[step] = round(float(metrics["rsc_percent"]), 6)
  assert int(state["count"]) == 45
  assert {seen[s] for s in range(10)} == {0.3} and {seen[s] for s in range(10, 20)} == {0.5}
  assert seen[29] == 0.7 and seen[30] == 0.9 and seen[44] == 0.9
  with pytest.raises(ValueError, match="curriculum_steps is required"):
    rsc.rsc()


def test_rsc_coin_gives_both_modes_and_only_challenged_samples_are_masked():
  weights = jax.random.normal(jax.random.PRNGKey(0), (16, 10))
  z = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(1), (32, 4, 4, 16)))
  labels = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 10)
  reg = jax.jit(lambda key: apply_once(rsc.rsc(batch_percent=0.5), linear_pool_head(weights), z, labels, key))
  modes = []
  for i in range(20):
    out, metrics = reg(jax.random.PRNGKey(i))
    modes.append(float(metrics["rsc_spatial"]))
    touched = np.any(np.asarray(out) != np.asarray(z), axis=(1, 2, 3))
    assert touched.mean() <= 0.5 + 1e-6 and np.isclose(touched.mean(), float(metrics["rsc_batch_masked_fraction"]),
                                                        atol=1 / 32)
  assert set(modes) == {0.0, 1.0}


def count_primitive(jaxpr, name: str) -> int:
  """How many times the primitive ``name`` occurs in ``jaxpr``, nested jaxprs included."""
  return sum((eqn.primitive.name == name) + sum(count_primitive(sub, name)
                                                for sub in jax.extend.core.jaxprs_in_params(eqn.params))
             for eqn in jaxpr.eqns)


def test_rsc_computes_only_the_mask_its_coin_picked():
  """The coin chooses between two branches of a conditional (one sort, or one top-k with the exact-count rule, runs
  per step), and each branch is exactly the hand-built mask of its mode."""
  weights = jax.random.normal(jax.random.PRNGKey(0), (16, 10))
  z = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(1), (8, 4, 4, 16)))
  labels = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 10)
  reg = rsc.rsc(batch_percent=0.5)
  apply = lambda key: apply_once(reg, linear_pool_head(weights), z, labels, key)
  jaxpr = jax.make_jaxpr(apply)(jax.random.PRNGKey(0))
  conds = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "cond"]
  assert len(conds) == 1
  assert all(count_primitive(branch.jaxpr, "sort") == 1 for branch in conds[0].params["branches"])
  topk = jax.make_jaxpr(lambda key: apply_once(rsc.rsc(batch_percent=0.5, rule="topk"), linear_pool_head(weights), z,
                                               labels, key))(jax.random.PRNGKey(0))
  branches = [eqn for eqn in topk.jaxpr.eqns if eqn.primitive.name == "cond"][0].params["branches"]
  assert all(count_primitive(branch.jaxpr, "top_k") == 1 and count_primitive(branch.jaxpr, "sort") == 0
             for branch in branches)
  _, grad = attribution.class_score_gradient(linear_pool_head(weights), z, labels)
  for seed in range(6):
    out, metrics = apply(jax.random.PRNGKey(seed))
    expected = (rsc.spatial_mask(z, grad, 1 / 3) if float(metrics["rsc_spatial"]) else
                rsc.channel_mask(grad, 1 / 3.2)) * jnp.ones_like(z)
    touched = np.any(np.asarray(out) != np.asarray(z), axis=(1, 2, 3))  # the challenged half keeps the mask
    assert touched.any()
    np.testing.assert_array_equal(np.asarray(out)[touched], np.asarray(z * expected)[touched])


def test_rsc_domainbed_masks_top_gradient_features_of_most_changed_samples():
  weights = jnp.array([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # D=3, 2 classes
  features = jnp.array([[1.0, 1.0, 1.0], [0.1, 0.1, 5.0], [2.0, 2.0, 0.0]])
  labels = jnp.array([0, 0, 0])
  reg = rsc.rsc_domainbed(feature_drop=1 / 3, batch_drop=1 / 3)
  assert reg.split == "pooled"
  out, metrics = apply_once(reg, lambda f: f @ weights, features, labels, jax.random.PRNGKey(0))
  # every sample's top-gradient feature is 0 (weight 3). True-class probability before → after masking it:
  # sample 0 σ(3) = .953 → σ(0) = .5 (Δ .45); sample 1 σ(−4.6) → σ(−4.9) (Δ .003); sample 2 σ(8) → σ(2) (Δ .12)
  np.testing.assert_allclose(out, [[0.0, 1.0, 1.0], [0.1, 0.1, 5.0], [2.0, 2.0, 0.0]])
  assert np.isclose(float(metrics["rsc_batch_masked_fraction"]), 1 / 3)
