"""Tests for overfocus_jax.train.step and the schedules of overfocus_jax.train.state."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from overfocus_jax import optimization
from overfocus_jax.data import pipeline
from overfocus_jax.data.sources import load_dataset
from overfocus_jax.models import build_model
from overfocus_jax.train import state as state_lib
from overfocus_jax.challenge import NONE, Regularizer, TeacherInputs, chain, stateless
from overfocus_jax.challenge.base import apply_regularizer
from overfocus_jax.train.step import cross_entropy, make_eval_step, make_train_step

from conftest import tiny_config

BATCH = 32


@pytest.fixture(scope="module")
def setup():
  """A tiny model, SGD with a constant rate, a fresh state and one fixed, unaugmented batch of digits."""
  config = tiny_config(schedule="constant", warmup_epochs=0, learning_rate=0.1)
  dataset = load_dataset("digits")
  model = build_model(config, dataset.num_classes)
  schedule = optimization.make_schedule(config, steps_per_epoch=10)
  tx = optimization.make_optimizer(config, schedule)
  state = state_lib.create_train_state(model, tx, seed=0, input_shape=dataset.image_shape)
  batch = next(pipeline.make_train_iterator(dataset, batch_size=BATCH, seed=0, augment=False))
  batch = jax.tree.map(jnp.asarray, batch)
  return config, model, schedule, tx, state, batch


@pytest.fixture(scope="module")
def jit_step(setup):
  """The plain step, compiled once for the module; it fails any test that would make it trace twice."""
  _, model, schedule, tx, _, _ = setup
  return jax.jit(chex.assert_max_traces(make_train_step(model, tx, schedule=schedule), n=1))


# ----------------------------------------------------------------------------- the step itself


def test_jit_equals_no_jit(setup, jit_step):
  _, model, schedule, tx, state, batch = setup
  eager_state, eager_metrics = make_train_step(model, tx, schedule=schedule)(state, batch)
  jit_state, jit_metrics = jit_step(state, batch)
  chex.assert_trees_all_close(jit_state, eager_state, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(jit_metrics, eager_metrics, rtol=1e-5, atol=1e-6)
  assert set(jit_metrics) == {"loss", "accuracy", "learning_rate"}
  assert int(jit_state.step) == 1
  np.testing.assert_allclose(jit_metrics["learning_rate"], 0.1, rtol=1e-6)
  # The step did something: new parameters, a new PRNG key, and a loss near log(10) for a fresh network.
  assert not np.allclose(jit_state.params["head"]["dense"]["kernel"], state.params["head"]["dense"]["kernel"])
  assert not np.array_equal(jit_state.rng, state.rng)
  assert 1.5 < float(jit_metrics["loss"]) < 4.0


def test_loss_falls_on_a_fixed_batch_with_one_trace(setup, jit_step):
  _, _, _, _, state, batch = setup
  step = jit_step
  losses, accuracies = [], []
  for _ in range(20):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    accuracies.append(float(metrics["accuracy"]))
  assert int(state.step) == 20
  assert losses[-1] < 0.5 * losses[0], losses
  assert accuracies[-1] > accuracies[0]
  chex.assert_tree_all_finite(state)


def test_one_trace_for_several_batches_of_one_shape(setup):
  """Same shapes and dtypes every step (step counter, merged batch stats, optimizer state): no retracing."""
  config, model, schedule, tx, state, _ = setup
  step = jax.jit(chex.assert_max_traces(make_train_step(model, tx, schedule=schedule), n=1))
  iterator = pipeline.make_train_iterator(load_dataset("digits"), batch_size=BATCH, seed=1, augment=True)
  for _ in range(4):
    state, _ = step(state, next(iterator))
  assert int(state.step) == 4
  # A new shape does retrace, which the counter must report (the check can fail).
  with pytest.raises(AssertionError):
    small = jax.tree.map(lambda a: a[:8], next(iterator))
    step(state, small)


def test_batch_stats_after_a_step_are_the_fresh_ones_of_both_halves(setup, jit_step):
  """Regression: the step must keep the encoder's fresh statistics, not the head's stale copy of them."""
  _, model, _, _, state, batch = setup
  new_state, _ = jit_step(state, batch)
  z, encode_state = model.encode(state.variables, batch["image"], train=True)
  _, classify_state = model.classify(state.variables, z, train=True)
  chex.assert_trees_all_close(new_state.batch_stats["encoder"], encode_state["batch_stats"]["encoder"],
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(new_state.batch_stats["head"], classify_state["batch_stats"]["head"],
                              rtol=1e-5, atol=1e-6)
  old = state.batch_stats["encoder"]["stage1_block1"]["bn1"]["mean"]
  assert not np.allclose(new_state.batch_stats["encoder"]["stage1_block1"]["bn1"]["mean"], old)


# ----------------------------------------------------------------------------- regularizers


@stateless
def zero_z(classify_fn, z, labels, key):
  del classify_fn, labels, key
  return jnp.zeros_like(z), {"z_norm_in": jnp.sum(jnp.abs(z))}


def test_user_regularizer_changes_what_the_head_sees(setup):
  """Zeroing z leaves the head with BN bias → ReLU → pool → dense: every row gets relu(β)·W + b."""
  config, model, _, _, state, batch = setup
  config = tiny_config(schedule="constant", warmup_epochs=0, learning_rate=0.1, weight_decay=0.0)
  tx = optimization.make_optimizer(config, optax.constant_schedule(0.1))
  state = state_lib.create_train_state(model, tx, seed=0, input_shape=(8, 8, 1))
  rng = np.random.default_rng(0)
  head = state.params["head"]
  head = {"bn": {**head["bn"], "bias": jnp.asarray(rng.normal(0, 1, head["bn"]["bias"].shape), jnp.float32)},
          "dense": {**head["dense"], "bias": jnp.asarray(rng.normal(0, 1, head["dense"]["bias"].shape), jnp.float32)}}
  state = state.replace(params={**state.params, "head": head}, opt_state=tx.init({**state.params, "head": head}))

  new_state, metrics = jax.jit(make_train_step(model, tx, regularizer=zero_z))(state, batch)

  row = np.maximum(np.asarray(head["bn"]["bias"]), 0) @ np.asarray(head["dense"]["kernel"]) + np.asarray(
      head["dense"]["bias"])
  log_probs = row - np.log(np.sum(np.exp(row)))
  labels = np.asarray(batch["label"])
  np.testing.assert_allclose(metrics["loss"], -np.mean(log_probs[labels]), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(labels == np.argmax(row)), rtol=1e-6)
  assert float(metrics["z_norm_in"]) > 0  # the regularizer's metric is reported, and it saw the real z
  # No gradient reaches the encoder (and no weight decay): its parameters stay exactly; the head's move.
  chex.assert_trees_all_equal(new_state.params["encoder"], state.params["encoder"])
  assert not np.allclose(new_state.params["head"]["dense"]["bias"], head["dense"]["bias"])
  # Without the regularizer the same step moves the encoder.
  plain_state, plain_metrics = jax.jit(make_train_step(model, tx))(state, batch)
  assert not np.allclose(plain_state.params["encoder"]["stem"]["kernel"], state.params["encoder"]["stem"]["kernel"])
  assert not np.isclose(plain_metrics["loss"], metrics["loss"])


def test_regularizer_gets_its_teacher_inputs_and_an_inference_mode_head(setup):
  _, model, schedule, tx, state, batch = setup

  def apply(state, classify_fn, z, labels, key, teacher=None):
    logits = classify_fn(z)
    z_again = teacher.encode(teacher.variables, teacher.images)  # the model in inference mode, at the step's variables
    return z, state + 1, {"seen_count": state, "logit_sum": jnp.sum(logits),
                          "label_sum": jnp.sum(labels), "image_sum": jnp.sum(teacher.images),
                          "z_gap": jnp.max(jnp.abs(z_again - model.encode(state_vars, batch["image"])[0]))}

  state_vars = state.variables
  probe = Regularizer(init=lambda variables: jnp.int32(7), apply=apply, needs_teacher=True)
  state = state.replace(regularizer_state=probe.init(state.variables))
  new_state, metrics = jax.jit(make_train_step(model, tx, schedule=schedule, regularizer=probe))(state, batch)
  assert int(metrics["seen_count"]) == 7 and int(new_state.regularizer_state) == 8  # its own counter, carried
  np.testing.assert_allclose(metrics["image_sum"], jnp.sum(batch["image"]), rtol=1e-5)
  assert float(metrics["z_gap"]) < 1e-4
  assert int(metrics["label_sum"]) == int(np.sum(batch["label"]))
  # classify_fn is the head at the current variables in inference mode (running statistics), on the train-mode z.
  z, _ = model.encode(state.variables, batch["image"], train=True)
  expected = jnp.sum(model.classify(state.variables, z, train=False)[0])
  np.testing.assert_allclose(metrics["logit_sum"], expected, rtol=1e-4)
  train_mode = jnp.sum(model.classify(state.variables, z, train=True)[0])
  assert not np.isclose(train_mode, expected, rtol=1e-4)


def test_chain_applies_in_order_and_merges_metrics_and_states():
  def double(classify_fn, z, labels, key):
    return 2 * z, {"first": jnp.sum(classify_fn(z)), "shared": 1.0, "key1": key, "mask": jnp.full((2, 1, 1, 1), 2.0)}

  def count_calls(state, classify_fn, z, labels, key):  # a stateful regularizer: counts its calls
    return z + 1, state + 1, {"second": jnp.sum(z), "shared": 2.0, "key2": key, "labels": jnp.sum(labels)}

  add_one = Regularizer(init=lambda variables: jnp.zeros((), jnp.int32), apply=count_calls)
  classify_fn = lambda z: jnp.mean(z, axis=(1, 2)) * 10
  z = jnp.ones((2, 2, 2, 3))
  chained = chain(stateless(double), add_one)
  states = chained.init({})
  assert len(states) == 2 and states[0] == () and int(states[1]) == 0
  out, states, metrics = chained.apply(states, classify_fn, z, jnp.array([1, 4]), jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out, 3.0)  # (1 * 2) + 1; the other order would give 4
  assert int(states[1]) == 1                  # each regularizer's state is its own
  assert set(metrics) == {"first", "second", "shared", "key1", "key2", "labels"}  # no "mask": one member has none
  assert float(metrics["first"]) == 60.0     # classify_fn of the original z
  assert float(metrics["second"]) == 48.0    # the second sees the first's output
  assert metrics["shared"] == 2.0            # later regularizers win on clashing names
  assert int(metrics["labels"]) == 5
  assert not np.array_equal(metrics["key1"], metrics["key2"])  # independent randomness
  swapped, _, _ = chain(add_one, stateless(double)).apply((0, ()), classify_fn, z, jnp.array([1, 4]),
                                                          jax.random.PRNGKey(0))
  np.testing.assert_array_equal(swapped, 4.0)
  _, _, both = chain(stateless(double), stateless(double)).apply(((), ()), classify_fn, z, jnp.array([1, 4]),
                                                                 jax.random.PRNGKey(0))
  np.testing.assert_array_equal(both["mask"], 4.0)  # every member reports a mask: their product
  identity, state, empty = NONE.apply(NONE.init({}), classify_fn, z, None, None)
  assert identity is z and state == () and empty == {}


def test_regularizer_state_is_carried_from_step_to_step(setup):
  """A user's stateful regularizer: the step stores its new state in the train state and hands it back next step."""
  _, model, schedule, tx, _, batch = setup

  def apply(state, classify_fn, z, labels, key):
    return z, {"calls": state["calls"] + 1, "z_sum": state["z_sum"] + jnp.sum(z)}, {"calls": state["calls"]}

  counter = Regularizer(init=lambda variables: {"calls": jnp.zeros((), jnp.int32), "z_sum": jnp.zeros(())},
                        apply=apply)
  state = state_lib.create_train_state(model, tx, seed=0, input_shape=(8, 8, 1), regularizer=counter)
  train_step = jax.jit(make_train_step(model, tx, schedule=schedule, regularizer=counter))
  for expected_calls in range(3):
    state, metrics = train_step(state, batch)
    assert int(metrics["calls"]) == expected_calls
  assert int(state.regularizer_state["calls"]) == 3 and float(state.regularizer_state["z_sum"]) != 0


