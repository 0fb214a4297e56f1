"""Tests for overfocus_jax.models.convnext (ConvNeXt in timm's small sizes): shapes and both splits at several input
sizes and stems, timm's exact parameter counts, timm's initialisation, the timm state-dict mapping both ways, drop
path (training only, through the train step's key), bfloat16, training on digits, the CLI and the config errors; with
torch and timm importable, logits against timm's own convnext_atto."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax import optimization
from overfocus_jax import config as config_lib
from overfocus_jax.models import Model, build_model, convnext, parameter_count

from conftest import (REPO_ROOT, abstract_variables, assert_one_line_error, assert_split_is_exact,
                      assert_the_experiment_accepts, digits_config, fit_one_batch, run_cli)

# timm's parameter counts for convnext_<size>(num_classes=1000), computed from timm's layers (stem conv + LN, per
# block 8C² + 58C, downsample LN + 2×2 conv, head LN + fc): the exact integers behind timm's 3.70M … 28.6M.
TIMM_PARAMETERS = {"atto": 3_695_520, "femto": 5_217_784, "pico": 9_045_672, "nano": 15_593_560,
                   "tiny": 28_589_128}
# For the numeric tests: ConvNeXt's layers at one block per stage, narrow, with the 1×1 stem, on 16×16×1 inputs (z:
# 2×2×32, 16 → 8 → 4 → 2) — a third of atto's blocks to compile on 2 cores.
MICRO = dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), patch_size=1)


def make_config(**fields):
  return digits_config("convnext", **fields)


def make_model(num_classes=10, **fields):
  return build_model(make_config(**fields), num_classes)


def micro_model(num_classes=10, **fields):
  return Model(convnext.ConvNeXt(num_classes, **{**MICRO, **fields}), "convnext")


def random_variables(model, input_shape, seed=0):
  """Every parameter drawn with numpy — LayerNorms and layer scales away from their initial 1, 0 and 1e-6, so a
  mistake in any of them shows in the logits (at γ = 1e-6 every block is nearly the identity)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if name.endswith("['kernel']"):
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
    elif name.endswith("['scale']") or name.endswith("['gamma']"):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = rng.normal(0.0, 0.1, shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, input_shape))


# ----------------------------------------------------------------------------- geometry and sizes


@pytest.mark.parametrize("input_shape, stem, z_hw", [
    ((8, 8, 1), "small", (1, 1)),       # digits: 4 → 2 → 1 → 1
    ((28, 28, 1), "small", (2, 2)),     # 14 → 7 → 4 → 2
    ((28, 28, 1), "imagenet", (1, 1)),  # 7 → 4 → 2 → 1
    ((28, 28, 3), "pixel", (4, 4)),     # 28 → 14 → 7 → 4
    ((224, 224, 3), "imagenet", (7, 7)),
    ((1, 1, 1), "imagenet", (1, 1)),    # padded up at every step
    ((9, 30, 2), "small", (1, 2)),      # each side on its own: 9 → 5 → 3 → 2 → 1; 30 → 15 → 8 → 4 → 2
])
def test_output_shapes_and_both_splits(input_shape, stem, z_hw):
  model = make_model(num_classes=7, convnext__stem=stem)
  variables = abstract_variables(model, input_shape)
  x = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
  embed, classify_embedding = model.split("pooled")
  for train in (False, True):
    z, _ = jax.eval_shape(lambda v, x: model.encode(v, x, train=train), variables, x)
    logits, _ = jax.eval_shape(lambda v, z: model.classify(v, z, train=train), variables, z)
    pooled, _ = jax.eval_shape(lambda v, x: embed(v, x, train=train), variables, x)
    pooled_logits, _ = jax.eval_shape(lambda v, p: classify_embedding(v, p, train=train), variables, pooled)
    chex.assert_shape(z, (3, *z_hw, 320))
    chex.assert_shape((logits, pooled_logits), (3, 7))
    chex.assert_shape(pooled, (3, 320))
    assert logits.dtype == jnp.float32
  patch = convnext.STEMS[stem]
  assert variables["params"]["encoder"]["stem_conv"]["kernel"].shape == (patch, patch, input_shape[-1], 40)


