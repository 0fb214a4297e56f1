"""Tests for overfocus_jax.models: the encode/classify split, shapes, gradients through the head, shortcuts and
the batch-norm state each half returns."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax.models import build_model, merge_batch_stats
from overfocus_jax.train import experiment

from conftest import tiny_config
from conftest import assert_one_line_error, assert_split_is_exact, fit_one_batch, run_cli

NUM_CLASSES = 10


def make_model(model="resnet", num_classes=NUM_CLASSES, **fields):
  return build_model(tiny_config(model=model, **fields), num_classes)


def init(model, input_shape, seed=0):
  return model.init(jax.random.PRNGKey(seed), input_shape)  # eager: compiling init costs more than running it


def randomize_batch_stats(variables, seed):
  """Running statistics away from their (0, 1) initial values, so inference mode really uses them."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), leaf.dtype)

  return {**variables, "batch_stats": jax.tree_util.tree_map_with_path(draw, variables["batch_stats"])}


@pytest.fixture(scope="module")
def tiny():
  model = make_model()
  variables = randomize_batch_stats(init(model, (8, 8, 1)), seed=1)
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 1))
  return model, variables, x


# ----------------------------------------------------------------------------- encode/classify == apply


def test_split_equals_apply_in_inference(tiny):
  model, variables, x = tiny
  logits, state = model.apply(variables, x, train=False)
  z, encode_state = model.encode(variables, x, train=False)
  split_logits, classify_state = model.classify(variables, z, train=False)
  chex.assert_shape(logits, (4, NUM_CLASSES))
  chex.assert_trees_all_equal(split_logits, logits)
  assert state == encode_state == classify_state == {}
  # Inference uses the running statistics: other statistics, other logits.
  other = randomize_batch_stats(variables, seed=7)
  assert not np.allclose(model.apply(other, x, train=False)[0], logits)


