"""Tests for overfocus_jax.models.attention (Learn to Pay Attention): the split at the first attention layer, shapes,
the attention maps, the compatibility/normalisation formulas by hand, training, and the one-line config errors."""

import json
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax import config as config_lib
from overfocus_jax.errors import UserError
from overfocus_jax.models import attention, build_model, merge_batch_stats
from overfocus_jax.models import check_fits_images as check_model_fits

from conftest import assert_one_line_error, assert_split_is_exact, digits_config, fit_one_batch, run_cli

# Four conv layers of widths 4, 8, 8, 16 with pools after 1 and 3 (8×8 → 4 → 2), attention on layers 2 and 3
# against a global feature of width 8: layer 2 needs no projection, layer 3 does not either, both at 8 wide.
TINY_ATTENTION = dict(attention__widths=(4, 8, 8, 16), attention__pool_after=(1, 3), attention__attention_layers=(2, 3),
                      attention__global_features=8)


def make_config(**fields):
  return digits_config("attention", **{**TINY_ATTENTION, **fields})


def make_model(num_classes=10, **fields):
  return build_model(make_config(**fields), num_classes)


def init(model, input_shape, seed=0):
  return jax.jit(lambda key: model.init(key, input_shape))(jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------- geometry


def test_feature_sizes_floor_at_each_pool():
  assert attention.feature_sizes(28, 28, 6, (1, 3, 5)) == [(28, 28), (14, 14), (14, 14), (7, 7), (7, 7), (3, 3),
                                                          (3, 3)]
  assert attention.first_empty_layer(8, 8, 6, (1, 3, 5)) is None       # 8 → 4 → 2 → 1
  assert attention.first_empty_layer(8, 8, 4, (1, 2, 3, 4)) == 4        # 8 → 4 → 2 → 1 → 0
  assert attention.first_empty_layer(9, 2, 3, (1, 2)) == 2              # the short side empties first


# ----------------------------------------------------------------------------- shapes and the split


@pytest.mark.parametrize("input_shape, z_hw, map_hws", [
    ((8, 8, 1), (4, 4), [(4, 4), (4, 4)]),
    ((28, 28, 1), (14, 14), [(14, 14), (14, 14)]),
    ((32, 32, 3), (16, 16), [(16, 16), (16, 16)]),
])
def test_output_shapes(input_shape, z_hw, map_hws):
  model = make_model(num_classes=7)
  variables = jax.eval_shape(lambda key: model.init(key, input_shape), jax.random.PRNGKey(0))
  x = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
  for train in (False, True):
    z, _ = jax.eval_shape(lambda v, x: model.encode(v, x, train=train), variables, x)
    logits, _ = jax.eval_shape(lambda v, z: model.classify(v, z, train=train), variables, z)
    chex.assert_shape(z, (3, *z_hw, 8))
    chex.assert_shape(logits, (3, 7))
    assert logits.dtype == jnp.float32
  maps = jax.eval_shape(model.attention_maps, variables, x)
  assert [m.shape for m in maps] == [(3, *hw) for hw in map_hws]
  assert model.keypoints(variables, x) is None


def test_default_backbone_shapes_on_mnist_and_digits():
  model = build_model(config_lib.build_config(None, [("model", "attention")]), 10)
  for input_shape, maps in (((28, 28, 1), [(14, 14), (7, 7)]), ((8, 8, 1), [(4, 4), (2, 2)])):
    variables = jax.eval_shape(lambda key: model.init(key, input_shape), jax.random.PRNGKey(0))
    x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    assert [m.shape[1:] for m in jax.eval_shape(model.attention_maps, variables, x)] == maps
    z, _ = jax.eval_shape(model.encode, variables, x)
    chex.assert_shape(z, (2, *maps[0], 32))  # z is the first attention layer's map


@pytest.fixture(scope="module")
def tiny():
  model = make_model()
  variables = init(model, (8, 8, 1))
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 1))
  return model, variables, x


def test_split_equals_apply_and_each_half_keeps_its_batch_stats(tiny):
  _, variables, _ = tiny
  state, _, encode_state, classify_state = assert_split_is_exact(*tiny)
  assert set(encode_state["batch_stats"]) == {"encoder"} and set(classify_state["batch_stats"]) == {"head"}
  chex.assert_trees_all_equal(merge_batch_stats(variables["batch_stats"], encode_state, classify_state),
                              state["batch_stats"])
  # The encoder holds layers 1..2 (up to the first attention layer); the head the rest and the attention.
  assert set(variables["params"]["encoder"]) == {"layer1", "layer2"}
  assert set(variables["params"]["head"]) == {"layer3", "layer4", "global", "compat2", "compat3", "classifier"}