# ----------------------------------------------------------------------------- losses


def test_cross_entropy_by_hand():
  logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -1.0, 0.5]])
  labels = jnp.array([2, 0, 1])
  log_z = [math.log(math.e + math.e ** 2 + math.e ** 3), math.log(3.0), math.log(math.e ** 5 + math.e ** -1 +
                                                                                math.e ** 0.5)]
  log_p = np.array([[1 - log_z[0], 2 - log_z[0], 3 - log_z[0]],
                    [-log_z[1]] * 3,
                    [5 - log_z[2], -1 - log_z[2], 0.5 - log_z[2]]])
  np.testing.assert_allclose(cross_entropy(logits, labels), [-log_p[0, 2], -log_p[1, 0], -log_p[2, 1]], rtol=1e-6)
  # Label smoothing 0.3 over 3 classes: target 0.7 + 0.1 on the label, 0.1 elsewhere.
  targets = np.full((3, 3), 0.1)
  targets[np.arange(3), np.asarray(labels)] += 0.7
  np.testing.assert_allclose(cross_entropy(logits, labels, 0.3), -np.sum(targets * log_p, axis=1), rtol=1e-6)
  assert cross_entropy(logits, labels).shape == (3,)


def test_label_smoothing_reaches_the_train_step(setup, jit_step):
  _, model, schedule, tx, state, batch = setup
  _, plain = jit_step(state, batch)
  _, smoothed = jax.jit(make_train_step(model, tx, schedule=schedule, label_smoothing=0.2))(state, batch)
  logits, _ = model.apply(state.variables, batch["image"], train=True)
  np.testing.assert_allclose(smoothed["loss"], jnp.mean(cross_entropy(logits, batch["label"], 0.2)), rtol=1e-5)
  assert not np.isclose(plain["loss"], smoothed["loss"])