def test_split_equals_apply_in_training_including_batch_stats(tiny):
  model, variables, x = tiny
  logits, state = model.apply(variables, x, train=True)
  z, encode_state = model.encode(variables, x, train=True)
  split_logits, classify_state = model.classify(variables, z, train=True)
  chex.assert_trees_all_equal(split_logits, logits)
  merged = merge_batch_stats(variables["batch_stats"], encode_state, classify_state)
  chex.assert_trees_all_equal(merged, state["batch_stats"])
  # The statistics really moved (momentum 0.9 towards the batch's), in both halves.
  for part in ("encoder", "head"):
    old, new = variables["batch_stats"][part], state["batch_stats"][part]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    assert not any(np.allclose(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
  # Training mode normalizes with the batch statistics, not the running ones.
  assert not np.allclose(logits, model.apply(variables, x, train=False)[0])


def test_head_batch_stats_update_by_hand(tiny):
  """The head's BN update is new = 0.9 * old + 0.1 * the batch's statistic (mean and biased variance)."""
  model, variables, x = tiny
  z, _ = model.encode(variables, x, train=True)
  _, state = model.classify(variables, z, train=True)
  old = variables["batch_stats"]["head"]["bn"]
  new = state["batch_stats"]["head"]["bn"]
  z = np.asarray(z, np.float64)
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * z.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * z.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the state each half returns


def test_each_half_returns_only_its_own_batch_stats(tiny):
  model, variables, x = tiny
  z, encode_state = model.encode(variables, x, train=True)
  _, classify_state = model.classify(variables, z, train=True)
  _, apply_state = model.apply(variables, x, train=True)
  assert set(encode_state) == {"batch_stats"} and set(encode_state["batch_stats"]) == {"encoder"}
  assert set(classify_state) == {"batch_stats"} and set(classify_state["batch_stats"]) == {"head"}
  assert set(apply_state["batch_stats"]) == {"encoder", "head"}


def test_merge_keeps_fresh_encoder_stats_whatever_the_order(tiny):
  """Regression: the head's stale copy of the encoder statistics once overwrote the fresh ones."""
  model, variables, x = tiny
  old = variables["batch_stats"]
  z, encode_state = model.encode(variables, x, train=True)
  _, classify_state = model.classify(variables, z, train=True)
  for updates in ((encode_state, classify_state), (classify_state, encode_state)):
    merged = merge_batch_stats(old, *updates)
    chex.assert_trees_all_equal(merged["encoder"], encode_state["batch_stats"]["encoder"])
    chex.assert_trees_all_equal(merged["head"], classify_state["batch_stats"]["head"])
  # The previous tree is not modified in place.
  chex.assert_trees_all_equal(old, variables["batch_stats"])
  fresh, stale = merged["encoder"]["stage1_block1"]["bn1"]["mean"], old["encoder"]["stage1_block1"]["bn1"]["mean"]
  assert not np.allclose(fresh, stale)


# ----------------------------------------------------------------------------- shapes


DEFAULT_RESNET = dict(resnet__stem_features=16, resnet__stage_widths=(32, 64, 128), resnet__stage_sizes=(1, 1, 1),
                      resnet__stage_strides=(1, 2, 2))


@pytest.mark.parametrize("name, input_shape, z_shape", [
    ("resnet", (8, 8, 1), (2, 2, 128)),
    ("resnet", (28, 28, 1), (7, 7, 128)),
    ("resnet", (32, 32, 3), (8, 8, 128)),
    ("resnet18", (8, 8, 1), (1, 1, 512)),
    ("resnet18", (28, 28, 1), (4, 4, 512)),   # 28 -> 14 -> 7 -> 4 with SAME padding
    ("resnet18", (32, 32, 3), (4, 4, 512)),
])
def test_output_shapes(name, input_shape, z_shape):
  model = make_model(name, num_classes=7, **(DEFAULT_RESNET if name == "resnet" else {}))
  variables = jax.eval_shape(lambda key: model.init(key, input_shape), jax.random.PRNGKey(0))  # shapes only
  x = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
  for train in (False, True):
    z, _ = jax.eval_shape(lambda v, x: model.encode(v, x, train=train), variables, x)
    logits, _ = jax.eval_shape(lambda v, z: model.classify(v, z, train=train), variables, z)
    full, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=train), variables, x)
    chex.assert_shape(z, (3, *z_shape))
    chex.assert_shape([logits, full], (3, 7))
    assert logits.dtype == full.dtype == jnp.float32
  assert variables["params"]["encoder"]["stem"]["kernel"].shape[2] == input_shape[-1]
  assert variables["params"]["head"]["dense"]["kernel"].shape == (z_shape[-1], 7)


def expected_param_count(c_in, stem, widths, sizes, strides, classes, stem_kernel=3):
  """Hand count for the pre-activation ResNet: bias-free convs, BN scale+bias, a projection on width/stride change."""
  count = stem_kernel * stem_kernel * c_in * stem
  width_in = stem
  for width, size, stride in zip(widths, sizes, strides):
    for block in range(size):
      s = stride if block == 0 else 1
      count += 2 * width_in + 9 * width_in * width + 2 * width + 9 * width * width
      if width_in != width or s != 1:
        count += width_in * width
      width_in = width
  return count + 2 * width_in + width_in * classes + classes


def test_resnet18_parameter_count():
  model = make_model("resnet18")
  variables = jax.eval_shape(lambda key: model.init(key, (32, 32, 3)), jax.random.PRNGKey(0))
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
  assert count == expected_param_count(3, 64, (64, 128, 256, 512), (2, 2, 2, 2), (1, 2, 2, 2), 10)
  assert count == 11_172_170


# ----------------------------------------------------------------------------- gradients through the head


