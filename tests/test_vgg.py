"""Tests for overfocus_jax.models.vgg (VGG-16): shapes at several input sizes, the pools that small images skip,
torchvision's adaptive pool and parameter counts, the encode/classify and pooled splits, the batch-norm state,
bfloat16, training with and without regularizers, and the one-line config errors."""

import dataclasses
import functools
import json
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax import optimization
from overfocus_jax import config as config_lib
from overfocus_jax.models import Model, build_model, merge_batch_stats, parameter_count, vgg

from conftest import (abstract_variables, assert_one_line_error, assert_split_is_exact, assert_the_experiment_accepts,
                      digits_config, run_cli)

# Widths 4-4, 8-8, 16×3, 32×3, 32×3 (1/16 of VGG-16's), max-pools after the first two blocks only: digits' 8×8
# images leave a 2×2×32 latent map, so spatial SGDrop and RSC have positions to drop.
TINY_VGG = dict(vgg__width=0.0625, vgg__max_pools=2)
TINY_VGG_ARGS = tuple(f"--config.{k.replace('__', '.')}={v}" for k, v in TINY_VGG.items())


def make_config(**fields):
  return digits_config("vgg16", **{**TINY_VGG, **fields})


def make_model(num_classes=10, **fields):
  return build_model(make_config(**fields), num_classes)


