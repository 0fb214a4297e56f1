"""Grad-CAM at any layer, coverage, feature usage, per-epoch attribution metrics and ``overfocus explain``.

The layer probe is checked against the encode/classify split (Grad-CAM at ``encoder`` is Grad-CAM on z), and
against a tiny Flax model whose head is linear, where Grad-CAM has a closed form at any layer.
"""

import contextlib
import io
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_one_line_error, last_json_line, read_metrics, run_cli, snapshot
from overfocus_jax import cli
from overfocus_jax import config as config_lib
from overfocus_jax.explain import attributions, latent, layers, metrics
from overfocus_jax.models import Model, build_model

def _tiny_resnet():
  config = config_lib.load_config_file(config_lib.default_config_path())
  config.resnet.update(dict(stem_features=8, stage_widths=(8, 16), stage_sizes=(1, 1), stage_strides=(1, 2)))
  model = build_model(config, 10)
  return model, model.init(jax.random.PRNGKey(0), (8, 8, 1))


class _ConvThenLinear(nn.Module):
  """conv → mean over positions → dense: Grad-CAM at ``conv`` is ReLU(a @ W[:, c] / hw)."""

  @nn.compact
  def __call__(self, x, train=False):
    a = nn.Conv(4, (3, 3), name="conv")(x)
    return nn.Dense(3, name="dense")(jnp.mean(a, axis=(1, 2)))


def test_feature_layers_are_the_per_image_maps_in_call_order():
  model, variables = _tiny_resnet()
  found = layers.linen_feature_layers(model, variables, (8, 8, 1))
  assert list(found)[0] == "encoder/stem" and found["encoder"] == (4, 4, 16)
  assert "head/dense" not in found and "" not in found  # vectors are not maps


def test_grad_cam_at_the_encoder_is_grad_cam_on_z():
  model, variables = _tiny_resnet()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
  labels = jnp.asarray([0, 3, 5, 9])
  probed = jax.jit(lambda v: layers.layer_grad_cam(layers.linen_probe(model, variables, "encoder"), v, labels))(x)
  split = attributions.grad_cam(lambda v: model.encode(variables, v)[0], lambda z: model.classify(variables, z)[0],
                                x, labels)
  np.testing.assert_allclose(probed, split, rtol=1e-5, atol=1e-6)
  # The probe does not change the forward pass.
  np.testing.assert_allclose(layers.layer_activation(layers.linen_probe(model, variables, "encoder"), x),
                             model.encode(variables, x)[0], rtol=1e-6)


def test_grad_cam_at_a_layer_by_hand():
  module = _ConvThenLinear()
  model = Model(module, "toy")
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 5, 1))
  variables = module.init(jax.random.PRNGKey(3), x)
  labels = jnp.asarray([2, 0])
  got = layers.layer_grad_cam(layers.linen_probe(model, variables, "conv"), x, labels)
  a = nn.Conv(4, (3, 3)).apply({"params": variables["params"]["conv"]}, x)  # the layer's output, by hand
  weights = variables["params"]["dense"]["kernel"][:, labels].T  # (B, 4)
  expected = np.maximum(np.einsum("bhwk,bk->bhw", a, weights) / 25.0, 0.0)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_coverage_on_hand_built_maps():
  same = jnp.zeros((3, 10)).at[:, 4].set(1.0)  # every input uses unit 4 only
  assert float(metrics.coverage(same)) == pytest.approx(0.1)
  spread = jnp.zeros((3, 10)).at[jnp.arange(3), jnp.asarray([1, 5, 7])].set(1.0)
  assert float(metrics.coverage(spread)) == pytest.approx(0.3)
  assert float(metrics.coverage(jnp.ones((2, 10)))) == 1.0
  weak = jnp.asarray([[1.0, 0.05, 0.2, 0.0]])  # scaled by the max: 0.05 is below the 0.1 threshold
  assert float(metrics.coverage(weak)) == pytest.approx(0.5)
  mask = jnp.asarray([1.0, 0.0, 0.0])  # padded rows cover nothing
  assert int(jnp.sum(metrics.covered_units(spread, mask=mask))) == 1


def test_usage_from_sums_by_hand():
  sums = {"abs_activation": np.asarray([8.0, 4.0]), "attribution": np.asarray([3.0, 1.0]), "count": 2.0,
          "positions": 4.0}
  usage = latent.usage_from_sums(sums)
  assert usage["activation"] == [1.0, 0.5] and usage["attribution"] == [1.5, 0.5]
  assert usage["share"] == [0.75, 0.25]
  expected = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
  assert usage["effective_channels"] == pytest.approx(expected)
  uniform = latent.usage_from_sums({**sums, "attribution": np.ones(5), "abs_activation": np.ones(5)})
  assert uniform["effective_channels"] == pytest.approx(5.0)