def test_padding_computes_timms_outputs_and_one_more_per_odd_side():
  """A k = stride conv on the end-padded map: timm's unpadded outputs first, then the extra row and column."""
  rng = np.random.default_rng(0)
  x, kernel = rng.normal(size=(1, 7, 5, 2)).astype(np.float32), rng.normal(size=(2, 2, 2, 3)).astype(np.float32)
  conv = lambda x: jax.lax.conv_general_dilated(x, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  padded = conv(convnext.pad_to_multiple(jnp.asarray(x), 2))
  assert padded.shape == (1, 4, 3, 3)
  np.testing.assert_allclose(padded[:, :3, :2], conv(jnp.asarray(x)), rtol=1e-6)
  assert convnext.pad_to_multiple(jnp.zeros((1, 8, 8, 1)), 4).shape == (1, 8, 8, 1)
  assert convnext.pad_to_multiple(jnp.zeros((1, 1, 6, 1)), 4).shape == (1, 4, 8, 1)


@pytest.mark.parametrize("size", list(TIMM_PARAMETERS))
def test_parameter_counts_equal_timms(size):
  """convnext_<size> on 224×224×3 and 1,000 classes, counted from shapes (nothing allocated)."""
  depths, dims, _ = convnext.SIZES[size]
  variables = abstract_variables(make_model(num_classes=1000, convnext__size=size), (224, 224, 3))
  assert set(variables) == {"params"}
  assert parameter_count(variables["params"]) == TIMM_PARAMETERS[size]
  encoder = variables["params"]["encoder"]
  assert sum(name.startswith("stage") for name in encoder) == sum(depths)
  assert encoder[f"stage3_block{depths[3] - 1}"]["conv_dw"]["kernel"].shape == (7, 7, 1, dims[3])
  assert encoder["stage2_block0"]["fc1"]["kernel"].shape == (dims[2], 4 * dims[2])


def test_width_multiplier_scales_every_stage():
  assert convnext.scaled_dims((40, 80, 160, 320), 0.25) == (10, 20, 40, 80)
  assert convnext.scaled_dims((40, 80, 160, 320), 0.001) == (1, 1, 1, 1)
  model = make_model(convnext__width=0.25)
  z = jax.eval_shape(lambda v, x: model.encode(v, x)[0], abstract_variables(model, (8, 8, 1)),
                     jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32))
  chex.assert_shape(z, (2, 1, 1, 80))


def test_initialisation_is_timms():
  """Kernels N(0, 0.02²) truncated at ±2 absolute (so not at ±2σ), zero biases, LayerNorms at the identity,
  γ = layer_scale_init; the classifier's kernel times head_init_scale."""
  model = micro_model(dims=(32, 64, 96, 128), layer_scale_init=1e-5, head_init_scale=0.5)
  params = jax.jit(lambda key: model.init(key, (4, 4, 1)))(jax.random.PRNGKey(0))["params"]
  flat = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  kernels = np.concatenate([v.ravel() for k, v in flat.items() if k.endswith("['kernel']") and "'fc'" not in k])
  np.testing.assert_allclose(kernels.std(), 0.02, rtol=0.02)
  assert np.abs(kernels).max() > 2.5 * 0.02  # a ±2σ truncation would stop at 0.04
  np.testing.assert_allclose(params["head"]["fc"]["kernel"].std(), 0.01, rtol=0.05)
  assert all(np.all(v == 0) for k, v in flat.items() if k.endswith("['bias']"))
  assert all(np.all(v == 1) for k, v in flat.items() if k.endswith("['scale']"))
  gammas = [v for k, v in flat.items() if k.endswith("['gamma']")]
  assert len(gammas) == 4 and all(np.all(v == np.float32(1e-5)) for v in gammas)


# ----------------------------------------------------------------------------- splits, drop path, dtype


def start_state(variables, tx, regularizer=None):
  """A train state at ``variables`` (``create_train_state`` without running the model's ``init``)."""
  from overfocus_jax.challenge import NONE
  from overfocus_jax.train import state as state_lib
  regularizer = regularizer or NONE
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], batch_stats={},
                              opt_state=tx.init(variables["params"]), rng=jax.random.PRNGKey(0),
                              regularizer_state=regularizer.init({"params": variables["params"], "batch_stats": {}}))