# ----------------------------------------------------------------------------- eval step


def test_eval_step_masks_padded_rows(setup):
  _, model, _, _, state, batch = setup
  images = np.asarray(batch["image"][:4]).copy()
  labels = np.asarray(batch["label"][:4]).copy()
  images[2:] = 50.0  # padding rows with absurd inputs and labels that would count if unmasked
  labels[2:] = 0
  mask = np.array([1, 1, 0, 0], np.float32)
  sums = jax.jit(make_eval_step(model))(state, {"image": images, "label": labels, "mask": mask})
  logits, _ = model.apply(state.variables, images[:2], train=False)
  log_p = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(sums["loss_sum"], -log_p[np.arange(2), labels[:2]].sum(), rtol=1e-5)
  assert float(sums["correct"]) == float(np.sum(np.argmax(logits, -1) == labels[:2]))
  assert float(sums["count"]) == 2.0
  unmasked = jax.jit(make_eval_step(model))(state, {"image": images, "label": labels, "mask": np.ones(4, np.float32)})
  assert float(unmasked["count"]) == 4.0 and float(unmasked["loss_sum"]) > float(sums["loss_sum"])


# ----------------------------------------------------------------------------- schedules


def lrs(schedule, steps):
  return np.array([float(schedule(jnp.asarray(s, jnp.int32))) for s in steps])


