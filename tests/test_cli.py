"""The ``overfocus`` command: eval and bench output, and bad input ending in one line on stderr with exit code 2.

Most cases call ``overfocus_jax.cli.main`` in this process (fast); a few run ``python -m overfocus_jax`` to prove
that nothing but that one line reaches the terminal.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from overfocus_jax import config as config_lib

from conftest import (DIGITS_TEST, REPO_ROOT, TINY_ARGS, assert_one_line_error, last_json_line, read_metrics,
                      run_cli, subprocess_env)

TRAIN_TINY = (*TINY_ARGS, "--no-progress", "--config.num_epochs=1")


# ----------------------------------------------------------------------------- eval and bench


def test_eval_prints_json_with_accuracy_loss_and_n(trained_workdir, capsys):
  code, out, err = run_cli(capsys, "eval", "--workdir", trained_workdir)
  assert code == 0, err
  result = last_json_line(out)
  assert {"accuracy", "loss", "n"} <= set(result)
  assert result["n"] == DIGITS_TEST and result["dataset"] == "digits"
  assert 0 <= result["accuracy"] <= 1 and result["loss"] > 0
  np.testing.assert_allclose(result["accuracy"], read_metrics(trained_workdir)[0]["test_accuracy"], atol=1e-9)


def test_eval_on_another_dataset_spec(trained_workdir, capsys):
  code, out, err = run_cli(capsys, "eval", "--workdir", trained_workdir, "--dataset", "digits")
  assert code == 0, err
  result = last_json_line(out)
  assert result["n"] == DIGITS_TEST and result["dataset"] == "digits"
  np.testing.assert_allclose(result["loss"], read_metrics(trained_workdir)[0]["test_loss"], rtol=1e-5)


def test_eval_on_a_dataset_of_another_shape_is_refused(trained_workdir, tmp_path, capsys):
  path = write_npz(tmp_path / "big.npz", shape=(9, 9, 1))
  code, _, err = run_cli(capsys, "eval", "--workdir", trained_workdir, "--dataset", f"npz:{path}")
  assert_one_line_error(code, err, "(9, 9, 1)", "(8, 8, 1)")


def test_bench_prints_json_timings(capsys):
  code, out, err = run_cli(capsys, "bench", *TINY_ARGS, "--steps", "2", "--repeats", "1", "--warmup", "0")
  assert code == 0, err
  result = last_json_line(out)
  assert {"step_ms", "images_per_s", "devices"} <= set(result)
  assert result["devices"] == 1 and result["batch_size"] == 64 and result["image_shape"] == [8, 8, 1]
  assert result["step_ms"] > 0 and len(result["step_ms_repeats"]) == 1
  np.testing.assert_allclose(result["images_per_s"], 64 / (result["step_ms"] / 1e3), rtol=1e-6)
  # What ran the convolutions: oneDNN's kernels, or XLA's and why not (None off a one-device CPU mesh).
  assert result["cpu_convolutions"] in (None, "onednn") or result["cpu_convolutions"].startswith("xla (")
  # Whether XLA:CPU's per-step block stays mapped (host_memory.py): retained, or why not.
  assert isinstance(result["host_memory"], str) and result["host_memory"]
  # End to end: an epoch of the loop's own path (digits on the device, one step per dispatch on a CPU).
  assert result["data_on_device"] is True and result["steps_per_dispatch"] == 1 and result["end_to_end_epochs"] == 1
  assert result["end_to_end_images_per_s"] > 0 and result["end_to_end_step_ms"] > 0
  # The tiny CNN by hand: 3x3 stem 1→8 and two 3x3 convs 8→8 at 8x8; then a 1x1 stride-2 projection 8→16, a 3x3
  # stride-2 conv 8→16 (8x8 → 4x4) and a 3x3 conv 16→16 at 4x4; dense 16→10. Parameters add 3 BNs of 8 and 2 of
  # 16 (scale and offset) and the dense bias.
  convs = 9 * 8 + 2 * 9 * 64 + 8 * 16 + 9 * 8 * 16 + 9 * 16 * 16
  assert result["params"] == convs + 16 * 10 + 10 + 2 * (3 * 8 + 2 * 16)
  # XLA counts the kernel taps that fall inside the image (not the SAME padding): per axis, a 3-tap stride-1 conv on
  # n pixels has 3n - 2 of them, the stride-2 one on 8 → 4 pixels 11. A multiply-add is 2 FLOPs.
  taps_8, taps_4, taps_8_to_4 = (3 * 8 - 2) ** 2, (3 * 4 - 2) ** 2, 11 ** 2
  multiply_adds = (taps_8 * (8 + 2 * 64) + 16 * 8 * 16 + taps_8_to_4 * 8 * 16 + taps_4 * 16 * 16 + 16 * 10)
  assert 2 * multiply_adds <= result["flops_per_image"] < 1.1 * 2 * multiply_adds  # + BN, ReLU, pooling


def test_many_stride_two_stages_on_8x8_images_run(capsys):
  """Not an error: SAME padding shrinks 8x8 to 1x1 and no further (see test_resnet)."""
  code, out, err = run_cli(capsys, "bench", *TINY_ARGS, "--config.resnet.stage_widths=(8,8,8,8,8)",
                           "--config.resnet.stage_sizes=(1,1,1,1,1)", "--config.resnet.stage_strides=(2,2,2,2,2)",
                           "--steps", "1", "--repeats", "1", "--warmup", "0")
  assert code == 0, err
  assert last_json_line(out)["step_ms"] > 0


def test_help_exits_zero(capsys):
  with pytest.raises(SystemExit) as exit_info:
    from overfocus_jax import cli
    cli.main(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert "train" in out and "eval" in out and "bench" in out


# ----------------------------------------------------------------------------- bad input, in process


def train_on_npz(capsys, tmp_path, path):
  """``overfocus train`` on the tiny config with the npz file ``path`` as the dataset (batch 8)."""
  return run_cli(capsys, "train", "--workdir", tmp_path / "wd", *TRAIN_TINY, "--config.batch_size=8",
                 "--config.eval_batch_size=8", f"--config.dataset=npz:{path}")


def write_npz(path, *, shape=(8, 8, 1), test_shape=None, train_labels=None, test_labels=None, **extra):
  rng = np.random.default_rng(0)
  train_labels = np.arange(16) % 2 if train_labels is None else np.asarray(train_labels)
  test_labels = np.arange(4) % 2 if test_labels is None else np.asarray(test_labels)
  np.savez(path, x_train=rng.integers(0, 256, (len(train_labels), *shape), dtype=np.uint8), y_train=train_labels,
           x_test=rng.integers(0, 256, (len(test_labels), *(test_shape or shape)), dtype=np.uint8),
           y_test=test_labels, **extra)
  return path


CONFIG_ERRORS = [
    # (overrides, fragments the one line must contain)
    (["--config.nope=1"], ["unknown config field 'config.nope'", "batch_size"]),
    (["--config.resnet.nope=1"], ["config.resnet.nope", "stage_widths"]),
    (["--config.batch_size=abc"], ["--config.batch_size='abc'", "int"]),
    (["--config.learning_rate=-0.1"], ["config.learning_rate=-0.1", "positive"]),
    (["--config.batch_size=0"], ["config.batch_size=0", "positive integer"]),
    (["--config.num_epochs=0"], ["config.num_epochs=0"]),
    (["--config.model=vgg"], ["unknown model 'vgg'", "resnet18"]),
    (["--config.resnet.stage_widths=(8,16,32)"], ["different lengths"]),
    (["--config.resnet.stage_strides=(1,0)"], ["stage_strides", "positive integers"]),
    (["--config.batch_size"], ["--config.batch_size has no value"]),
    (["--config.data_on_device=gpu"], ["unknown data_on_device 'gpu'", "auto, on, off"]),
    (["--config.steps_per_dispatch=-2"], ["config.steps_per_dispatch=-2", "--config.steps_per_dispatch"]),
    (["--config.batch_norm=sync"], ["unknown batch_norm 'sync'", "global, local"]),
    (["--config.data_workers=-1"], ["config.data_workers=-1", "--config.data_workers"]),
    (["stray"], ["unknown argument 'stray'"]),
]


@pytest.mark.parametrize("overrides, fragments", CONFIG_ERRORS, ids=[c[0][0] for c in CONFIG_ERRORS])
def test_bad_config_is_one_line_and_nothing_is_written(tmp_path, capsys, overrides, fragments):
  workdir = tmp_path / "wd"
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, *TRAIN_TINY, *overrides)
  assert_one_line_error(code, err, *fragments)
  assert out == ""
  assert not workdir.exists()  # config problems are found before anything is created


@pytest.mark.parametrize("spec, fragments", [
    ("foo:bar", ["unknown dataset 'foo:bar'", "mnist5k"]),
    ("cifar", ["unknown dataset 'cifar'"]),
    ("idx:/nonexistent", ["idx:/nonexistent", "does not exist"]),
    ("npz:/nonexistent.npz", ["/nonexistent.npz", "does not exist"]),
])
def test_bad_dataset_is_one_line(tmp_path, capsys, spec, fragments):
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", *TRAIN_TINY, f"--config.dataset={spec}")
  assert_one_line_error(code, err, *fragments)


def test_workdir_under_a_regular_file_is_one_line(tmp_path, capsys):
  (tmp_path / "file").write_text("not a directory")
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "file" / "wd", *TRAIN_TINY)
  assert_one_line_error(code, err, "not writable", "file/wd")
  assert (tmp_path / "file").read_text() == "not a directory"


@pytest.mark.parametrize("argv, fragments", [
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ([], ["required: command"]),
    (["train", "--config.batch_size=8"], ["required: --workdir"]),
    (["eval"], ["required: --workdir"]),
    (["train", "--workdir", "{tmp}/wd", "--config", "{tmp}/missing.py"], ["missing.py", "not found"]),
    (["eval", "--workdir", "{tmp}", "--config.batch_size=8"], ["no --config.FIELD overrides"]),
    (["bench", "--steps", "0"], ["--steps=0"]),
    (["bench", "--repeats", "-1"], ["--repeats=-1"]),
    (["bench", "--end-to-end-epochs", "-1"], ["--end-to-end-epochs=-1", "--end-to-end-epochs=1"]),
    (["train", "--workdir", "{tmp}/wd", "--workdirr", "x"], ["unknown argument '--workdirr'"]),
])
def test_bad_command_line_is_one_line(tmp_path, capsys, argv, fragments):
  argv = [a.format(tmp=tmp_path) for a in argv]
  code, _, err = run_cli(capsys, *argv)
  assert_one_line_error(code, err, *fragments)


def test_config_file_errors_are_one_line(tmp_path, capsys):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", "--config", broken)
  assert_one_line_error(code, err, "syntax error at line 1")
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", "--config", empty)
  assert_one_line_error(code, err, "defines no get_config()")


def test_eval_without_a_run_is_one_line(trained_workdir, tmp_path, capsys):
  code, _, err = run_cli(capsys, "eval", "--workdir", tmp_path)
  assert_one_line_error(code, err, "no config.json")
  # A config but no checkpoint (e.g. a run stopped during its first epoch).
  shutil.copy(trained_workdir / "config.json", tmp_path / "config.json")
  code, _, err = run_cli(capsys, "eval", "--workdir", tmp_path)
  assert_one_line_error(code, err, "no checkpoint", "train first")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # eval created nothing


def test_eval_of_a_run_saved_before_a_config_field_existed(trained_workdir, tmp_path, capsys):
  """config_from_json lays a saved config.json over today's defaults: fields it lacks take their defaults."""
  workdir = tmp_path / "old"
  shutil.copytree(trained_workdir, workdir)
  config = json.loads((workdir / "config.json").read_text())
  config["regularizer"] = {"name": "none"}  # no sgdrop / rsc / rsc_domainbed groups yet
  for group in ("attention", "focus", "corner"):  # nor these models (the run is a resnet)
    del config[group]
  config["resnet_tv"]["zero_init_residual"] = True  # a true/false before the field took auto | true | false
  (workdir / "config.json").write_text(json.dumps(config))
  assert config_lib.config_from_json(json.dumps(config)).resnet_tv.zero_init_residual == "true"
  code, out, err = run_cli(capsys, "eval", "--workdir", workdir)
  assert code == 0, err
  result = last_json_line(out)
  assert result["n"] == DIGITS_TEST and result["dataset"] == "digits"
  assert 0 <= result["accuracy"] <= 1
  # the same model as before the fields were removed
  np.testing.assert_allclose(result["accuracy"], read_metrics(trained_workdir)[0]["test_accuracy"], atol=1e-9)