@pytest.fixture(scope="module")
def micro():
  """The micro ConvNeXt (:data:`MICRO`) on 16×16×1 inputs, every parameter random: (model, variables, x)."""
  model = micro_model()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 1))
  return model, random_variables(model, (16, 16, 1)), x


def test_splits_are_exact_and_there_is_no_state(micro):
  model, variables, x = micro
  assert set(variables) == {"params"}
  _, z, encode_state, classify_state = assert_split_is_exact(model, variables, x)
  chex.assert_shape(z, (4, 2, 2, 32))
  assert encode_state == classify_state == {"batch_stats": {}}
  embed, classify_embedding = model.split("pooled")
  pooled, _ = embed(variables, x)
  chex.assert_trees_all_equal(classify_embedding(variables, pooled)[0], model.apply(variables, x)[0])
  # The pooled vector is after the head's LayerNorm: zero mean and unit variance before its scale and bias.
  norm = variables["params"]["head"]["norm"]
  standardised = (pooled - norm["bias"]) / norm["scale"]
  np.testing.assert_allclose(standardised.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(standardised.std(-1), 1, atol=1e-3)
  # One example's score depends on that example's z alone.
  grad = jax.grad(lambda z: model.classify(variables, z)[0][1, 3])(z)
  assert np.abs(grad[1]).max() > 0
  np.testing.assert_array_equal(np.delete(np.asarray(grad), 1, axis=0), 0)


def test_drop_path_only_in_training_and_only_with_a_key(micro):
  plain, variables, x = micro
  model = micro_model(drop_path_rate=0.5)
  inference = model.apply(variables, x)[0]
  chex.assert_trees_all_equal(inference, plain.apply(variables, x)[0])
  key_a, key_b = jax.random.PRNGKey(3), jax.random.PRNGKey(4)
  train_a = model.apply(variables, x, train=True, rng=key_a)[0]
  chex.assert_trees_all_equal(model.apply(variables, x, train=False, rng=key_a)[0], inference)
  chex.assert_trees_all_equal(model.apply(variables, x, train=True, rng=key_a)[0], train_a)  # the key decides
  assert not np.allclose(train_a, inference)
  assert not np.allclose(model.apply(variables, x, train=True, rng=key_b)[0], train_a)
  z, _ = model.encode(variables, x, train=True, rng=key_a)
  chex.assert_trees_all_equal(model.classify(variables, z, train=True)[0], train_a)
  with pytest.raises(ValueError, match="drop path needs a 'dropout' PRNG key"):
    model.apply(variables, x, train=True)
  # drop_path_rate = 0: training is inference, key or not.
  chex.assert_trees_all_equal(plain.apply(variables, x, train=True, rng=key_a)[0], plain.apply(variables, x)[0])


def test_drop_path_is_per_sample_and_keeps_the_expectation():
  x = jnp.ones((2000, 2, 2, 3))
  y = np.asarray(convnext.drop_path(x, 0.3, jax.random.PRNGKey(0)))
  per_sample = y.reshape(2000, -1)
  assert np.all(per_sample.min(1) == per_sample.max(1))  # each sample all dropped or all kept
  np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.7], rtol=1e-6)
  np.testing.assert_allclose((per_sample[:, 0] == 0).mean(), 0.3, atol=0.04)
  np.testing.assert_allclose(y.mean(), 1.0, atol=0.06)
  rates = convnext.drop_path_rates(0.1, (2, 2, 6, 2))
  assert [len(r) for r in rates] == [2, 2, 6, 2] and rates[0][0] == 0 and rates[-1][-1] == pytest.approx(0.1)
  np.testing.assert_allclose(np.diff(sum(rates, [])), 0.1 / 11)