def test_softmax_maps_sum_to_one_and_are_functions_of_z(tiny):
  model, variables, x = tiny
  maps = model.attention_maps(variables, x)
  assert len(maps) == 2
  for a in maps:
    np.testing.assert_allclose(np.asarray(a).sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert np.all(np.asarray(a) > 0)
  # Every map depends on x only through z: the gradient of a map w.r.t. z reaches it from the head alone.
  z, _ = model.encode(variables, x)
  grad = jax.grad(lambda z: model.module.apply(variables, z, False, True, method=lambda m, z, t, r: m.head(z, t, r))[1]
                  [1][0, 0, 0])(z)
  assert np.abs(grad[0]).max() > 0
  np.testing.assert_array_equal(grad[1:], 0.0)  # inference mode: other examples play no part
  # The forward that also returns the maps: the same logits and maps in one pass.
  logits, both = model.module.apply(variables, x, method="forward_with_maps")
  np.testing.assert_allclose(logits, model.apply(variables, x)[0], rtol=1e-6)
  for a, b in zip(both, maps):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("compatibility", ["pc", "dp"])
def test_sigmoid_maps_lie_in_zero_one(compatibility):
  model = make_model(attention__compatibility=compatibility, attention__normalisation="sigmoid")
  variables = init(model, (8, 8, 1))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
  for a in model.attention_maps(variables, x):
    assert np.all((np.asarray(a) > 0) & (np.asarray(a) < 1))
  z, _ = model.encode(variables, x)
  chex.assert_trees_all_equal(model.classify(variables, z)[0], model.apply(variables, x)[0])
  assert ("compat2" in variables["params"]["head"]) == (compatibility == "pc")


def test_projection_only_where_a_layer_is_narrower_than_g():
  model = make_model(attention__widths=(4, 8, 16, 16), attention__attention_layers=(1, 2, 3),
                     attention__global_features=16)
  params = jax.eval_shape(lambda key: model.init(key, (8, 8, 1)), jax.random.PRNGKey(0))["params"]
  assert {name for name in params["head"] if name.startswith("project")} == {"project1", "project2"}
  chex.assert_shape(params["head"]["project1"]["kernel"], (1, 1, 4, 16))
  assert set(params["encoder"]) == {"layer1"}  # z = layer 1's map


# ----------------------------------------------------------------------------- the formulas by hand


def test_compatibility_normalise_attend_by_hand():
  rng = np.random.default_rng(0)
  local = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  g = rng.normal(size=(2, 5)).astype(np.float32)
  u = rng.normal(size=(5,)).astype(np.float32)
  pc = attention.compatibility(jnp.asarray(local), jnp.asarray(g), jnp.asarray(u))
  dp = attention.compatibility(jnp.asarray(local), jnp.asarray(g), None)
  np.testing.assert_allclose(pc, ((local + g[:, None, None, :]) * u).sum(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dp, (local * g[:, None, None, :]).sum(-1), rtol=1e-5, atol=1e-5)
  scores = np.asarray(pc)
  soft = np.exp(scores - scores.max(axis=(1, 2), keepdims=True))
  soft /= soft.sum(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(attention.normalise(pc, "softmax"), soft, rtol=1e-5)
  np.testing.assert_allclose(attention.normalise(pc, "sigmoid"), 1 / (1 + np.exp(-scores)), rtol=1e-5)
  np.testing.assert_allclose(attention.attend(jnp.asarray(soft), jnp.asarray(local), "softmax"),
                             (soft[..., None] * local).sum((1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(attention.attend(jnp.asarray(soft), jnp.asarray(local), "sigmoid"),
                             (soft[..., None] * local).mean((1, 2)), rtol=1e-5, atol=1e-6)
  # Uniform softmax attention is global average pooling.
  uniform = jnp.full((2, 3, 4), 1 / 12)
  np.testing.assert_allclose(attention.attend(uniform, jnp.asarray(local), "softmax"), local.mean((1, 2)), rtol=1e-5,
                             atol=1e-6)


def test_logits_by_hand_from_the_head_parameters(tiny):
  """classify(z) = classifier([Σ a² l², Σ a³ l³]), a = softmax⟨u, l + g⟩, recomputed from the parameters."""
  model, variables, x = tiny
  z, _ = model.encode(variables, x)
  logits, _ = model.classify(variables, z)
  head = variables["params"]["head"]
  stats = variables["batch_stats"]["head"]

  def layer(name, v):
    v = jax.lax.conv_general_dilated(v, head[name]["conv"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    bn, st = head[name]["bn"], stats[name]["bn"]
    return jax.nn.relu((v - st["mean"]) / jnp.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"])

  l2 = z
  l3 = layer("layer3", l2)  # no pool between layers 2 and 3
  last = layer("layer4", jax.lax.reduce_window(l3, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"))
  g = last.mean((1, 2)) @ head["global"]["kernel"] + head["global"]["bias"]
  attended = []
  for name, local in (("compat2", l2), ("compat3", l3)):
    scores = jnp.einsum("bhwc,c->bhw", local + g[:, None, None], head[name][:, 0])
    a = jax.nn.softmax(scores.reshape(len(x), -1), -1).reshape(scores.shape)
    attended.append(jnp.einsum("bhw,bhwc->bc", a, local))
  expected = jnp.concatenate(attended, -1) @ head["classifier"]["kernel"] + head["classifier"]["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- training


def test_train_steps_lower_the_loss():
  losses, state = fit_one_batch(make_config(schedule="constant", warmup_epochs=0, learning_rate=0.1), steps=20)
  assert losses[-1] < 0.5 * losses[0], losses
  chex.assert_tree_all_finite(state)


def test_trains_one_epoch_through_the_cli(tmp_path, capsys):
  args = [f"--config.{k.replace('__', '.')}={v!r}".replace(" ", "") for k, v in TINY_ATTENTION.items()]
  code, out, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", "--config.model=attention",
                           "--config.dataset=digits", *args, "--config.num_epochs=1", "--config.batch_size=64",
                           "--no-progress")
  assert code == 0, err
  assert '"model": "attention"' in out
  # The attention maps are drawn by `overfocus explain`, with every attribution method (z is a feature map).
  code, out, err = run_cli(capsys, "explain", "--workdir", tmp_path / "wd", "--n", "2", "--images", "8",
                           "--ig-steps", "2", "--no-progress")
  assert code == 0, err
  summary = json.loads(out.strip().splitlines()[-1])
  assert "latent" in summary["methods"] and "grad_cam" in summary["methods"]
  assert (tmp_path / "wd" / "explain" / "attention.png").stat().st_size > 5000


@pytest.mark.parametrize("regularizer", ["sgdrop", "rsc"])
def test_regularizers_train_the_attention_model(tmp_path, capsys, regularizer):
  args = [f"--config.{k.replace('__', '.')}={v!r}".replace(" ", "") for k, v in TINY_ATTENTION.items()]
  code, out, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", "--config.model=attention",
                           "--config.dataset=digits", *args, "--config.num_epochs=1", "--config.batch_size=64",
                           f"--config.regularizer.name={regularizer}", "--no-progress")
  assert code == 0, err
  record = json.loads((tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()[-1])
  assert record[f"train_{regularizer}_dropped_fraction"] > 0


# ----------------------------------------------------------------------------- bad input


def test_check_model_fits():
  check_model_fits(make_config(), (8, 8, 1))
  check_model_fits(config_lib.build_config(None, [("model", "attention")]), (8, 8, 1))  # the default: 8 → 1
  with pytest.raises(UserError, match=r"8x8 images are too small.*pool_after=\(1, 2, 3, 4\).*by layer 4"):
    check_model_fits(make_config(attention__pool_after=(1, 2, 3, 4)), (8, 8, 1))


BAD_FIELDS = [
    (["--config.attention.attention_layers=(2,5)"],
     ["attention_layers=(2, 5)", "4-layer", "valid layer indices are 1..4"]),
    (["--config.attention.attention_layers=(0,2)"], ["attention_layers=(0, 2)", "1..4"]),
    (["--config.attention.attention_layers=()"], ["attention_layers is empty"]),
    (["--config.attention.attention_layers=(3,2)"], ["not strictly increasing"]),
    (["--config.attention.pool_after=(1,9)"], ["pool_after=(1, 9)", "1..4"]),
    (["--config.attention.compatibility=cos"], ["unknown attention.compatibility 'cos'", "pc, dp"]),
    (["--config.attention.normalisation=relu"], ["unknown attention.normalisation 'relu'", "softmax, sigmoid"]),
    (["--config.attention.widths=(4,0)"], ["attention.widths", "positive integers"]),
    (["--config.attention.global_features=0"], ["config.attention.global_features=0"]),
]


@pytest.mark.parametrize("overrides, fragments", BAD_FIELDS, ids=[b[0][0] for b in BAD_FIELDS])
def test_bad_attention_config_is_one_line(tmp_path, capsys, overrides, fragments):
  workdir = tmp_path / "wd"
  code, _, err = run_cli(capsys, "train", "--workdir", workdir, "--config.model=attention",
                         "--config.attention.widths=(4,8,8,16)", "--config.attention.pool_after=(1,3)",
                         "--config.attention.attention_layers=(2,3)", *overrides)
  assert_one_line_error(code, err, *fragments)
  assert not workdir.exists()


def test_input_too_small_for_the_backbone_is_one_line(tmp_path, capsys):
  """Needs the data: four pools take scikit-learn's 8×8 digits to 0×0."""
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", "--config.model=attention",
                         "--config.dataset=digits", "--config.attention.widths=(4,8,8,16)",
                         "--config.attention.pool_after=(1,2,3,4)", "--config.attention.attention_layers=(2,3)",
                         "--no-progress")
  assert_one_line_error(code, err, "8x8 images are too small", "pool_after", "remove pools")