def test_cosine_schedule_with_warmup():
  config = tiny_config(schedule="cosine", num_epochs=10, warmup_epochs=2, learning_rate=0.1)
  schedule = optimization.make_schedule(config, steps_per_epoch=10)  # 100 steps, 20 of warm-up
  values = lrs(schedule, range(101))
  np.testing.assert_allclose(values[0], 0.1 / 20, rtol=1e-6)          # small at step 0
  np.testing.assert_allclose(values[10], 0.005 + 0.095 * 10 / 20, rtol=1e-6)
  np.testing.assert_allclose(values[20], 0.1, rtol=1e-6)              # the peak, right after warm-up
  assert int(np.argmax(values)) == 20 and values.max() <= 0.1 + 1e-7
  assert np.all(np.diff(values[:21]) > 0) and np.all(np.diff(values[20:]) <= 1e-9)
  np.testing.assert_allclose(values[60], 0.1 * 0.5 * (1 + math.cos(math.pi * 40 / 80)), rtol=1e-5)
  assert values[99] < 1e-3 and abs(values[100]) < 1e-7               # ~0 at the end


def test_cosine_schedule_without_warmup_starts_at_the_peak():
  config = tiny_config(schedule="cosine", num_epochs=2, warmup_epochs=0, learning_rate=0.2)
  values = lrs(optimization.make_schedule(config, steps_per_epoch=5), range(11))
  np.testing.assert_allclose(values[0], 0.2, rtol=1e-6)
  np.testing.assert_allclose(values[5], 0.1, rtol=1e-5)
  assert abs(values[10]) < 1e-7