def numpy_variables(model, input_shape, seed=0, *, like_init=False):
  """Variables of the model's structure drawn with numpy: no random-number programs to compile (compiling VGG's
  ``init`` takes 5–25 s on a loaded 2-core machine, more than the tests that use it).

  ``like_init``: the distributions ``init`` draws from (torchvision's: He normal with fan-out for the convs, N(0,
  0.01) for the dense layers, zero biases, batch norm at the identity). Otherwise everything random, with running
  statistics away from (0, 1) so that inference mode really uses them.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if name.endswith("['kernel']") and like_init:
      std = np.sqrt(2.0 / (np.prod(shape[:2]) * shape[-1])) if len(shape) == 4 else 0.01
      value = rng.normal(0.0, std, shape)
    elif name.endswith("['kernel']"):
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    elif name.endswith("['scale']") or name.endswith("['var']"):
      value = np.ones(shape) if like_init else rng.uniform(0.5, 2.0, shape)
    else:  # biases and running means
      value = np.zeros(shape) if like_init else rng.normal(0.0, 0.1, shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, input_shape))


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("input_shape, max_pools, head, z_hw", [
    ((8, 8, 1), 5, "gap", (1, 1)),        # 8 → 4 → 2 → 1, then two pools skipped
    ((28, 28, 1), 5, "classic", (1, 1)),  # 28 → 14 → 7 → 3 → 1 → 1
    ((28, 28, 1), 3, "gap", (3, 3)),      # the shipped config's 3×3 map
    ((32, 32, 3), 5, "gap", (1, 1)),
    ((1, 1, 1), 5, "classic", (1, 1)),    # no pool at all
    ((5, 13, 2), 5, "gap", (1, 1)),       # each side pools on its own: 5 → 2 → 1; 13 → 6 → 3 → 1
    ((8, 8, 1), 0, "classic", (8, 8)),
    # auto (the default): as many pools as keep the map at least 3×3
    ((8, 8, 1), "auto", "gap", (4, 4)),          # one pool: 8 → 4
    ((28, 28, 1), "auto", "gap", (3, 3)),        # three: 28 → 14 → 7 → 3
    ((224, 224, 3), "auto", "classic", (7, 7)),  # all five, the paper's
    ((5, 13, 2), "auto", "gap", (5, 13)),        # the smaller side, 5, has no room for one
])
def test_output_shapes(input_shape, max_pools, head, z_hw):
  model = make_model(num_classes=7, vgg__max_pools=max_pools, vgg__head=head, vgg__hidden=16, vgg__head_pool=2)
  variables = abstract_variables(model, input_shape)
  x = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
  for train in (False, True):
    z, _ = jax.eval_shape(lambda v, x: model.encode(v, x, train=train), variables, x)
    logits, _ = jax.eval_shape(lambda v, z: model.classify(v, z, train=train), variables, z)
    pooled, _ = jax.eval_shape(lambda v, x: model.split("pooled")[0](v, x, train=train), variables, x)
    chex.assert_shape(z, (3, *z_hw, 32))
    chex.assert_shape(logits, (3, 7))
    chex.assert_shape(pooled, (3, 32 if head == "gap" else 2 * 2 * 32))
    assert logits.dtype == jnp.float32
  encoder = variables["params"]["encoder"]
  assert encoder["conv1_1"]["kernel"].shape == (3, 3, input_shape[-1], 4)
  assert sorted(name for name in encoder if name.startswith("conv")) == sorted(
      f"conv{i}_{j}" for i, n in enumerate((2, 2, 3, 3, 3), 1) for j in range(1, n + 1))


def test_max_pool_halves_only_sides_of_two_pixels_or_more():
  for hw, pooled in (((7, 7), (3, 3)), ((1, 6), (1, 3)), ((5, 1), (2, 1)), ((1, 1), (1, 1))):
    assert vgg.max_pool(jnp.zeros((1, *hw, 2))).shape == (1, *pooled, 2)
  x = jnp.arange(6.0).reshape(1, 1, 6, 1)
  np.testing.assert_array_equal(vgg.max_pool(x)[0, 0, :, 0], [1, 3, 5])


@pytest.mark.parametrize("size_in, size_out", [(7, 7), (1, 7), (3, 2), (10, 7), (5, 3)])
def test_adaptive_pool_is_torchvisions(size_in, size_out):
  """Bin i averages rows floor(i·in/out) .. ceil((i+1)·in/out) − 1 (torch's AdaptiveAvgPool2d), by brute force."""
  x = np.random.default_rng(0).normal(size=(2, size_in, size_in + 1, 3)).astype(np.float32)
  bins = lambda n, i: slice(i * n // size_out, -(-(i + 1) * n // size_out))
  expected = np.array([[[x[b, bins(size_in, i), bins(size_in + 1, j)].mean((0, 1)) for j in range(size_out)]
                        for i in range(size_out)] for b in range(2)])
  np.testing.assert_allclose(vgg.adaptive_avg_pool(jnp.asarray(x), size_out), expected, rtol=1e-5, atol=1e-6)


def test_width_multiplier_scales_every_conv_and_keeps_one_channel():
  assert vgg.scaled_blocks(0.25) == ((16, 16), (32, 32), (64, 64, 64), (128, 128, 128), (128, 128, 128))
  assert vgg.scaled_blocks(0.001) == ((1, 1), (1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1))
  encoder = abstract_variables(make_model(vgg__width=0.25), (8, 8, 3))["params"]["encoder"]
  assert encoder["conv5_3"]["kernel"].shape == (3, 3, 128, 128)


@pytest.mark.parametrize("batch_norm, expected", [(False, 138_357_544), (True, 138_365_992)])
def test_full_size_parameter_counts_equal_torchvisions_vgg16(batch_norm, expected):
  """torchvision's vgg16 / vgg16_bn on 224×224×3 and 1,000 classes, counted from shapes (nothing allocated)."""
  model = build_model(config_lib.build_config(None, [("model", "vgg16"), ("vgg.head", "classic"),
                                                     ("vgg.batch_norm", str(batch_norm))]), 1000)
  variables = abstract_variables(model, (224, 224, 3))
  assert parameter_count(variables["params"]) == expected
  head = variables["params"]["head"]
  assert head["fc1"]["kernel"].shape == (7 * 7 * 512, 4096) and head["classifier"]["kernel"].shape == (4096, 1000)


def test_the_injected_conv_builds_every_convolution():
  """``build_model(conv=...)`` (platform_tuning's hook): a conv module without biases leaves all 13 without one."""
  convs = lambda model: {name: frozenset(layer) for name, layer in abstract_variables(model, (8, 8, 1))["params"][
      "encoder"].items() if name.startswith("conv")}
  assert set(convs(make_model()).values()) == {frozenset({"kernel", "bias"})}
  injected = convs(build_model(make_config(), 10, conv=functools.partial(nn.Conv, use_bias=False)))
  assert len(injected) == 13 and set(injected.values()) == {frozenset({"kernel"})}


# ----------------------------------------------------------------------------- the splits and the state


@pytest.fixture(scope="module")
def x8():
  return jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 1))