def test_training_logs_attribution_metrics_every_epoch(trained_workdir):
  records = read_metrics(trained_workdir)
  for record in records:
    assert 0 < record["attribution_ratio"] <= 0.5 + 1e-6  # ≤ uniform's ⌈N/2⌉/N
    assert record["attribution_ratio"] <= record["attribution_ratio_spatial"] <= 0.5 + 1e-6
    assert 0 <= record["attribution_entropy"] <= 1 and 0 <= record["attribution_gini"] < 1
    assert record["generalization_gap"] == pytest.approx(record["train_accuracy"] - record["test_accuracy"])


EXPLAIN_ARGS = ("--n", "3", "--images", "24", "--no-progress")


@pytest.fixture(scope="module")
def explained(trained_workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("explain")
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    code = cli.main(["explain", "--workdir", str(trained_workdir), "--out", str(out), "--compare",
                     str(trained_workdir), *EXPLAIN_ARGS])
  assert code == 0
  return out, stdout.getvalue()


def test_explain_writes_figures_and_json(explained):
  out, stdout = explained
  summary = last_json_line(stdout)
  assert summary == json.loads((out / "explain.json").read_text())
  assert set(summary["methods"]) == {"latent", "grad_cam", "input_gradient", "smoothgrad", "integrated_gradients"}
  for name, values in summary["methods"].items():
    for key in ("attribution_ratio", "entropy", "gini", "coverage", "deletion_auc", "insertion_auc"):
      assert 0 <= values[key] <= 1, (name, key, values[key])
  assert summary["images"] == 24 and 0 <= summary["accuracy"] <= 1
  for name in ("attributions", "training_curves", "feature_usage"):
    path = out / f"{name}.png"
    assert summary["figures"][name] == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
  assert len(summary["feature_usage"]) == 1  # the run compared with itself has one label
  usage = json.loads((out / "feature_usage.json").read_text())
  assert len(next(iter(usage.values()))["share"]) == 16


def test_explain_a_subset_of_methods_at_another_layer(trained_workdir, tmp_path, capsys):
  code, out, err = run_cli(capsys, "explain", "--workdir", trained_workdir, "--out", tmp_path, "--methods",
                           "grad_cam,input_gradient,integrated_gradients", "--layer", "encoder/stage1_block1",
                           "--target", "predicted", "--ig-steps", "4", "--ig-baseline", "black", *EXPLAIN_ARGS)
  assert code == 0, err
  summary = last_json_line(out)
  assert list(summary["methods"]) == ["grad_cam", "input_gradient", "integrated_gradients"]
  assert summary["ig"] == {"steps": 4, "baseline": "black"}
  assert summary["methods"]["grad_cam"]["resolution"] == [8, 8] and summary["layer"] == "encoder/stage1_block1"


@pytest.mark.parametrize("argv, fragments", [
    (("--methods", "lime"), ("unknown attribution method 'lime'", "integrated_gradients")),
    (("--methods", ","), ("--methods is empty",)),
    (("--layer", "encoder/stage9"), ("layer 'encoder/stage9' is not a feature map", "encoder/stem")),
    (("--n", "0"), ("--n=0 must be at least 1",)),
    (("--n", "-2"), ("--n=-2",)),
    (("--images", "0"), ("--images=0",)),
    (("--target", "best"), ("unknown --target 'best'",)),
    (("--ig-steps", "0"), ("--ig-steps=0",)),
    (("--ig-baseline", "white"), ("unknown --ig-baseline 'white'", "mean, black")),
    (("--config.seed=1",), ("explain takes no --config.FIELD overrides",)),
    (("--dataset", "mnist5k"), ("(28, 28, 1) images",)),
])
def test_explain_bad_input_is_one_line(trained_workdir, tmp_path, capsys, argv, fragments):
  before = snapshot(trained_workdir)
  code, _, err = run_cli(capsys, "explain", "--workdir", trained_workdir, "--out", tmp_path / "out", *argv)
  assert_one_line_error(code, err, *fragments)
  assert snapshot(trained_workdir) == before
  assert not (tmp_path / "out").exists()


def test_explain_without_a_checkpoint_is_one_line(trained_workdir, tmp_path, capsys):
  code, _, err = run_cli(capsys, "explain", "--workdir", tmp_path)
  assert_one_line_error(code, err, "no config.json")
  shutil.copy(trained_workdir / "config.json", tmp_path / "config.json")
  code, _, err = run_cli(capsys, "explain", "--workdir", tmp_path)
  assert_one_line_error(code, err, "no checkpoint", "train first")
  code, _, err = run_cli(capsys, "explain", "--workdir", trained_workdir, "--compare", tmp_path)
  assert_one_line_error(code, err, "--compare: no checkpoint")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