def test_the_train_step_gives_drop_path_a_fresh_key(micro):
  """The same step from the same parameters with two state keys: other drop-path masks, other losses — and the
  step's key moves on, so the next step draws new ones."""
  import optax
  from overfocus_jax.train.step import make_train_step
  _, variables, x = micro
  model, tx = micro_model(drop_path_rate=0.5), optax.adamw(1e-3, weight_decay=0.05)
  batch = {"image": x, "label": jnp.arange(4, dtype=jnp.int32)}
  state = start_state(variables, tx)
  step = jax.jit(make_train_step(model, tx))
  first, metrics = step(state, batch)
  other = step(state.replace(rng=jax.random.PRNGKey(1)), batch)[1]
  again = step(state, batch)[1]
  assert float(metrics["loss"]) == float(again["loss"]) != float(other["loss"])
  assert np.isfinite(float(metrics["loss"])) and not np.array_equal(first.rng, state.rng)


def test_bfloat16_activations_with_float32_parameters_and_logits(micro):
  model, variables, x = micro
  bf16 = micro_model(dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract_variables(bf16, (16, 16, 1)))} == {jnp.dtype(jnp.float32)}
  z, _ = bf16.encode(variables, x)
  logits, _ = bf16.apply(variables, x, train=True)
  pooled, _ = bf16.split("pooled")[0](variables, x)
  assert z.dtype == jnp.bfloat16 and pooled.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  reference = model.apply(variables, x)[0]
  np.testing.assert_allclose(logits, reference, atol=0.05 * float(jnp.abs(reference).max()))


# ----------------------------------------------------------------------------- timm's state dict


def timm_names(depths, conv_mlp):
  """timm's state-dict names and ranks for convnext (written out from timm's modules, not from convnext.py)."""
  names = {"stem.0.weight": 4, "stem.0.bias": 1, "stem.1.weight": 1, "stem.1.bias": 1}
  for i, depth in enumerate(depths):
    if i > 0:
      names.update({f"stages.{i}.downsample.0.weight": 1, f"stages.{i}.downsample.0.bias": 1,
                    f"stages.{i}.downsample.1.weight": 4, f"stages.{i}.downsample.1.bias": 1})
    for j in range(depth):
      block = f"stages.{i}.blocks.{j}"
      names.update({f"{block}.conv_dw.weight": 4, f"{block}.conv_dw.bias": 1, f"{block}.norm.weight": 1,
                    f"{block}.norm.bias": 1, f"{block}.gamma": 1})
      for fc in ("fc1", "fc2"):
        names.update({f"{block}.mlp.{fc}.weight": 4 if conv_mlp else 2, f"{block}.mlp.{fc}.bias": 1})
  names.update({"head.norm.weight": 1, "head.norm.bias": 1, "head.fc.weight": 2, "head.fc.bias": 1})
  return names


@pytest.mark.parametrize("size", ["atto", "tiny"])
def test_to_timm_writes_timms_names_and_shapes(size):
  depths, dims, conv_mlp = convnext.SIZES[size]
  abstract = abstract_variables(make_model(num_classes=1000, convnext__size=size), (224, 224, 3))
  state = convnext.to_timm(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract), conv_mlp=conv_mlp)
  assert {name: v.ndim for name, v in state.items()} == timm_names(depths, conv_mlp)
  assert sum(v.size for v in state.values()) == TIMM_PARAMETERS[size]
  assert state["stem.0.weight"].shape == (dims[0], 3, 4, 4)
  assert state["stages.0.blocks.0.conv_dw.weight"].shape == (dims[0], 1, 7, 7)
  assert state["stages.1.downsample.1.weight"].shape == (dims[1], dims[0], 2, 2)
  assert state["stages.2.blocks.0.mlp.fc1.weight"].shape[:2] == (4 * dims[2], dims[2])
  assert state["head.fc.weight"].shape == (1000, dims[3])