@pytest.mark.parametrize("warmup_epochs", [0, 1])
def test_step_schedule_decays_at_the_given_epochs(warmup_epochs):
  config = tiny_config(schedule="step", num_epochs=10, warmup_epochs=warmup_epochs, learning_rate=0.1,
                       step_decay_epochs=(3, 6), step_decay_factor=0.1)
  values = lrs(optimization.make_schedule(config, steps_per_epoch=10), [0, 10, 29, 30, 59, 60, 99])
  first = 0.1 if warmup_epochs == 0 else 0.01  # linear warm-up starts at base / warmup_steps
  np.testing.assert_allclose(values, [first, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)


def test_constant_schedule_after_warmup():
  config = tiny_config(schedule="constant", num_epochs=3, warmup_epochs=1, learning_rate=0.05)
  values = lrs(optimization.make_schedule(config, steps_per_epoch=4), range(12))
  # linear from base / warmup_steps = 0.0125 up to 0.05 over 4 steps
  np.testing.assert_allclose(values[:4], [0.0125, 0.021875, 0.03125, 0.040625], rtol=1e-6)
  np.testing.assert_allclose(values[4:], 0.05, rtol=1e-6)


# ----------------------------------------------------------------------------- dtype plumbing


@pytest.mark.parametrize("name", ["resnet", "resnet18", "attention", "focus", "corner"])
def test_config_dtype_reaches_every_model_and_keeps_parameters_and_logits_float32(name):
  """config.dtype=bfloat16: the latent map is computed in bf16; parameters and logits stay float32."""
  from overfocus_jax import config as config_lib
  from overfocus_jax.models import MODELS
  assert name in MODELS
  config = config_lib.build_config(None, [("model", name), ("dtype", "bfloat16")])
  model = build_model(config, 10)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), (28, 28, 1)))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
  x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
  z = jax.eval_shape(lambda v, x: model.encode(v, x, train=False)[0], variables, x)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False)[0], variables, x)
  assert z.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_a_bfloat16_train_step_runs_and_keeps_float32_state(setup):
  config = tiny_config(schedule="constant", warmup_epochs=0, learning_rate=0.1, dtype="bfloat16")
  _, _, _, _, _, batch = setup
  model = build_model(config, 10)
  tx = optimization.make_optimizer(config, optax.constant_schedule(0.1))
  state = state_lib.create_train_state(model, tx, seed=0, input_shape=(8, 8, 1))
  new_state, metrics = jax.jit(make_train_step(model, tx))(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  chex.assert_trees_all_equal_dtypes(new_state.params, state.params)
  chex.assert_trees_all_equal_dtypes(new_state.batch_stats, state.batch_stats)
  assert {leaf.dtype for leaf in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", ["sgdrop", "rsc", "rsc_domainbed"])
def test_bfloat16_regularizers_rank_in_float32_and_keep_the_latent_dtype(name):
  """With a bf16 model, the head's gradient and SGDrop's attribution are float32 (ties and rounding of bf16 scores
  would change which units are dropped); the masked map keeps the model's dtype."""
  from overfocus_jax.challenge.attribution import gradient_times_activation
  from overfocus_jax.regularizers import build_regularizer
  from overfocus_jax.train import experiment
  config = tiny_config(dtype="bfloat16", regularizer__name=name)
  exp = experiment.build_experiment(config)
  split = build_regularizer(config, 22).split
  encode, classify = exp.model.split(split)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 1)), jnp.float32)
  labels = jnp.arange(16) % 10
  z, _ = encode(exp.state.variables, x, train=False)
  classify_fn = lambda latent: classify(exp.state.variables, latent, train=False)[0]
  assert z.dtype == jnp.bfloat16
  if split == "latent":
    assert gradient_times_activation(classify_fn, z, labels).dtype == jnp.float32
  regularizer = build_regularizer(config, 22)
  teacher = TeacherInputs(variables=exp.state.variables, images=x, encode=lambda v, x: encode(v, x, train=False)[0],
                          classify=lambda v, latent: classify(v, latent, train=False)[0])
  state = exp.state.regularizer_state
  if "count" in state:  # past SGDrop's ramp
    state = {**state, "count": jnp.int32(100)}
  masked, _, _ = apply_regularizer(regularizer, state, classify_fn, z, labels, jax.random.PRNGKey(0), teacher)
  assert masked.dtype == jnp.bfloat16 and masked.shape == z.shape
  assert bool(jnp.any(masked != z))  # it did drop something
