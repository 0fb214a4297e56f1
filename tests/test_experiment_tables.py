"""experiments/shortcut.py's summary tables: the cells the README's shortcut tables are printed from."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def shortcut():
  sys.path.insert(0, str(EXPERIMENTS))  # the script imports methods.py from beside it
  try:
    import shortcut as module
    yield module
  finally:
    sys.path.remove(str(EXPERIMENTS))


def record(method, seed, decorrelated, clean, masked=None):
  return {"method": method, "seed": seed, "decorrelated_accuracy": decorrelated, "clean_accuracy": clean,
          "first_epoch_masked_accuracy": masked}


def test_cell_is_mean_and_sample_std_over_seeds_and_a_dash_where_nothing_was_masked(shortcut):
  rows = [record("sgdrop", 0, 0.70, 0.90, 0.5), record("sgdrop", 1, 0.80, 0.92, 0.6)]
  assert shortcut.cell(rows) == "75.0 ± 7.1 / 91.0 ± 1.4 / 55.0 ± 7.1 (2)"
  assert shortcut.cell([record("erm", 0, 0.5, 0.6)]) == "50.0 ± 0.0 / 60.0 ± 0.0 / – (1)"
  assert shortcut.cell([]) == "–"


def test_columns_table_has_a_column_per_file_and_a_row_per_method(shortcut, tmp_path):
  patch, glyph = tmp_path / "patch.jsonl", tmp_path / "glyph.jsonl"
  patch.write_text("\n".join(json.dumps(r) for r in [record("erm", 0, 0.6, 0.9), record("sgdrop", 0, 0.8, 0.9, 0.5)]))
  glyph.write_text(json.dumps(record("erm", 0, 0.7, 0.95)))
  lines = shortcut.columns_table([patch, glyph], ["erm", "sgdrop"]).splitlines()
  assert lines[0] == "| method | patch | glyph |"
  assert lines[2] == "| `erm` | 60.0 ± 0.0 / 90.0 ± 0.0 / – (1) | 70.0 ± 0.0 / 95.0 ± 0.0 / – (1) |"
  assert lines[3] == "| `sgdrop` | 80.0 ± 0.0 / 90.0 ± 0.0 / 50.0 ± 0.0 (1) | – |"


def test_columns_with_a_missing_file_is_a_one_line_error(tmp_path):
  result = subprocess.run([sys.executable, str(EXPERIMENTS / "shortcut.py"), "--columns", str(tmp_path / "no.jsonl")],
                          capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0 and "no results file" in result.stderr and "Traceback" not in result.stderr


def test_the_shortcut_sweep_trains_the_runs_the_script_trains(shortcut):
  """experiments/configs/shortcut_sweep.py: each of its jobs builds the config that shortcut.py's run_one builds for
  the same kind, method and seed, so the sweep reproduces the script's records."""
  from overfocus_jax import config as config_lib
  from overfocus_jax.sweeps import grid
  sweep_path = EXPERIMENTS / "configs" / "shortcut_sweep.py"
  spec = importlib.util.spec_from_file_location("shortcut_sweep", sweep_path)
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  jobs = grid.jobs_from_sweep(sweep.get_sweep(), str(sweep_path))
  assert len(jobs) == 36 and len({job.name for job in jobs}) == 36
  for job in jobs[::5]:
    parts = dict(part.split("=", 1) for part in job.name.split("-"))
    by_sweep = config_lib.build_config(str(sweep_path), list(job.overrides))
    by_script = config_lib.build_config(str(shortcut.DEFAULT_CONFIG),
                                        shortcut.run_overrides(parts["method"], int(parts["seed"]), parts["kind"]))
    assert by_sweep.to_json_best_effort(sort_keys=True) == by_script.to_json_best_effort(sort_keys=True), job.name


def test_from_sweep_names_a_missing_folder_in_one_line(tmp_path):
  result = subprocess.run([sys.executable, str(EXPERIMENTS / "shortcut.py"), "--from-sweep", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "r.jsonl")], capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
  assert "no sweep folder" in result.stderr and not (tmp_path / "r.jsonl").exists()


def test_the_no_collapse_sweep_trains_the_runs_the_script_trains():
  """experiments/configs/no_collapse_sweep.py: each job is its config file with the overrides no_collapse.py's
  run_one applies, so the sweep reproduces the script's records."""
  from overfocus_jax import config as config_lib
  from overfocus_jax.sweeps import grid
  sys.path.insert(0, str(EXPERIMENTS))
  try:
    import no_collapse
  finally:
    sys.path.remove(str(EXPERIMENTS))
  sweep_path = EXPERIMENTS / "configs" / "no_collapse_sweep.py"
  spec = importlib.util.spec_from_file_location("no_collapse_sweep", sweep_path)
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  jobs = grid.jobs_from_sweep(sweep.get_sweep(), str(sweep_path))
  assert len(jobs) == len(no_collapse.CONFIGS) * 3 * 3 and set(sweep.CONFIGS) == set(no_collapse.CONFIGS)
  for job in jobs[::7]:
    parts = dict(part.split("=", 1) for part in job.name.split("-"))
    assert job.config == str(EXPERIMENTS / "configs" / f"{parts['config']}.py")
    by_sweep = config_lib.build_config(job.config, list(job.overrides))
    by_script = config_lib.build_config(job.config, no_collapse.run_overrides(parts["method"], int(parts["seed"])))
    assert by_sweep.to_json_best_effort(sort_keys=True) == by_script.to_json_best_effort(sort_keys=True), job.name


def test_the_data_paths_sweep_trains_the_runs_the_script_trains():
  """experiments/configs/data_paths_sweep.py: each job builds the config data_paths.py's run_one builds."""
  from overfocus_jax import config as config_lib
  from overfocus_jax.sweeps import grid
  sys.path.insert(0, str(EXPERIMENTS))
  try:
    import data_paths
  finally:
    sys.path.remove(str(EXPERIMENTS))
  sweep_path = EXPERIMENTS / "configs" / "data_paths_sweep.py"
  jobs = grid.jobs_from_sweep(config_lib.load_sweep_file(str(sweep_path)), str(sweep_path))
  assert len(jobs) == 9
  for job in jobs:
    parts = dict(part.split("=", 1) for part in job.name.split("-"))
    by_sweep = config_lib.build_config(job.config, list(job.overrides))
    by_script = config_lib.build_config(str(EXPERIMENTS / "configs" / "default.py"),
                                        data_paths.run_overrides(parts["data"], parts["dtype"], int(parts["seed"])))
    assert by_sweep.to_json_best_effort(sort_keys=True) == by_script.to_json_best_effort(sort_keys=True), job.name
