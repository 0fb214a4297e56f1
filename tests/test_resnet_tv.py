"""Tests for overfocus_jax.models.resnet_tv (torchvision's resnet18 and resnet50): torchvision's parameter counts and
tensor names, shapes and both splits at several input sizes and both stems, the forward pass against torchvision's
written out in NCHW from its state dict, the initialisation, bfloat16, the conv hook, fitting one batch of digits,
the experiment's checks and the one-line config errors."""

import functools
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from overfocus_jax import models as models_lib
from overfocus_jax.models import Model, build_model, parameter_count, resnet_tv

from conftest import (abstract_variables, assert_one_line_error, assert_split_is_exact, digits_config, fit_one_batch,
                      run_cli)

KINDS = {"resnet18_tv": ("basic", (2, 2, 2, 2), 512), "resnet50_tv": ("bottleneck", (3, 4, 6, 3), 2048)}


def make_config(model="resnet18_tv", **fields):
  return digits_config(model, **fields)


def make_model(model="resnet18_tv", num_classes=10, **fields):
  return build_model(make_config(model, **fields), num_classes)


def numpy_variables(model, input_shape, seed=0):
  """Every variable drawn with numpy (no init program to compile): He-scaled kernels, BN scales, biases and running
  statistics away from the identity, so that a mistake in any of them shows in the logits."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if name.endswith("['kernel']"):
      value = rng.normal(0.0, np.sqrt(1.0 / np.prod(shape[:-1])), shape)
    elif name.endswith("['scale']") or name.endswith("['var']"):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # biases and running means
      value = rng.normal(0.0, 0.1, shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, input_shape))


def torchvision_count(kind, stage_sizes, classes, in_channels=3, stem_kernel=7):
  """torchvision's ``sum(p.numel() for p in model.parameters())``, layer by layer (BN: weight and bias)."""
  expansion = {"basic": 1, "bottleneck": 4}[kind]
  conv = lambda c_in, c_out, k: c_out * c_in * k * k
  bn = lambda c: 2 * c
  total, width = conv(in_channels, 64, stem_kernel) + bn(64), 64
  for planes, size in zip((64, 128, 256, 512), stage_sizes):
    for block in range(size):
      out = planes * expansion
      if kind == "basic":
        total += conv(width, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
      else:
        total += conv(width, planes, 1) + conv(planes, planes, 3) + conv(planes, out, 1) + 2 * bn(planes) + bn(out)
      if block == 0 and (width != out or planes != 64):
        total += conv(width, out, 1) + bn(out)
      width = out
  return total + width * classes + classes


# ----------------------------------------------------------------------------- the architecture


@pytest.mark.parametrize("name, expected", [("resnet18_tv", 11_689_512), ("resnet50_tv", 25_557_032)])
def test_parameter_counts_equal_torchvisions(name, expected):
  """At 224×224×3 and 1,000 classes with torchvision's stem, counted from shapes (nothing allocated)."""
  kind, sizes, _ = KINDS[name]
  assert torchvision_count(kind, sizes, 1000) == expected
  variables = abstract_variables(make_model(name, 1000, resnet_tv__stem="imagenet"), (224, 224, 3))
  assert parameter_count(variables["params"]) == expected
  assert set(variables["batch_stats"]) == {"encoder"}  # the head has no batch norm
  # The CIFAR stem on one channel: a 3×3 conv1, nothing else changes.
  small = abstract_variables(make_model(name, 10), (8, 8, 1))
  assert parameter_count(small["params"]) == torchvision_count(kind, sizes, 10, in_channels=1, stem_kernel=3)
  assert small["params"]["encoder"]["conv1"]["kernel"].shape == (3, 3, 1, 64)


def test_tensor_names_are_torchvisions():
  """The state dict of torchvision's resnet18 (102 tensors without num_batches_tracked) and resnet50 (267)."""
  for name, count, samples in (
      ("resnet18_tv", 102, {"conv1.weight": (64, 3, 7, 7), "layer1.1.conv2.weight": (64, 64, 3, 3),
                            "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer4.1.bn2.running_var": (512,),
                            "fc.weight": (1000, 512), "fc.bias": (1000,)}),
      ("resnet50_tv", 267, {"layer1.0.conv1.weight": (64, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                            "layer2.0.conv2.weight": (128, 128, 3, 3), "layer3.5.bn3.running_mean": (1024,),
                            "fc.weight": (1000, 2048)})):
    variables = abstract_variables(make_model(name, 1000, resnet_tv__stem="imagenet"), (32, 32, 3))
    state = resnet_tv.to_torchvision(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), variables))
    assert len(state) == count
    assert {k: state[k].shape for k in samples} == samples
    assert not any(k.startswith("layer1.0.downsample") for k in state) or name == "resnet50_tv"