def timm_forward(state, x_nhwc, depths):
  """timm's ``ConvNeXt.forward`` in eval mode written out in PyTorch's layout from a timm state dict: NCHW maps,
  OIHW kernels, unpadded stem and downsampling convs, LayerNorm2d over the channel axis, the MLP as 1×1 convs
  (``conv_mlp``), γ as ``gamma.reshape(1, -1, 1, 1)``, head = pool → LayerNorm → Linear."""
  column = lambda name: state[name][None, :, None, None]

  def conv(x, name, stride=1, padding=0, groups=1):
    y = jax.lax.conv_general_dilated(x, state[f"{name}.weight"], (stride, stride), [(padding, padding)] * 2,
                                     feature_group_count=groups, dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + column(f"{name}.bias")

  def layer_norm(x, name, axis):
    mean = x.mean(axis, keepdims=True)
    normed = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(axis, keepdims=True) + 1e-6)
    if axis == 1:
      return normed * column(f"{name}.weight") + column(f"{name}.bias")
    return normed * state[f"{name}.weight"] + state[f"{name}.bias"]

  x = jnp.transpose(x_nhwc, (0, 3, 1, 2))
  x = layer_norm(conv(x, "stem.0", stride=state["stem.0.weight"].shape[-1]), "stem.1", 1)
  for i, depth in enumerate(depths):
    if i > 0:
      x = conv(layer_norm(x, f"stages.{i}.downsample.0", 1), f"stages.{i}.downsample.1", stride=2)
    for j in range(depth):
      block = f"stages.{i}.blocks.{j}"
      y = layer_norm(conv(x, f"{block}.conv_dw", padding=3, groups=x.shape[1]), f"{block}.norm", 1)
      y = conv(jax.nn.gelu(conv(y, f"{block}.mlp.fc1"), approximate=False), f"{block}.mlp.fc2")
      x = x + y * column(f"{block}.gamma")
  pooled = layer_norm(x.mean((2, 3)), "head.norm", -1)
  return pooled @ state["head.fc.weight"].T + state["head.fc.bias"]


def test_the_forward_pass_is_timms_in_its_layout():
  """With the ImageNet stem on 32×32 (every stride divides every side: 8 → 4 → 2 → 1), the logits of
  :func:`timm_forward` on ``to_timm``'s state dict."""
  model = micro_model(patch_size=4)
  variables = random_variables(model, (32, 32, 3), seed=4)
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 32, 32, 3))
  expected = jax.jit(timm_forward, static_argnums=2)(convnext.to_timm(variables, conv_mlp=True), x, MICRO["depths"])
  logits = jax.jit(lambda v, x: model.apply(v, x)[0])(variables, x)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_from_timm_inverts_to_timm(micro):
  model, variables, x = micro
  for conv_mlp in (True, False):
    state = convnext.to_timm(variables, conv_mlp=conv_mlp)
    fresh = jax.tree.map(jnp.zeros_like, variables)
    loaded = convnext.from_timm(state, fresh)
    chex.assert_trees_all_equal(loaded, variables)
    chex.assert_trees_all_equal(model.apply(loaded, x)[0], model.apply(variables, x)[0])


def test_from_timm_refuses_what_does_not_fit(micro):
  from overfocus_jax.models.weights import Mismatch
  _, variables, _ = micro
  state = convnext.to_timm(variables, conv_mlp=True)
  with pytest.raises(Mismatch, match=r"expected 'stem\.0\.weight' to convert to this model's encoder/stem_conv/"
                     r"kernel of shape \(1, 1, 1, 8\), found \(8, 3, 4, 4\)"):
    convnext.from_timm({**state, "stem.0.weight": np.zeros((8, 3, 4, 4), np.float32)}, variables)
  with pytest.raises(Mismatch, match=r"found 'stages\.0\.blocks\.9\.gamma' of shape \(8,\), which the model has no"):
    convnext.from_timm({**state, "stages.0.blocks.9.gamma": np.zeros(8, np.float32)}, variables)
  with pytest.raises(Mismatch, match=r"expected 'stages\.3\.blocks\.0\.gamma', found no such tensor"):
    convnext.from_timm({k: v for k, v in state.items() if k != "stages.3.blocks.0.gamma"}, variables)


@pytest.mark.parametrize("head, reason", [
    ({}, "the file has no head.fc"),
    ({"head.fc.weight": np.zeros((1000, 32), np.float32), "head.fc.bias": np.zeros(1000, np.float32)},
     "the file's head.fc has 1000 classes, the model 10"),
])
def test_from_timm_keeps_a_fresh_classifier_for_other_classes(micro, capsys, head, reason):
  """ImageNet's weights on a 10-class model: everything but head.fc, which keeps its values (one line on stderr)."""
  _, variables, _ = micro
  state = {**{k: v for k, v in convnext.to_timm(variables, conv_mlp=True).items() if not k.startswith("head.fc")},
           **head}
  fresh = jax.tree.map(jnp.zeros_like, variables)
  loaded = convnext.from_timm(state, fresh)
  chex.assert_trees_all_equal(loaded["params"]["head"]["fc"], fresh["params"]["head"]["fc"])
  chex.assert_trees_all_equal(loaded["params"]["head"]["norm"], variables["params"]["head"]["norm"])
  chex.assert_trees_all_equal(loaded["params"]["encoder"], variables["params"]["encoder"])
  assert capsys.readouterr().err == f"overfocus: init_from: {reason}: head.fc is re-initialised\n"