@pytest.fixture(scope="module")
def with_bn():
  model = make_model(vgg__batch_norm=True)
  return model, numpy_variables(model, (8, 8, 1))


@pytest.fixture(scope="module")
def without_bn():
  model = make_model(vgg__batch_norm=False, vgg__head="classic", vgg__hidden=8, vgg__head_pool=2)
  return model, numpy_variables(model, (8, 8, 1))


def check_splits(model, variables, x):
  """Both splits equal ``apply`` exactly; the gradient of one example's score reaches only that example's z."""
  states = assert_split_is_exact(model, variables, x)
  chex.assert_shape(states[1], (4, 2, 2, 32))
  embed, classify = model.split("pooled")
  for train in (False, True):
    pooled, _ = embed(variables, x, train=train)
    chex.assert_trees_all_equal(classify(variables, pooled, train=train)[0], model.apply(variables, x, train=train)[0])
  grad = jax.grad(lambda z: model.classify(variables, z)[0][1, 3])(model.encode(variables, x)[0])
  assert np.abs(grad[1]).max() > 0
  np.testing.assert_array_equal(np.delete(np.asarray(grad), 1, axis=0), 0)
  return states


def test_batch_norm_splits_are_exact_and_the_state_lives_in_the_encoder(with_bn, x8):
  model, variables = with_bn
  assert set(variables) == {"params", "batch_stats"} and set(variables["batch_stats"]) == {"encoder"}
  assert len(variables["batch_stats"]["encoder"]) == 13  # one BN per conv
  apply_state, _, encode_state, classify_state = check_splits(model, variables, x8)
  assert set(encode_state["batch_stats"]) == {"encoder"} and classify_state == {"batch_stats": {}}
  chex.assert_trees_all_equal(merge_batch_stats(variables["batch_stats"], encode_state, classify_state),
                              apply_state["batch_stats"])
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"], apply_state["batch_stats"])
  assert all(jax.tree.leaves(moved))  # every running statistic moved towards the batch's
  # Inference uses the running statistics: other statistics, other logits.
  other = {**variables, "batch_stats": jax.tree.map(lambda a: a * 1.5, variables["batch_stats"])}
  assert not np.allclose(model.apply(other, x8)[0], model.apply(variables, x8)[0])


def test_without_batch_norm_the_splits_are_exact_and_there_is_no_state(without_bn, x8):
  model, variables = without_bn
  assert set(variables) == {"params"}
  assert not any(name.startswith("bn") for name in variables["params"]["encoder"])
  _, _, encode_state, classify_state = check_splits(model, variables, x8)
  assert encode_state == classify_state == {"batch_stats": {}}


def test_bfloat16_activations_with_float32_parameters_statistics_and_logits():
  model = make_model(dtype="bfloat16", vgg__head="classic", vgg__hidden=8, vgg__head_pool=2)
  variables = abstract_variables(model, (28, 28, 1))
  dtypes = {leaf.dtype for leaf in jax.tree.leaves((variables["params"], variables["batch_stats"]))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
  z, _ = jax.eval_shape(lambda v, x: model.encode(v, x, train=True), variables, x)
  logits, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)
  assert z.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class Preinitialised(Model):
  """A model whose ``init`` returns given variables (see :func:`numpy_variables`)."""

  variables: Any = None

  def init(self, key, input_shape):
    del key, input_shape
    return self.variables


@pytest.fixture(scope="module")
def digits():
  from overfocus_jax.data.sources import load_dataset
  return load_dataset("digits")


@pytest.fixture(scope="module")
def initial_variables():
  """The tiny model (with batch norm) at an initialisation of its own distributions."""
  return numpy_variables(make_model(vgg__batch_norm=True), (8, 8, 1), like_init=True)


