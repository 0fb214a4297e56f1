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

  return jax.jit(jax.grad(loss))(params)["saliency"]


def test_gradients_reach_the_saliency_network_only_when_soft(digits):
  x = jnp.asarray(digits[:16])
  params = jax.jit(make().init)(jax.random.PRNGKey(0), x)["params"]  # the same parameters for both rules
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


# ----------------------------------------------------------------------------- through the CLI: --config.model=reconstruction

from tests.conftest import REPO_ROOT, run_cli  # noqa: E402

CONFIG = REPO_ROOT / "experiments" / "configs" / "saliency_reconstruction.py"
# Digits (8×8: a 2×2 heatmap) with 3 patches of 3×3 and a small decoder: seconds per run.
SMALL = ("--config.dataset=digits", "--config.reconstruction.num_keypoints=3", "--config.reconstruction.patch_size=3",
         "--config.reconstruction.hidden=32", "--config.reconstruction.saliency_widths=(8,8)", "--config.batch_size=64",
         "--no-progress")


def train(capsys, workdir, *extra):
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, "--config", CONFIG, *SMALL, *extra)
  assert code == 0, err
  return json.loads(out.strip().splitlines()[-1])


def test_the_shipped_config_is_the_seeds_setting():
  from overfocus_jax import config as config_lib
  config = config_lib.build_config(str(CONFIG), [])
  group = config.reconstruction
  assert (config.model, config.dataset, config.batch_size, config.optimizer, config.learning_rate) == (
      "reconstruction", "mnist5k", 16, "adam", 1e-3)
  assert (group.num_keypoints, group.patch_size, group.hidden, group.dropout, group.select) == (5, 9, 1024, 0.5,
                                                                                              "soft")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """Two epochs in one go, and one epoch resumed to two: their records and summaries."""
  from overfocus_jax import cli  # capsys is function-scoped: the module's runs print to the captured stdout
  base = tmp_path_factory.mktemp("reconstruction")
  runs = {}
  for name, epochs in (("whole", (2,)), ("resumed", (1, 2))):
    for n in epochs:
      assert cli.main(["train", "--workdir", str(base / name), "--config", str(CONFIG), *SMALL,
                       f"--config.num_epochs={n}"]) == 0
    runs[name] = base / name
  return runs