def test_grad_of_class_score_wrt_z_through_classify_alone(tiny):
  model, variables, x = tiny
  z, _ = model.encode(variables, x)
  cls, example = 3, 1
  grad = jax.grad(lambda z: model.classify(variables, z)[0][example, cls])(z)
  chex.assert_shape(grad, z.shape)
  chex.assert_tree_all_finite(grad)
  assert np.abs(grad[example]).max() > 0
  # Inference mode does not mix examples: the other examples' latents do not affect this score.
  np.testing.assert_array_equal(np.delete(np.asarray(grad), example, axis=0), 0)
  # By hand: score = mean_hw relu(bn(z)) @ W[:, c] + b[c], bn(z) = (z - mean) / sqrt(var + eps) * scale + bias.
  bn_params, bn_stats = variables["params"]["head"]["bn"], variables["batch_stats"]["head"]["bn"]
  inv = bn_params["scale"] / np.sqrt(bn_stats["var"] + 1e-5)
  pre = (z[example] - bn_stats["mean"]) * inv + bn_params["bias"]
  h, w = z.shape[1:3]
  kernel = variables["params"]["head"]["dense"]["kernel"][:, cls]
  expected = (pre > 0) * inv * kernel / (h * w)
  np.testing.assert_allclose(grad[example], expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- shortcuts


@pytest.mark.parametrize("stem, widths, sizes, strides, projected", [
    (8, (8, 16, 16), (2, 1, 1), (1, 1, 2), {"stage2_block1": (8, 16), "stage3_block1": (16, 16)}),
    (8, (8, 8), (2, 2), (2, 1), {"stage1_block1": (8, 8)}),  # stride alone
    (8, (16,), (3,), (1,), {"stage1_block1": (8, 16)}),      # width alone; later blocks of the stage keep it
    (8, (8, 8), (1, 1), (1, 1), {}),
])
def test_projection_shortcut_only_when_width_or_stride_changes(stem, widths, sizes, strides, projected):
  model = make_model(resnet__stem_features=stem, resnet__stage_widths=widths, resnet__stage_sizes=sizes,
                     resnet__stage_strides=strides)
  variables = jax.eval_shape(lambda key: model.init(key, (8, 8, 1)), jax.random.PRNGKey(0))
  encoder = variables["params"]["encoder"]
  blocks = {name for name in encoder if name.startswith("stage")}
  assert blocks == {f"stage{i + 1}_block{j + 1}" for i, size in enumerate(sizes) for j in range(size)}
  assert {name for name in blocks if "proj" in encoder[name]} == set(projected)
  for name, (width_in, width_out) in projected.items():
    chex.assert_shape(encoder[name]["proj"]["kernel"], (1, 1, width_in, width_out))
  for name in blocks:
    assert {"bn1", "conv1", "bn2", "conv2"} <= set(encoder[name])


def test_identity_shortcut_adds_the_input():
  """With identity shortcuts, zeroing conv2 makes every block the identity: z == stem(x)."""
  model = make_model(resnet__stage_widths=(8, 8), resnet__stage_sizes=(1, 1), resnet__stage_strides=(1, 1))
  variables = init(model, (8, 8, 1))
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.zeros_like(leaf) if "conv2" in jax.tree_util.keystr(path) else leaf,
      variables["params"])
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  z, _ = model.encode({**variables, "params": params}, x)
  stem = jax.lax.conv_general_dilated(x, params["encoder"]["stem"]["kernel"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(z, stem, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- tiny images


def test_many_stride_two_stages_on_8x8_images_give_1x1_maps():
  """SAME padding never empties a feature map: 8 -> 4 -> 2 -> 1 -> 1 -> 1, and the input check accepts it."""
  model = make_model(resnet__stage_widths=(8,) * 5, resnet__stage_sizes=(1,) * 5, resnet__stage_strides=(2,) * 5)
  experiment.check_input_shape(model, (8, 8, 1))
  z, _ = jax.eval_shape(lambda key: model.encode(model.init(key, (8, 8, 1)), jnp.ones((2, 8, 8, 1))),
                        jax.random.PRNGKey(0))
  chex.assert_shape(z, (2, 1, 1, 8))


# ----------------------------------------------------------------------------- activation and normalisation options


def test_group_count_is_the_largest_divisor_of_at_most_32_groups_of_4_channels():
  from overfocus_jax.models.resnet import group_count
  # At most 32 groups, each of at least 4 channels where the width allows, and always a divisor of the width.
  widths = (1, 3, 7, 8, 12, 16, 48, 64, 100, 128, 512)
  assert [group_count(c) for c in widths] == [1, 1, 1, 2, 3, 4, 12, 16, 25, 32, 32]


def test_gelu_option_is_the_exact_gelu():
  from overfocus_jax.models.resnet import ACTIVATIONS
  x = jnp.linspace(-4.0, 4.0, 33)
  np.testing.assert_allclose(ACTIVATIONS["gelu"](x), x * jax.scipy.stats.norm.cdf(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("activation, norm", [("gelu", "batch"), ("relu", "group"), ("gelu", "none")])
def test_activation_and_norm_options_keep_shapes_and_the_exact_split(activation, norm):
  model = make_model(resnet__activation=activation, resnet__norm=norm)
  variables = randomize_batch_stats(init(model, (8, 8, 1)), seed=1) if norm == "batch" else init(model, (8, 8, 1))
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 1))
  apply_state, z, encode_state, classify_state = assert_split_is_exact(model, variables, x)
  chex.assert_shape(z, (4, 4, 4, 16))
  embed, classify = model.split("pooled")
  chex.assert_trees_all_equal(classify(variables, embed(variables, x)[0])[0], model.apply(variables, x)[0])
  block = variables["params"]["encoder"]["stage2_block1"]
  if norm == "batch":
    assert set(apply_state["batch_stats"]) == {"encoder", "head"}
    assert set(block["bn1"]) == {"scale", "bias"} and "bias" not in block["conv1"]
  else:  # no running statistics: nothing to keep from a train-mode pass
    assert "batch_stats" not in variables and encode_state == classify_state == {"batch_stats": {}}
  if norm == "group":  # widths 8 → 16: GroupNorm's scale and bias per channel (2 and 4 groups of 4 channels)
    assert set(block["bn1"]["gn"]) == {"scale", "bias"} and block["bn2"]["gn"]["scale"].shape == (16,)
    assert "bias" not in block["conv1"]
  if norm == "none":  # no normalisation: the convolutions get their biases back
    assert "bn1" not in block and block["conv1"]["bias"].shape == (16,)
    assert set(variables["params"]["head"]) == {"dense"}


def test_group_norm_option_normalises_each_group_by_hand():
  """The head's pooled features with norm=group: GroupNorm(4 groups of 4 channels) of z, then ReLU and the mean."""
  model = make_model(resnet__norm="group")
  variables = init(model, (8, 8, 1))
  params = variables["params"]["head"]["bn"]["gn"]
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}  # away from (1, 0)
  variables["params"]["head"]["bn"]["gn"] = params
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 1))
  z = np.asarray(model.encode(variables, x)[0], np.float64)
  pooled, _ = model.split("pooled")[0](variables, x)
  groups = z.reshape(3, 4, 4, 4, 4)
  normed = ((groups - groups.mean((1, 2, 4), keepdims=True)) / np.sqrt(groups.var((1, 2, 4), keepdims=True) + 1e-5))
  expected = np.maximum(normed.reshape(z.shape) * params["scale"] + params["bias"], 0).mean((1, 2))
  np.testing.assert_allclose(pooled, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation, norm", [("gelu", "group"), ("relu", "none")])
def test_activation_and_norm_options_train(activation, norm):
  """Without batch norm the tiny CNN learns more slowly, and spikes at SGD 0.1: a quarter off the loss in 40 steps at
  0.05."""
  config = tiny_config(resnet__activation=activation, resnet__norm=norm, schedule="constant", warmup_epochs=0,
                       learning_rate=0.05)
  losses, state = fit_one_batch(config, steps=40)
  assert losses[-1] < 0.75 * losses[0], losses
  chex.assert_tree_all_finite(state)


@pytest.mark.parametrize("field, value, fragments", [
    ("activation", "tanh", ["unknown resnet.activation 'tanh'", "relu, gelu"]),
    ("norm", "layer", ["unknown resnet.norm 'layer'", "batch, group, none"]),
])
def test_bad_activation_or_norm_is_one_line(tmp_path, capsys, field, value, fragments):
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", f"--config.resnet.{field}={value}")
  assert_one_line_error(code, err, *fragments)
  assert not (tmp_path / "wd").exists()