def without_batch_norm(variables):
  """The same convolutions and head without the BN layers: what ``batch_norm=False`` initialises."""
  encoder = {name: layer for name, layer in variables["params"]["encoder"].items() if not name.startswith("bn")}
  return {"params": {**variables["params"], "encoder": encoder}}


def test_initialisation_is_torchvisions():
  """He normal with fan-out for the convs (kaiming_normal_(mode="fan_out")), N(0, 0.01) for the dense layers."""
  key = jax.random.PRNGKey(0)
  np.testing.assert_allclose(np.std(vgg.CONV_INIT(key, (3, 3, 64, 128))), np.sqrt(2 / (9 * 128)), rtol=0.03)
  np.testing.assert_allclose(np.std(vgg.DENSE_INIT(key, (256, 512))), 0.01, rtol=0.03)


def train(config, dataset, variables, steps, *, same_batch=False):
  """``(losses, metrics, state)`` after ``steps`` jitted train steps of ``config``'s model and regularizer on digits
  batches of 64 (one fixed batch with ``same_batch``), from ``variables``."""
  from overfocus_jax.regularizers import build_regularizer
  from overfocus_jax.data import pipeline
  from overfocus_jax.train import state as state_lib
  from overfocus_jax.train.step import make_train_step
  model, regularizer = build_model(config, dataset.num_classes), build_regularizer(config, 22)
  schedule = optimization.make_schedule(config, 22)
  tx = optimization.make_optimizer(config, schedule)
  state = state_lib.create_train_state(Preinitialised(model.module, model.name, variables), tx, seed=0,
                                       input_shape=dataset.image_shape, regularizer=regularizer)
  step = jax.jit(make_train_step(model, tx, schedule=schedule, regularizer=regularizer))
  batches = pipeline.make_train_iterator(dataset, batch_size=64, seed=0, augment=False)
  batch = jax.tree.map(jnp.asarray, next(batches))
  losses, records = [], []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    records.append(jax.device_get(metrics))
    batch = batch if same_batch else jax.tree.map(jnp.asarray, next(batches))
  return losses, records, state


@pytest.mark.parametrize("batch_norm, learning_rate, drop", [(True, 0.1, 0.5), (False, 0.05, 0.02)])
def test_train_steps_lower_the_loss(digits, initial_variables, batch_norm, learning_rate, drop):
  """On one batch of digits (conftest.fit_one_batch's test). With BN the loss halves in 20 steps. Without, the 13
  layers of 4–32 channels learn slowly from torchvision's initialisation (the paper started configuration D from a
  shallower net's weights), but the loss falls."""
  config = make_config(vgg__batch_norm=batch_norm, schedule="constant", warmup_epochs=0, learning_rate=learning_rate)
  variables = initial_variables if batch_norm else without_batch_norm(initial_variables)
  losses, _, state = train(config, digits, variables, 20, same_batch=True)
  assert losses[-1] < (1 - drop) * losses[0], losses
  chex.assert_tree_all_finite(state)


@pytest.mark.parametrize("regularizer", ["sgdrop", "rsc"])
def test_regularizers_train_vgg16(digits, initial_variables, regularizer):
  """SGDrop and RSC mask z = encode(x) in the train step: 8 steps on digits, a mask on z, the loss finite."""
  config = make_config(regularizer__name=regularizer, schedule="constant", warmup_epochs=0)
  losses, records, _ = train(config, digits, initial_variables, 8)
  assert np.all(np.isfinite(losses)), losses
  dropped = [float(record[f"{regularizer}_dropped_fraction"]) for record in records]
  assert np.mean(dropped) > 0, dropped


