"""Tests for overfocus_jax.models.mnist_cnn (DomainBed's MNIST_CNN): PyTorch's parameter count, shapes at several
input sizes, the forward pass against DomainBed's written out in NCHW, PyTorch's initialisation, the exact
encode/classify splits at the map and at the pooled vector, bfloat16, fitting one batch, the experiment's checks,
the shipped config and one epoch through the CLI."""

import json
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from overfocus_jax import config as config_lib
from overfocus_jax.models import build_model, mnist_cnn, parameter_count

from conftest import (REPO_ROOT, abstract_variables, assert_split_is_exact, assert_the_experiment_accepts,
                      digits_config, fit_one_batch, run_cli)

EXPERIMENT_CONFIG = REPO_ROOT / "experiments" / "configs" / "mnist_cnn.py"


def make_config(**fields):
  return digits_config("mnist_cnn", **fields)


def make_model(num_classes=10, **fields):
  return build_model(make_config(**fields), num_classes)


def random_variables(model, input_shape, seed=0):
  """Every parameter drawn with numpy (GroupNorm's scale and bias away from the identity), so that a mistake in any
  of them shows in the logits."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif name.endswith("['scale']"):
      value = rng.uniform(0.5, 2.0, leaf.shape)
    else:
      value = rng.normal(0.0, 0.3, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, input_shape))


# ----------------------------------------------------------------------------- the architecture


def test_parameter_count_equals_pytorchs_on_colored_mnist():
  """DomainBed's MNIST_CNN + Linear(128, 2) on 2×28×28 ColoredMNIST, counted layer by layer as PyTorch does."""
  conv = lambda c_in, c_out: c_out * c_in * 3 * 3 + c_out  # Conv2d weight + bias
  group_norm = lambda c: 2 * c                              # affine weight + bias
  expected = (conv(2, 64) + conv(64, 128) + conv(128, 128) + conv(128, 128)
              + group_norm(64) + 3 * group_norm(128) + (128 * 2 + 2))
  assert expected == 371_394
  variables = abstract_variables(make_model(num_classes=2), (28, 28, 2))
  assert set(variables) == {"params"}  # no batch statistics
  assert parameter_count(variables["params"]) == expected
  encoder = variables["params"]["encoder"]
  assert sorted(encoder) == ["bn0", "bn1", "bn2", "bn3", "conv1", "conv2", "conv3", "conv4"]
  assert encoder["conv1"]["kernel"].shape == (3, 3, 2, 64) and encoder["conv1"]["bias"].shape == (64,)
  assert encoder["conv2"]["kernel"].shape == (3, 3, 64, 128)
  assert encoder["bn0"]["scale"].shape == (64,) and encoder["bn3"]["bias"].shape == (128,)
  assert variables["params"]["head"]["classifier"]["kernel"].shape == (128, 2)


@pytest.mark.parametrize("input_shape, z_hw", [
    ((28, 28, 2), (14, 14)),  # ColoredMNIST
    ((28, 28, 1), (14, 14)),  # RotatedMNIST
    ((8, 8, 1), (4, 4)),      # digits
    ((7, 5, 3), (4, 3)),      # odd sides: ceil(side / 2), PyTorch's floor((side - 1) / 2) + 1
    ((1, 1, 1), (1, 1)),
])
def test_output_shapes(input_shape, z_hw):
  model = make_model(num_classes=7)
  variables = abstract_variables(model, input_shape)
  x = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
  for train in (False, True):
    z, _ = jax.eval_shape(lambda v, x: model.encode(v, x, train=train), variables, x)
    logits, _ = jax.eval_shape(lambda v, z: model.classify(v, z, train=train), variables, z)
    pooled, _ = jax.eval_shape(lambda v, x: model.split("pooled")[0](v, x, train=train), variables, x)
    chex.assert_shape(z, (3, *z_hw, 128))
    chex.assert_shape(pooled, (3, mnist_cnn.N_OUTPUTS))
    chex.assert_shape(logits, (3, 7))
    assert logits.dtype == jnp.float32


def domainbed_forward(params, x_nhwc):
  """DomainBed's ``MNIST_CNN.forward`` and linear classifier written out in PyTorch's layout (NCHW, OIHW kernels,
  padding 1 on every side, ReLU then GroupNorm(8) with the biased two-pass variance and eps 1e-5)."""
  x = jnp.transpose(x_nhwc, (0, 3, 1, 2))
  encoder = params["encoder"]
  for i, stride in enumerate(mnist_cnn.STRIDES):
    conv, norm = encoder[f"conv{i + 1}"], encoder[f"bn{i}"]
    weight = jnp.transpose(conv["kernel"], (3, 2, 0, 1))
    x = lax.conv_general_dilated(x, weight, (stride, stride), ((1, 1), (1, 1)),
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=lax.Precision.HIGHEST)
    x = jax.nn.relu(x + conv["bias"][None, :, None, None])
    b, c, h, w = x.shape
    groups = x.reshape(b, 8, c // 8, h, w)
    mean = groups.mean((2, 3, 4), keepdims=True)
    var = ((groups - mean) ** 2).mean((2, 3, 4), keepdims=True)
    x = ((groups - mean) / jnp.sqrt(var + 1e-5)).reshape(b, c, h, w)
    x = x * norm["scale"][None, :, None, None] + norm["bias"][None, :, None, None]
  dense = params["head"]["classifier"]
  return x.mean((2, 3)) @ dense["kernel"] + dense["bias"]


def test_forward_pass_is_domainbeds():
  """Even sides (8×6), where flax's "SAME" would pad the stride-2 conv (0, 1) instead of PyTorch's (1, 1)."""
  model = make_model(num_classes=3)
  variables = random_variables(model, (8, 6, 2))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 6, 2))
  logits, state = model.apply(variables, x, train=True)
  np.testing.assert_allclose(logits, domainbed_forward(variables["params"], x), rtol=2e-4, atol=2e-4)
  assert state == {"batch_stats": {}}
  # GroupNorm has no running statistics: inference is the same function.
  chex.assert_trees_all_equal(model.apply(variables, x, train=False)[0], logits)