@pytest.mark.parametrize("name, stem, input_shape, z_hw", [
    ("resnet18_tv", "cifar", (32, 32, 3), (4, 4)),
    ("resnet18_tv", "cifar", (8, 8, 1), (1, 1)),        # digits
    ("resnet18_tv", "cifar", (28, 28, 1), (4, 4)),      # the default data
    ("resnet18_tv", "imagenet", (64, 64, 3), (2, 2)),
    ("resnet18_tv", "imagenet", (7, 5, 3), (1, 1)),     # odd sides: PyTorch's floor((n + 2p − k) / s) + 1
    ("resnet50_tv", "cifar", (32, 32, 3), (4, 4)),
    ("resnet50_tv", "imagenet", (224, 224, 3), (7, 7)),
    ("resnet50_tv", "imagenet", (1, 1, 1), (1, 1)),
])
def test_output_shapes_and_both_splits(name, stem, input_shape, z_hw):
  model = make_model(name, 7, resnet_tv__stem=stem)
  variables = abstract_variables(model, input_shape)
  x = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
  channels = KINDS[name][2]
  for train in (False, True):
    z, _ = jax.eval_shape(lambda v, x: model.encode(v, x, train=train), variables, x)
    logits, _ = jax.eval_shape(lambda v, z: model.classify(v, z, train=train), variables, z)
    pooled, _ = jax.eval_shape(lambda v, x: model.split("pooled")[0](v, x, train=train), variables, x)
    split_logits, _ = jax.eval_shape(lambda v, p: model.split("pooled")[1](v, p, train=train), variables, pooled)
    chex.assert_shape(z, (3, *z_hw, channels))
    chex.assert_shape(pooled, (3, channels))
    chex.assert_shape([logits, split_logits], (3, 7))
    assert logits.dtype == jnp.float32
  assert model.supports_split("latent") and model.supports_split("pooled")


def torchvision_forward(state, x_nhwc, kind, stage_sizes, stem):
  """torchvision's ``ResNet.forward`` in eval mode, written out in PyTorch's layout (NCHW, OIHW kernels, symmetric
  padding, max-pool padded with −inf) from a torchvision state dict."""
  x = jnp.transpose(x_nhwc, (0, 3, 1, 2))
  channel = lambda v: jnp.asarray(v)[None, :, None, None]

  def conv(x, name, stride, pad):
    return lax.conv_general_dilated(x, jnp.asarray(state[f"{name}.weight"]), (stride, stride), ((pad, pad),) * 2,
                                    dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=lax.Precision.HIGHEST)

  def bn(x, name):
    scale = state[f"{name}.weight"] / jnp.sqrt(state[f"{name}.running_var"] + 1e-5)
    return (x - channel(state[f"{name}.running_mean"])) * channel(scale) + channel(state[f"{name}.bias"])

  relu = jax.nn.relu
  if stem == "imagenet":
    x = relu(bn(conv(x, "conv1", 2, 3), "bn1"))
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 1, 3, 3), (1, 1, 2, 2), ((0, 0), (0, 0), (1, 1), (1, 1)))
  else:
    x = relu(bn(conv(x, "conv1", 1, 1), "bn1"))
  for stage, size in enumerate(stage_sizes, start=1):
    for block in range(size):
      name, stride = f"layer{stage}.{block}", 2 if stage > 1 and block == 0 else 1
      if kind == "basic":
        y = relu(bn(conv(x, f"{name}.conv1", stride, 1), f"{name}.bn1"))
        y = bn(conv(y, f"{name}.conv2", 1, 1), f"{name}.bn2")
      else:  # v1.5: the stride on the 3×3 conv
        y = relu(bn(conv(x, f"{name}.conv1", 1, 0), f"{name}.bn1"))
        y = relu(bn(conv(y, f"{name}.conv2", stride, 1), f"{name}.bn2"))
        y = bn(conv(y, f"{name}.conv3", 1, 0), f"{name}.bn3")
      if f"{name}.downsample.0.weight" in state:
        x = bn(conv(x, f"{name}.downsample.0", stride, 0), f"{name}.downsample.1")
      x = relu(y + x)
  return x.mean((2, 3)) @ state["fc.weight"].T + state["fc.bias"]