def test_labels_out_of_range_are_one_line(tmp_path, capsys):
  path = write_npz(tmp_path / "labels.npz", train_labels=np.arange(16) % 3, num_classes=2)
  code, _, err = train_on_npz(capsys, tmp_path, path)
  assert_one_line_error(code, err, "train labels", "outside [0, 2)")


def test_train_and_test_image_shapes_differ_is_one_line(tmp_path, capsys):
  path = write_npz(tmp_path / "shapes.npz", test_shape=(9, 8, 1))
  code, _, err = train_on_npz(capsys, tmp_path, path)
  assert_one_line_error(code, err, "(8, 8, 1)", "(9, 8, 1)")


def test_batch_larger_than_the_training_set_is_one_line(tmp_path, capsys):
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", *TRAIN_TINY, "--config.batch_size=4096")
  assert_one_line_error(code, err, "batch_size=4096", "1438")


def test_images_with_zero_channels_are_one_line(tmp_path, capsys):
  path = write_npz(tmp_path / "empty.npz", shape=(8, 8, 0))
  code, _, err = train_on_npz(capsys, tmp_path, path)
  assert_one_line_error(code, err, "empty dimension", "(16, 8, 8, 0)")


def test_images_of_height_zero_are_reported_as_such(tmp_path, capsys):
  path = write_npz(tmp_path / "flat.npz", shape=(0, 8, 1))
  code, _, err = train_on_npz(capsys, tmp_path, path)
  assert_one_line_error(code, err, "empty dimension", "(16, 0, 8, 1)")