def test_init_from_reads_timm_layout_safetensors(tmp_path):
  """``--config.init_from=FILE --config.init_from_layout=timm``: the loader finds :func:`convnext.from_timm`."""
  from safetensors.numpy import save_file
  from overfocus_jax.train import experiment
  config = make_config(convnext__width=0.25, convnext__stem="small", init_from=str(tmp_path / "w.safetensors"),
                       init_from_layout="timm")
  model = build_model(config, 10)
  variables = random_variables(model, (8, 8, 1), seed=7)
  save_file(convnext.to_timm(variables, conv_mlp=True), str(tmp_path / "w.safetensors"))
  loaded = experiment.pretrained_variables(config, model, (8, 8, 1))
  chex.assert_trees_all_equal(loaded["params"], jax.device_get(variables["params"]))


def test_logits_equal_timms_convnext_atto():
  """timm's own convnext_atto, every parameter random, against this model with its state dict (64×64×3)."""
  torch = pytest.importorskip("torch")
  try:
    import timm
  except Exception as e:  # pylint: disable=broad-except  # absent, or a torchvision built for another torch
    pytest.skip(f"timm is not importable ({type(e).__name__}: {str(e)[:80]})")
  torch.manual_seed(0)
  reference = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
  with torch.no_grad():
    for param in reference.parameters():
      param.copy_(torch.randn_like(param) * (0.2 if param.ndim > 1 else 0.5) + (1.0 if param.ndim == 1 else 0.0))
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  model = make_model(num_classes=10)
  variables = convnext.from_timm(state, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                                     abstract_variables(model, (64, 64, 3))))
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    features = reference.forward_head(reference.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2))),
                                      pre_logits=True).numpy()
  logits = np.asarray(model.apply(variables, jnp.asarray(x))[0])
  pooled = np.asarray(model.split("pooled")[0](variables, jnp.asarray(x))[0])
  scale = np.abs(expected).max()
  np.testing.assert_allclose(logits, expected, atol=1e-4 * scale)
  np.testing.assert_allclose(pooled, features, atol=1e-4 * np.abs(features).max())
  assert np.array_equal(convnext.to_timm(variables, conv_mlp=True)["stem.0.weight"], state["stem.0.weight"])


# ----------------------------------------------------------------------------- the CPU's depthwise convolutions


NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("shape, kernel, padding", [
    ((3, 9, 6, 5), (7, 7), ((3, 3), (3, 3))),  # ConvNeXt's
    ((2, 5, 4, 3), (3, 5), ((1, 2), (0, 3))),  # uneven kernel and padding
    ((2, 1, 1, 4), (7, 7), ((3, 3), (3, 3))),  # a 1×1 map: every tap but the centre in the padding
    ((2, 6, 7, 3), (3, 3), "SAME"),
    ((2, 6, 7, 3), (3, 3), "VALID"),
])
def test_shifted_depthwise_convolution_equals_xlas(shape, kernel, padding):
  """platform_tuning's depthwise path: the value and both gradients of lax's grouped convolution."""
  from overfocus_jax import platform_tuning
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), (*kernel, 1, shape[-1]))
  conv = lambda f: lambda x, w: f(x, w, (1, 1), padding, dimension_numbers=NHWC, feature_group_count=shape[-1])
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(conv(f)(x, w)))
  shifted = platform_tuning.shifted_depthwise_conv_general_dilated
  np.testing.assert_allclose(conv(shifted)(x, w), conv(jax.lax.conv_general_dilated)(x, w), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.grad(loss(shifted), (0, 1))(x, w), jax.grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides, groups, kernel_in", [((2, 2), 4, 1), ((1, 1), 1, 4), ((1, 1), 2, 2)])
def test_other_convolutions_are_lax_unchanged(strides, groups, kernel_in):
  """Strided, ungrouped or partly grouped convolutions: the very program of lax.conv_general_dilated."""
  from overfocus_jax import platform_tuning
  x, w = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, kernel_in, 4))
  fn = lambda f: lambda x, w: jnp.sum(f(x, w, strides, "SAME", dimension_numbers=NHWC, feature_group_count=groups))
  ours = jax.make_jaxpr(jax.grad(fn(platform_tuning.shifted_depthwise_conv_general_dilated), (0, 1)))(x, w)
  assert str(ours) == str(jax.make_jaxpr(jax.grad(fn(jax.lax.conv_general_dilated), (0, 1)))(x, w))