@pytest.mark.parametrize("kind, stage_sizes, stem, input_shape", [
    ("basic", (2, 2, 2, 2), "imagenet", (10, 9, 3)),  # resnet18; even and odd sides through the stride-2 layers
    ("bottleneck", (2, 1, 1, 1), "cifar", (6, 6, 2)),  # resnet50's blocks, identity and projection shortcuts
])
def test_forward_pass_is_torchvisions(kind, stage_sizes, stem, input_shape):
  model = Model(resnet_tv.ResNetTV(num_classes=5, kind=kind, stage_sizes=stage_sizes, stem=stem), "resnet_tv")
  variables = numpy_variables(model, input_shape)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, *input_shape))
  # Compiled: run op by op, the two forward passes would compile each of their ops on its own.
  reference = jax.jit(lambda state, x: torchvision_forward(state, x, kind, stage_sizes, stem))
  expected = reference(resnet_tv.to_torchvision(variables), x)
  logits = jax.jit(lambda v, x: model.apply(v, x)[0])(variables, x)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
  assert model.apply(variables, x)[1] == {}  # inference: no statistics


def test_initialisation_is_torchvisions():
  """kaiming_normal_(fan_out, relu) convs, BN at the identity, PyTorch's Linear init for fc; zero_init_residual sets
  each block's last BN scale to 0 (off in torchvision; this library's config: auto, on for resnet50_tv only)."""
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  block = lambda kind, planes, zero=False: resnet_tv.Block(kind, planes, 2, conv=nn.Conv, norm=norm,
                                                          zero_init_residual=zero)
  # One compiled program for all four (eager initialisation compiles every op on its own).
  basic, fc, zero_basic, zero_bottleneck = jax.jit(lambda key: (
      block("basic", 128).init(key, jnp.zeros((1, 4, 4, 64)))["params"],
      resnet_tv.ResNetTVHead(10, 512).init(key, jnp.zeros((1, 1, 1, 512)))["params"]["fc"],
      block("basic", 16, True).init(key, jnp.zeros((1, 4, 4, 8)))["params"],
      block("bottleneck", 16, True).init(key, jnp.zeros((1, 4, 4, 8)))["params"]))(jax.random.PRNGKey(0))
  kernel = np.asarray(basic["conv2"]["kernel"])  # 3×3, 128 → 128
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (9 * 128)), rtol=0.05)
  assert abs(kernel.mean()) < 1e-3 and "bias" not in basic["conv2"]
  np.testing.assert_allclose(np.std(basic["downsample_0"]["kernel"]), np.sqrt(2 / 128), rtol=0.05)
  assert all(np.all(basic[bn]["scale"] == 1) and np.all(basic[bn]["bias"] == 0) for bn in ("bn1", "bn2"))
  bound = 1 / np.sqrt(512)
  for leaf in (fc["kernel"], fc["bias"]):
    assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.8 * bound
  # auto (the config's default): on for resnet50_tv (from scratch it diverged without it), off for resnet18_tv.
  assert make_model("resnet50_tv").module.zero_init_residual
  assert not make_model("resnet18_tv").module.zero_init_residual
  for setting, expected in ((False, False), ("false", False), (True, True), ("TRUE", True)):
    for name in ("resnet18_tv", "resnet50_tv"):
      assert make_model(name, resnet_tv__zero_init_residual=setting).module.zero_init_residual is expected
  for params, last in ((zero_basic, "bn2"), (zero_bottleneck, "bn3")):
    assert np.all(params[last]["scale"] == 0) and np.all(params["bn1"]["scale"] == 1)
    assert np.all(params["downsample_1"]["scale"] == 1)


def test_splits_are_exact_and_the_state_lives_in_the_encoder():
  model = make_model("resnet18_tv", 10)
  variables = numpy_variables(model, (8, 8, 1))
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 1))
  apply_state, z, encode_state, classify_state = assert_split_is_exact(model, variables, x)
  chex.assert_shape(z, (4, 1, 1, 512))
  assert set(apply_state["batch_stats"]) == set(encode_state["batch_stats"]) == {"encoder"}
  assert classify_state == {"batch_stats": {}}
  embed, classify = model.split("pooled")
  pooled_model = types.SimpleNamespace(apply=model.apply, encode=embed, classify=classify)
  _, pooled, _, _ = assert_split_is_exact(pooled_model, variables, x)
  chex.assert_trees_all_equal(pooled, jnp.mean(z, axis=(1, 2)))