# ----------------------------------------------------------------------------- bad input, end to end


SUBPROCESS_CASES = {
    "unknown-field": (["--config.nope=1"], ["unknown config field 'config.nope'"]),
    "missing-dataset": (["--config.dataset=idx:/nonexistent"], ["idx:/nonexistent", "does not exist"]),
    "workdir-under-file": ([], ["not writable"]),
}


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory):
  """``python -m overfocus_jax train ...`` for each case, all started at once."""
  tmp = tmp_path_factory.mktemp("cli_subprocess")
  (tmp / "file").write_text("x")
  procs = {}
  for name, (overrides, _) in SUBPROCESS_CASES.items():
    workdir = tmp / "file" / "wd" if name == "workdir-under-file" else tmp / name
    procs[name] = subprocess.Popen(
        [sys.executable, "-m", "overfocus_jax", "train", "--workdir", str(workdir), *TRAIN_TINY, *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO_ROOT)
  outputs = {name: proc.communicate(timeout=300) for name, proc in procs.items()}
  return {name: (procs[name].returncode, *outputs[name]) for name in procs}


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_bad_input_end_to_end_is_one_line_exit_2(subprocess_results, case):
  code, out, err = subprocess_results[case]
  assert_one_line_error(code, err, *SUBPROCESS_CASES[case][1])
  assert out == ""