def test_the_injected_conv_builds_every_convolution():
  """``build_model(conv=...)`` (platform_tuning's hook) builds all four convs."""
  import functools
  model = build_model(make_config(), 10, conv=functools.partial(nn.Conv, use_bias=False))
  encoder = abstract_variables(model, (8, 8, 1))["params"]["encoder"]
  assert [set(encoder[f"conv{i}"]) for i in range(1, 5)] == [{"kernel"}] * 4


def test_initialisation_is_pytorchs():
  """Conv2d and Linear: kaiming_uniform_(a=√5) weights and biases, both uniform in ±1/√fan_in; GroupNorm at the
  identity."""
  variables = make_model(num_classes=2).init(jax.random.PRNGKey(0), (8, 8, 2))["params"]
  layers = {**variables["encoder"], **variables["head"]}
  for name, fan_in in (("conv1", 9 * 2), ("conv2", 9 * 64), ("conv4", 9 * 128), ("classifier", 128)):
    bound = 1 / np.sqrt(fan_in)
    for leaf in (layers[name]["kernel"], layers[name]["bias"]):
      leaf = np.asarray(leaf)
      assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.9 * bound, name
    kernel = np.asarray(layers[name]["kernel"])
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.1)  # uniform's std
  for i in range(4):
    assert np.all(layers[f"bn{i}"]["scale"] == 1) and np.all(layers[f"bn{i}"]["bias"] == 0)


# ----------------------------------------------------------------------------- the splits and dtypes


def test_splits_are_exact_at_the_map_and_at_the_pooled_vector():
  model = make_model()
  variables = random_variables(model, (8, 8, 1))
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 1))
  apply_state, z, encode_state, classify_state = assert_split_is_exact(model, variables, x)
  chex.assert_shape(z, (4, 4, 4, 128))
  assert apply_state == encode_state == classify_state == {"batch_stats": {}}
  assert model.supports_split("latent") and model.supports_split("pooled")
  embed, classify = model.split("pooled")
  pooled_model = types.SimpleNamespace(apply=model.apply, encode=embed, classify=classify)
  _, pooled, _, _ = assert_split_is_exact(pooled_model, variables, x)
  chex.assert_trees_all_equal(pooled, jnp.mean(z, axis=(1, 2)))


def test_bfloat16_keeps_parameters_and_logits_in_float32():
  model = make_model(num_classes=2, dtype="bfloat16")
  variables = abstract_variables(model, (8, 8, 2))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  x = jax.ShapeDtypeStruct((2, 8, 8, 2), jnp.float32)
  z, _ = jax.eval_shape(lambda v, x: model.encode(v, x, train=True), variables, x)
  logits, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)
  assert z.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  # And the numbers stay close to float32's.
  variables = random_variables(model, (8, 8, 2))
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 2))
  reference = make_model(num_classes=2).apply(variables, x)[0]
  np.testing.assert_allclose(model.apply(variables, x)[0], reference, rtol=0.1, atol=0.1)


# ----------------------------------------------------------------------------- training


def test_fits_one_batch():
  """DomainBed's optimiser (Adam 1e-3, constant, no weight decay) on one batch of 64 digits (8×8 → z 4×4)."""
  config = make_config(optimizer="adam", learning_rate=1e-3, weight_decay=0.0, schedule="constant",
                       warmup_epochs=0)
  losses, state = fit_one_batch(config, steps=15)
  assert losses[-1] < 0.3 * losses[0], losses
  chex.assert_tree_all_finite(state.params)


@pytest.mark.parametrize("input_shape", [(1, 1, 1), (8, 8, 1), (28, 28, 2)])
def test_the_experiment_accepts_mnist_cnn_with_every_regularizer_and_image_size(input_shape):
  assert_the_experiment_accepts(make_model(), make_config, input_shape)


def test_the_shipped_config_is_domainbeds_erm():
  config = config_lib.build_config(str(EXPERIMENT_CONFIG), [])
  assert (config.model, config.dataset, config.augment) == ("mnist_cnn", "colored_mnist", False)
  # 64 of each of the two training environments per batch; the −90% environment held out (DomainBed's test env 2).
  assert (config.batch_size, config.environments.test_envs, config.environments.balanced) == (128, (2,), True)
  assert (config.optimizer, config.learning_rate, config.weight_decay) == ("adam", 1e-3, 0.0)
  assert (config.schedule, config.warmup_epochs, config.regularizer.name) == ("constant", 0, "none")


def test_trains_one_epoch_through_the_cli(tmp_path, capsys):
  """Digits at batch 256: 5 steps and 2 eval batches, then the metrics and the saved config."""
  workdir = tmp_path / "wd"
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, "--config.model=mnist_cnn",
                           "--config.dataset=digits", "--config.num_epochs=1", "--config.batch_size=256",
                           "--no-progress")
  assert code == 0, err
  assert '"model": "mnist_cnn"' in out
  record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert np.isfinite(record["train_loss"]) and 0 <= record["test_accuracy"] <= 1, record
  assert json.loads((workdir / "config.json").read_text())["model"] == "mnist_cnn"