def test_trains_with_sgdrop_and_explains_through_the_cli(tmp_path, capsys):
  """The tiny VGG on digits, 2 steps of SGDrop, then ``overfocus explain`` at a conv layer inside the encoder."""
  workdir = tmp_path / "wd"
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, "--config.model=vgg16", "--config.dataset=digits",
                           *TINY_VGG_ARGS, "--config.regularizer.name=sgdrop", "--config.num_epochs=1",
                           "--config.batch_size=512", "--no-progress")
  assert code == 0, err
  assert json.loads(out.strip().splitlines()[-1])["steps"] == 2
  code, out, err = run_cli(capsys, "explain", "--workdir", workdir, "--n", "2", "--images", "8",
                           "--methods", "latent,grad_cam", "--no-progress")
  assert code == 0, err
  summary = json.loads(out.strip().splitlines()[-1])
  assert {"latent", "grad_cam"} <= set(summary["methods"]), summary


@pytest.mark.parametrize("input_shape", [(1, 1, 1), (8, 8, 1), (28, 28, 3)])
def test_the_experiment_accepts_vgg16_with_every_regularizer_and_image_size(input_shape):
  assert_the_experiment_accepts(make_model(), make_config, input_shape)


# ----------------------------------------------------------------------------- bad config


BAD_FIELDS = [
    (["--config.vgg.width=0"], ["config.vgg.width=0.0", "positive number", "--config.vgg.width"]),
    (["--config.vgg.width=-0.5"], ["config.vgg.width=-0.5"]),
    (["--config.vgg.width=inf"], ["config.vgg.width=inf"]),
    (["--config.vgg.max_pools=6"], ["config.vgg.max_pools=6", "0..5"]),
    (["--config.vgg.max_pools=-1"], ["config.vgg.max_pools=-1"]),
    (["--config.vgg.head=mlp"], ["unknown vgg.head 'mlp'", "gap, classic"]),
    (["--config.vgg.hidden=0"], ["config.vgg.hidden=0", "positive integer"]),
    (["--config.vgg.head_pool=0"], ["config.vgg.head_pool=0"]),
    (["--config.vgg.batch_norm=maybe"], ["--config.vgg.batch_norm='maybe'", "bool"]),
    (["--config.vgg.depth=19"], ["unknown config field 'config.vgg.depth'", "batch_norm, head"]),
]


@pytest.mark.parametrize("overrides, fragments", BAD_FIELDS, ids=[b[0][0] for b in BAD_FIELDS])
def test_bad_vgg_config_is_one_line(tmp_path, capsys, overrides, fragments):
  workdir = tmp_path / "wd"
  # The tiny model on digits for one epoch: a value validation let through would cost seconds, not a full VGG-16 run.
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, "--config.model=vgg16", "--config.dataset=digits",
                           *TINY_VGG_ARGS, "--config.num_epochs=1", "--no-progress", *overrides)
  assert_one_line_error(code, err, *fragments)
  assert out == "" and not workdir.exists()


# ----------------------------------------------------------------------------- torchvision's state dict

