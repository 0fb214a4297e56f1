"""Saliency learned by reconstruction (overfocus_jax.models.reconstruction, experiments/saliency_reconstruction.py)."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from overfocus_jax.data.sources import load_dataset
from overfocus_jax.models import patches, reconstruction

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "experiments" / "saliency_reconstruction.py"


@pytest.fixture(scope="module")
def digits():
  """256 real MNIST digits in [0, 1], (256, 28, 28, 1)."""
  return np.asarray(load_dataset("mnist5k").train.images[:256], np.float32) / 255.0


def make(select="soft", **kwargs):
  return reconstruction.SaliencyReconstructor((28, 28, 1), select=select, hidden=64, **kwargs)


def saliency_grads(model, x, params):
  def loss(params):
    rebuilt, _, _ = model.apply({"params": params}, x, False)
    return jnp.mean(reconstruction.reconstruction_mse(rebuilt, x))

  return jax.grad(loss)(params)["saliency"]


def test_gradients_reach_the_saliency_network_only_when_soft(digits):
  x = jnp.asarray(digits[:16])
  params = make().init(jax.random.PRNGKey(0), x)["params"]  # the same parameters for both rules
  soft = jax.tree_util.tree_leaves(saliency_grads(make("soft"), x, params))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in soft)
  assert sum(float(jnp.abs(g).sum()) for g in soft) > 0
  hard = jax.tree_util.tree_leaves(saliency_grads(make("hard"), x, params))  # the seed's code as written
  assert all(float(jnp.abs(g).sum()) == 0 for g in hard)


def test_keypoints_stay_inside_the_image_and_apart(digits):
  model = make()
  x = jnp.asarray(digits[:32])
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  for temperature in (0.05, 0.2, 5.0):
    points = make(temperature=temperature).apply({"params": params}, x, method="keypoints")
    assert points.shape == (32, 5, 2)
    assert bool(jnp.all(jnp.abs(points) <= 6 / 7 + 1e-6))  # convex combinations of the 7x7 cells' centres
  hard = make("hard").apply({"params": params}, x, method="keypoints")
  distinct = {tuple(map(tuple, np.round(np.asarray(p), 4))) for p in hard}
  assert all(len(set(p)) == 5 for p in distinct)  # K different cells per image


def test_the_soft_rule_tends_to_the_hard_one_at_low_temperature():
  heatmap = jax.random.normal(jax.random.PRNGKey(2), (4, 7, 7))
  hard = reconstruction.hard_top_k_points(heatmap, 3)
  soft = reconstruction.soft_top_k_points(heatmap, 3, temperature=1e-3, radius=1e-3)
  np.testing.assert_allclose(np.asarray(soft), np.asarray(hard), atol=1e-4)


def test_the_patch_sampler_is_a_crop_at_cell_centres(digits):
  """A 9x9 patch at scale 9/28 around a cell centre (whole-pixel positions) is the crop of those pixels."""
  x = jnp.asarray(digits[:2])
  centres = reconstruction.cell_centres(7, 7)  # cell (i, j) of 4x4 pixels: centre at pixel 4i + 1.5
  points = jnp.broadcast_to(centres[24], (2, 1, 2))  # cell (3, 3): pixels 12..15, centre 13.5
  patch = patches.extract_patches(x, points, 8, 8 / 28)[:, 0]
  np.testing.assert_allclose(np.asarray(patch), np.asarray(x[:, 10:18, 10:18]), atol=1e-6)


def test_the_reconstruction_loss_falls_on_real_digits(digits):
  model = make()
  x = jnp.asarray(digits)
  params = model.init(jax.random.PRNGKey(3), x[:2])["params"]
  tx = optax.adam(1e-3)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch, key):
    def loss(params):
      rebuilt, _, _ = model.apply({"params": params}, batch, True, rngs={"dropout": key})
      return jnp.mean(reconstruction.reconstruction_mse(rebuilt, batch))
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state)
    return optax.apply_updates(params, updates), state, value

  first = last = None
  for i in range(40):
    params, state, value = step(params, state, x[(i % 8) * 32:(i % 8 + 1) * 32], jax.random.PRNGKey(i))
    first = float(value) if first is None else first
    last = float(value)
  assert last < 0.7 * first


@pytest.mark.parametrize("kwargs, fragment", [
    ({"num_keypoints": 50}, "num_keypoints=50 must be between 1 and the heatmap's 49 cells"),
    ({"patch_size": 29}, "patch_size=29 must be between 1 and the image's side 28"),
    ({"select": "argmax"}, "unknown select='argmax'"),
])
def test_bad_settings_name_the_argument(kwargs, fragment):
  with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
    make(**kwargs).init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))


def experiment():
  """experiments/saliency_reconstruction.py as a module, to call its main in this process."""
  spec = importlib.util.spec_from_file_location("saliency_reconstruction", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("args, fragment", [
    (["--num-keypoints", "50"], "num_keypoints=50 must be between 1 and the heatmap's 49 cells"),
    (["--patch-size", "40"], "patch_size=40 must be between 1 and the image's side 28"),
    (["--selectors", "argmax"], "unknown selector 'argmax'"),
    (["--dataset", "no_such_data"], "no_such_data"),
])
def test_the_experiment_rejects_bad_input_in_one_line(tmp_path, capsys, args, fragment):
  assert experiment().main(["--out", str(tmp_path / "r.jsonl"), *args]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1 and fragment in err, err
  assert not (tmp_path / "r.jsonl").exists()


def test_the_experiment_from_the_command_line_exits_2_without_a_traceback(tmp_path):
  result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "r.jsonl"), "--epochs", "0"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "--epochs must be at least 1" in \
      result.stderr


def test_the_experiment_writes_a_record_and_a_figure_per_selector(tmp_path, capsys):
  out = tmp_path / "r.jsonl"
  argv = ["--out", str(out), "--train-dataset", "digits", "--dataset", "digits", "--num-keypoints", "2",
          "--patch-size", "3", "--epochs", "1", "--batch-size", "64", "--figures", str(tmp_path / "figures"),
          "--classify", "--classify-epochs", "1", "--selectors", "learned", "harris"]
  script = experiment()
  assert script.main(argv) == 0
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert sorted(r["selector"] for r in records) == ["harris", "learned"]
  for record in records:
    assert 0 < record["test_mse"] < 1 and 0 <= record["classify_accuracy"] <= 1 and len(record["spread_px"]) == 2
    assert (tmp_path / "figures" / f"{record['selector']}.png").stat().st_size > 0
  capsys.readouterr()
  assert script.main(argv) == 0  # resumable: nothing trains twice
  assert capsys.readouterr().out.count("done before") == 2 and len(out.read_text().splitlines()) == 2