def test_cpu_tuning_gives_convnext_the_shifted_depthwise_convolution(micro):
  """On one CPU device ``auto`` builds ConvNeXt's convolutions with the shifted depthwise path, ``off`` with
  nn.Conv; the logits and parameter gradients agree, in float32 and (to bfloat16's precision) in bfloat16."""
  import flax.linen as nn
  from overfocus_jax import models, parallel, platform_tuning
  mesh = parallel.make_mesh(jax.devices("cpu")[:1])
  platform = models.platform_of("convnext")
  tuned = platform_tuning.conv_module(mesh, "auto", platform.cpu_convolution, platform.onednn)
  assert tuned.func is nn.Conv
  hook = tuned.keywords["conv_general_dilated"]
  hook = getattr(hook, "fallback", hook)  # under the oneDNN kernels' hook where they are in use (dense layers)
  assert hook is platform_tuning.shifted_depthwise_conv_general_dilated
  assert platform_tuning.conv_module(mesh, "off", platform.cpu_convolution, platform.onednn) is nn.Conv
  _, variables, x = micro
  loss = lambda model: lambda params: jnp.sum(model.apply({"params": params}, x, train=True)[0] ** 2)
  for a, b in zip(jax.tree.leaves(jax.jit(jax.value_and_grad(loss(micro_model(conv=tuned))))(variables["params"])),
                  jax.tree.leaves(jax.jit(jax.value_and_grad(loss(micro_model())))(variables["params"]))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
  logits = lambda model: jax.jit(lambda v: model.apply(v, x)[0])(variables)
  bf16 = logits(micro_model(dtype=jnp.bfloat16, conv=tuned))
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, logits(micro_model(dtype=jnp.bfloat16)), atol=0.05 * float(np.abs(bf16).max()))


# ----------------------------------------------------------------------------- training and the CLI


def test_the_shipped_config_is_atto_with_the_small_stem_and_adamw():
  config = config_lib.build_config(str(REPO_ROOT / "experiments" / "configs" / "convnext.py"), [])
  assert (config.model, config.convnext.size, config.convnext.stem, config.dataset) == ("convnext", "atto", "small",
                                                                                        "mnist5k")
  assert (config.optimizer, config.learning_rate, config.weight_decay, config.schedule) == ("adamw", 4e-3, 0.05,
                                                                                            "cosine")
  model = build_model(config, 10)
  assert parameter_count(abstract_variables(model, (28, 28, 1))["params"]) == 3_375_970


def test_atto_with_the_small_stem_fits_a_batch_of_digits():
  config = make_config(convnext__stem="small", optimizer="adamw", learning_rate=2e-3, weight_decay=0.05,
                       schedule="constant", warmup_epochs=0)
  losses, state = fit_one_batch(config, steps=6)  # 2.33 → 0.31 (measured)
  assert losses[-1] < 0.25 * losses[0], losses
  chex.assert_tree_all_finite(state)


def test_every_regularizer_fits_the_model():
  assert_the_experiment_accepts(make_model(), make_config)