# torchvision's vgg16 / vgg16_bn ``features`` places of the 13 convs (models/vgg.py in torchvision: cfg "D").
TORCHVISION_CONVS = {False: (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
                     True: (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)}


@pytest.mark.parametrize("batch_norm", [False, True])
def test_torchvision_names_are_vgg16s(batch_norm):
  model = build_model(config_lib.build_config(None, [("model", "vgg16"), ("vgg.head", "classic"),
                                                     ("vgg.batch_norm", str(batch_norm))]), 1000)
  variables = abstract_variables(model, (224, 224, 3))
  state = vgg.to_torchvision(jax.tree.map(lambda a: np.zeros(a.shape, np.float32), variables))
  convs = sorted({int(name.split(".")[1]) for name in state if name.startswith("features.") and
                  state[name].ndim == 4})
  assert tuple(convs) == TORCHVISION_CONVS[batch_norm]
  if batch_norm:
    assert state["features.1.running_var"].shape == (64,) and state["features.41.weight"].shape == (512,)
  assert state["classifier.0.weight"].shape == (4096, 25088) and state["classifier.6.weight"].shape == (1000, 4096)
  assert sum(v.size for k, v in state.items() if "running" not in k) == parameter_count(variables["params"])


def torch_classic_head(state, z):
  """torchvision's classifier in numpy: adaptive pool, flatten in NCHW order, Linear-ReLU-Linear-ReLU-Linear."""
  pooled = np.asarray(vgg.adaptive_avg_pool(jnp.asarray(z), 2)).transpose(0, 3, 1, 2).reshape(len(z), -1)
  linear = lambda x, layer: x @ state[f"classifier.{layer}.weight"].T + state[f"classifier.{layer}.bias"]
  return linear(np.maximum(linear(np.maximum(linear(pooled, 0), 0), 3), 0), 6)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_round_trip_through_torchvisions_names_and_its_flatten_order(tmp_path, batch_norm):
  from safetensors.numpy import save_file
  from overfocus_jax.models import weights
  model = make_model(vgg__head="classic", vgg__hidden=16, vgg__head_pool=2, vgg__batch_norm=batch_norm)
  saved = jax.device_get(numpy_variables(model, (8, 8, 1), seed=0))
  fresh = jax.device_get(numpy_variables(model, (8, 8, 1), seed=1))
  state = vgg.to_torchvision(saved)
  save_file(state, str(tmp_path / "w.safetensors"))
  loaded = weights.load_pretrained(model, fresh, tmp_path / "w.safetensors", "torchvision")
  chex.assert_trees_all_equal(loaded, saved)
  # The head on a latent map, ours against torchvision's NCHW flatten: the first layer's inputs were permuted.
  z = np.random.default_rng(2).normal(size=(3, 3, 2, 32)).astype(np.float32)
  logits, _ = model.classify(loaded, jnp.asarray(z))
  np.testing.assert_allclose(logits, torch_classic_head(state, z), rtol=1e-4, atol=1e-5)


def test_torchvision_weights_on_another_class_count_or_the_gap_head_keep_the_head_fresh(tmp_path, capsys):
  from safetensors.numpy import save_file
  from overfocus_jax.models import weights
  classic = dict(vgg__head="classic", vgg__hidden=16, vgg__head_pool=2)
  saved = jax.device_get(numpy_variables(make_model(**classic), (8, 8, 1), seed=0))
  save_file(vgg.to_torchvision(saved), str(tmp_path / "w.safetensors"))
  seven = make_model(num_classes=7, **classic)
  fresh = jax.device_get(numpy_variables(seven, (8, 8, 1), seed=1))
  capsys.readouterr()
  loaded = weights.load_pretrained(seven, fresh, tmp_path / "w.safetensors", "torchvision")
  err = capsys.readouterr().err
  assert "the file's classifier.6 has 10 classes, the model 7: classifier.6 is re-initialised" in err
  chex.assert_trees_all_equal(loaded["params"]["head"]["classifier"], fresh["params"]["head"]["classifier"])
  chex.assert_trees_all_equal(loaded["params"]["head"]["fc2"], saved["params"]["head"]["fc2"])
  chex.assert_trees_all_equal(loaded["params"]["encoder"], saved["params"]["encoder"])

  gap = make_model()
  fresh = jax.device_get(numpy_variables(gap, (8, 8, 1), seed=1))
  loaded = weights.load_pretrained(gap, fresh, tmp_path / "w.safetensors", "torchvision")
  assert "does not fit the gap head" in capsys.readouterr().err
  chex.assert_trees_all_equal(loaded["params"]["encoder"], saved["params"]["encoder"])
  chex.assert_trees_all_equal(loaded["params"]["head"], fresh["params"]["head"])
  chex.assert_trees_all_equal(loaded["batch_stats"], saved["batch_stats"])
  with pytest.raises(weights.UserError, match="gap head has no torchvision counterpart.*vgg.head=classic"):
    vgg.to_torchvision(fresh)
  # Batch norm in the file and not in the model: the first tensor that does not fit is named.
  plain = make_model(vgg__head="classic", vgg__hidden=16, vgg__head_pool=2, vgg__batch_norm=False)
  with pytest.raises(weights.UserError, match=r"expected 'features.2.bias' of shape \(4\), found no such tensor; "
                     r"the file's unmatched tensors begin \['features.1.bias'"):
    weights.load_pretrained(plain, jax.device_get(numpy_variables(plain, (8, 8, 1))), tmp_path / "w.safetensors",
                            "torchvision")