def test_a_run_reports_the_test_mse_and_records_it_each_epoch(trained_run):
  summary = json.loads((trained_run["whole"] / "summary.json").read_text())
  assert summary["model"] == "reconstruction" and "test_accuracy" not in summary
  assert 0 < summary["test_mse"] == summary["test_loss"] < 0.2, summary
  records = [json.loads(line) for line in (trained_run["whole"] / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == [1, 2]
  assert all({"train_mse", "test_mse", "learning_rate"} <= set(r) for r in records), records[0]
  assert records[1]["test_mse"] < records[0]["test_mse"] * 1.05, records
  saved = json.loads((trained_run["whole"] / "config.json").read_text())
  assert (saved["optimizer"], saved["learning_rate"], saved["reconstruction"]["num_keypoints"]) == ("adam", 1e-3, 3)


def test_a_resumed_run_equals_one_trained_in_one_go(trained_run):
  read = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  drop = ("images_per_s", "epoch_time_s")
  whole, resumed = ([{k: v for k, v in r.items() if k not in drop} for r in read(trained_run[n])]
                    for n in ("whole", "resumed"))
  assert whole == resumed


def test_eval_reports_the_mse_of_the_test_split(trained_run, capsys):
  code, out, err = run_cli(capsys, "eval", "--workdir", trained_run["whole"])
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  summary = json.loads((trained_run["whole"] / "summary.json").read_text())
  assert result["n"] == 359 and np.isclose(result["mse"], summary["test_mse"], rtol=1e-5), (result, summary)


def test_explain_draws_the_heatmaps_patches_and_reconstructions(trained_run, capsys, tmp_path):
  out_dir = tmp_path / "explain"
  code, out, err = run_cli(capsys, "explain", "--workdir", trained_run["whole"], "--out", out_dir, "--n", "6",
                           "--no-progress")
  assert code == 0, err
  summary = json.loads((out_dir / "explain.json").read_text())
  assert (out_dir / "reconstructions.png").stat().st_size > 0 and (out_dir / "training_curves.png").is_file()
  assert summary["images"] == 128 and 0 < summary["mse"] < 0.2
  assert len(summary["keypoints"]["spread_px"]) == 3 and len(summary["keypoints"]["moved_px"]) == 3
  code, _, err = run_cli(capsys, "explain", "--workdir", trained_run["whole"], "--methods", "latent")
  assert code == 2 and "reconstructs its input" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, fragment", [
    (["--config.reconstruction.num_keypoints=5"], "num_keypoints=5 is more than the 4 heatmap cells of 8x8"),
    (["--config.reconstruction.patch_size=9"], "patch_size=9 is larger than the 8x8 images"),
    (["--config.reconstruction.select=top"], "unknown reconstruction.select 'top'"),
    (["--config.regularizer.name=sgdrop"], "masks a classifier's latent"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, capsys, flags, fragment):
  code, out, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", "--config", CONFIG, *SMALL, *flags)
  assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / "wd" / "checkpoints").exists()


# ----------------------------------------------------------------------------- the variational decoder


def test_the_gaussian_kl_is_zero_at_the_prior_and_half_a_squared_mean_per_unit():
  zeros = jnp.zeros((2, 3))
  np.testing.assert_allclose(reconstruction.gaussian_kl(zeros, zeros), [0.0, 0.0])
  np.testing.assert_allclose(reconstruction.gaussian_kl(jnp.ones((1, 3)), jnp.zeros((1, 3))), [1.5])
  # σ² = e: ½(e − 1 − 1) per unit
  np.testing.assert_allclose(reconstruction.gaussian_kl(jnp.zeros((1, 1)), jnp.ones((1, 1))), [0.5 * (np.e - 2)],
                             rtol=1e-6)


def test_the_variational_decoder_samples_in_training_and_uses_the_mean_in_inference(digits):
  model = reconstruction.SaliencyReconstructor((28, 28, 1), hidden=64, latent=8)
  x = digits[:4]
  variables = model.init(jax.random.PRNGKey(0), x)
  assert variables["params"]["decoder"]["latent_mean"]["kernel"].shape[-1] == 8
  infer = lambda: model.apply(variables, x, False, method="forward")
  np.testing.assert_array_equal(infer()["reconstruction"], infer()["reconstruction"])
  train = lambda seed: model.apply(variables, x, True, rngs={"dropout": jax.random.PRNGKey(seed)}, method="forward")
  assert not np.allclose(train(1)["reconstruction"], train(2)["reconstruction"])
  kl = np.asarray(infer()["kl"])
  assert kl.shape == (4,) and np.all(np.isfinite(kl)) and np.all(kl >= 0)
  plain = reconstruction.SaliencyReconstructor((28, 28, 1), hidden=64)
  plain_variables = plain.init(jax.random.PRNGKey(0), x)
  assert np.all(np.asarray(plain.apply(plain_variables, x, False, method="forward")["kl"]) == 0)


def test_a_variational_run_logs_its_kl(tmp_path, capsys):
  summary = train(capsys, tmp_path / "vae", "--config.num_epochs=1", "--config.reconstruction.latent=4",
                  "--config.reconstruction.kl_weight=2")
  record = json.loads((tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()[-1])
  assert record["train_kl"] > 0 and np.isfinite(record["train_kl"])
  # the loss is the MSE plus β·KL per image value (64 values of an 8×8 digit)
  assert np.isclose(record["train_loss"], record["train_mse"] + 2 * record["train_kl"] / 64, rtol=1e-4), record
  assert 0 < summary["test_mse"] == summary["test_loss"]


def test_bench_times_the_reconstruction_step(capsys):
  code, out, err = run_cli(capsys, "bench", "--config", CONFIG, *SMALL[:-1], "--steps", "3", "--repeats", "1")
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result["model"] == "reconstruction" and result["images_per_s"] > 0 and result["params"] > 0