@pytest.mark.parametrize("regularizer", ["sgdrop", "rsc_domainbed"])
def test_the_regularizers_mask_at_the_split(micro, regularizer):
  """SGDrop on the 2×2 latent map, DomainBed's RSC on the pooled vector: a jitted step changes samples."""
  from overfocus_jax.regularizers import build_regularizer
  from overfocus_jax.train.step import make_train_step
  model, variables, x = micro
  config = make_config(regularizer__name=regularizer)
  reg = build_regularizer(config, 10)
  tx = optimization.make_optimizer(config, optimization.make_schedule(config, 10))
  state = start_state(variables, tx, reg)
  _, metrics = jax.jit(make_train_step(model, tx, regularizer=reg))(
      state, {"image": x, "label": jnp.arange(4, dtype=jnp.int32)})
  assert np.isfinite(float(metrics["loss"])) and float(metrics["regularized_share"]) > 0, metrics


def test_trains_one_epoch_and_explains_through_the_cli(tmp_path, capsys):
  """Digits at batch 256, atto at a quarter width with the small stem and drop path: 5 steps, then Grad-CAM.
  (platform_tuning=off: the CPU tuning's depthwise convolution, tested on its own above, doubles the compile time.)"""
  workdir = tmp_path / "wd"
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, "--config.model=convnext", "--config.dataset=digits",
                           "--config.convnext.stem=small", "--config.convnext.width=0.25",
                           "--config.convnext.drop_path_rate=0.1", "--config.optimizer=adamw",
                           "--config.learning_rate=0.002", "--config.weight_decay=0.05", "--config.num_epochs=1",
                           "--config.batch_size=256", "--config.platform_tuning=off", "--no-progress")
  assert code == 0, err
  assert '"model": "convnext"' in out
  record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
  assert np.isfinite(record["train_loss"]) and 0 <= record["test_accuracy"] <= 1, record
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"] == "convnext" and saved["convnext"]["drop_path_rate"] == 0.1
  # Grad-CAM at a block inside the encoder: `overfocus explain` finds ConvNeXt's layers by their module paths.
  code, out, err = run_cli(capsys, "explain", "--workdir", workdir, "--n", "2", "--images", "8",
                           "--methods", "grad_cam", "--layer", "encoder/stage1_block1", "--no-progress")
  assert code == 0, err
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["layer"] == "encoder/stage1_block1" and "grad_cam" in summary["methods"]


# ----------------------------------------------------------------------------- bad config


BAD_FIELDS = [
    (["--config.convnext.size=huge"], ["unknown convnext.size 'huge'", "atto, femto, pico, nano, tiny"]),
    (["--config.convnext.stem=overlap"], ["unknown convnext.stem 'overlap'", "imagenet, small, pixel"]),
    (["--config.convnext.width=0"], ["config.convnext.width=0.0", "positive number"]),
    (["--config.convnext.drop_path_rate=1"], ["config.convnext.drop_path_rate=1.0", "[0, 1)"]),
    (["--config.convnext.layer_scale_init=0"], ["config.convnext.layer_scale_init=0.0"]),
    (["--config.convnext.head_init_scale=nan"], ["config.convnext.head_init_scale=nan"]),
    (["--config.convnext.depth=3"], ["unknown config field 'config.convnext.depth'", "drop_path_rate"]),
]


@pytest.mark.parametrize("overrides, fragments", BAD_FIELDS, ids=[b[0][0] for b in BAD_FIELDS])
def test_bad_convnext_config_is_one_line(tmp_path, capsys, overrides, fragments):
  workdir = tmp_path / "wd"
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, "--config.model=convnext", "--config.dataset=digits",
                           "--config.num_epochs=1", "--no-progress", *overrides)
  assert_one_line_error(code, err, *fragments)
  assert out == "" and not workdir.exists()


@pytest.mark.parametrize("side, stride, z_side", [(224, 4, 7), (64, 2, 4), (32, 1, 4), (28, 1, 4), (8, 1, 1)])
def test_the_auto_stem_keeps_z_at_least_3x3_where_a_stem_can(side, stride, z_side):
  """stem=auto (the default): the largest stem whose last map keeps 3x3; the model's z has that side."""
  assert convnext.auto_stem(side, side) == stride
  model = make_model()
  shape = (side, side, 1)
  variables = abstract_variables(model, shape)
  z = jax.eval_shape(lambda v, x: model.encode(v, x)[0], variables, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  assert z.shape[1:3] == (z_side, z_side)
  assert variables["params"]["encoder"]["stem_conv"]["kernel"].shape[:2] == (stride, stride)