def test_bfloat16_keeps_parameters_statistics_and_logits_in_float32():
  model = make_model("resnet50_tv", 10, dtype="bfloat16")
  variables = abstract_variables(model, (8, 8, 3))
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  z, state = jax.eval_shape(lambda v, x: model.encode(v, x, train=True), variables, x)
  logits, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)
  assert z.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}


def test_the_injected_conv_builds_every_convolution():
  """``build_model(conv=...)`` (platform_tuning's hook): a conv module with float16 kernels makes all 20 float16."""
  model = build_model(make_config(), 10, conv=functools.partial(nn.Conv, param_dtype=jnp.float16))
  flat = jax.tree_util.tree_flatten_with_path(abstract_variables(model, (8, 8, 1))["params"])[0]
  dtypes = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in flat}
  kernels = {k: v for k, v in dtypes.items() if k.endswith("['kernel']") and "'fc'" not in k}
  assert len(kernels) == 20 and set(kernels.values()) == {jnp.dtype(jnp.float16)}
  assert dtypes["['head']['fc']['kernel']"] == jnp.float32


# ----------------------------------------------------------------------------- training and the experiment


@pytest.mark.parametrize("name, optimizer, learning_rate", [("resnet18_tv", "sgd", 0.05), ("resnet50_tv", "adam", 1e-3)])
def test_fits_one_batch_of_digits(name, optimizer, learning_rate):
  """8 steps on one batch of 16 digits (8×8, the CIFAR stem: z 1×1), constant learning rate, the config's
  zero_init_residual (auto: resnet50_tv's blocks start as the identity). (ResNet-50 with SGD at 0.1 made the loss
  jump about on a 16-image batch, and at 0.02 fell to 0.38 of its first value in 8 steps; Adam at 1e-3 to 0.09.)"""
  config = make_config(name, optimizer=optimizer, learning_rate=learning_rate, schedule="constant", warmup_epochs=0)
  losses, state = fit_one_batch(config, steps=8, batch_size=16)
  assert losses[-1] < 0.2 * losses[0], losses
  chex.assert_tree_all_finite(state.params)


@pytest.mark.parametrize("name", ["resnet18_tv", "resnet50_tv"])
def test_the_experiment_accepts_the_model_with_every_regularizer_and_image_size(name):
  """What ``overfocus train`` checks before it builds the state: the image size and each regularizer's split."""
  from overfocus_jax.challenge import NAMES
  from overfocus_jax.regularizers import build_regularizer
  from overfocus_jax.train import experiment
  for stem in resnet_tv.STEMS:
    model = make_model(name, resnet_tv__stem=stem)
    for input_shape in ((1, 1, 1), (8, 8, 1), (28, 28, 3)):
      experiment.check_input_shape(model, input_shape)
      models_lib.check_fits_images(make_config(name), input_shape)
    for regularizer in NAMES:
      config = make_config(name, regularizer__name=regularizer)
      experiment.check_regularizer_fits(model, build_regularizer(config, 10), regularizer)


BAD_FIELDS = [
    (["--config.resnet_tv.stem=big"], ["unknown resnet_tv.stem 'big'", "imagenet, cifar"]),
    (["--config.resnet_tv.zero_init_residual=maybe"], ["zero_init_residual='maybe'", "auto, true or false"]),
    (["--config.init_from_layout=keras"], ["unknown init_from_layout 'keras'", "torchvision, timm"]),
    (["--config.freeze_backbone=sometimes"], ["freeze_backbone='sometimes'"]),
]


@pytest.mark.parametrize("overrides, fragments", BAD_FIELDS, ids=[b[0][0] for b in BAD_FIELDS])
def test_bad_config_is_one_line(tmp_path, capsys, overrides, fragments):
  workdir = tmp_path / "wd"
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, "--config.model=resnet18_tv",
                           "--config.dataset=digits", "--config.num_epochs=1", "--no-progress", *overrides)
  assert_one_line_error(code, err, *fragments)
  assert out == "" and not workdir.exists()
