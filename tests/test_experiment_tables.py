"""experiments/shortcut.py's summary tables: the cells the README's shortcut tables are printed from."""

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
