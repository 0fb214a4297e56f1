"""The README's Python examples run as written (in a scratch directory, with the epochs cut to one)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_examples_this_file_runs():
  blocks = python_blocks()
  assert len(blocks) == 3
  assert "ofx.sgdrop_mask" in blocks[0] and "train_and_evaluate" in blocks[1] and "def get_sweep" in blocks[2]


def test_the_readmes_sweep_is_the_shipped_one():
  from overfocus_jax import config as config_lib
  namespace = {}
  exec(compile(python_blocks()[2], "README.md python block 2", "exec"), namespace)  # noqa: S102  (our own README)
  shipped = config_lib.load_sweep_file(README.parent / "experiments" / "configs" / "regularizers_sweep.py")
  assert namespace["get_sweep"]() == shipped and len(shipped) == 12


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_readme_example_runs(index, tmp_path, monkeypatch):
  code = python_blocks()[index]
  # One epoch instead of two keeps the suite short; everything else runs exactly as written.
  code = code.replace('[("num_epochs", "2")]', '[("num_epochs", "1")]')
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "readme_example"}
  exec(compile(code, f"README.md python block {index}", "exec"), namespace)  # noqa: S102  (our own README)
  if index == 0:
    import numpy as np
    z, mask, aux = namespace["z"], namespace["mask"], namespace["aux"]
    assert mask.shape == z.shape[:3] + (1,) and set(np.unique(np.asarray(mask))) <= {0.0, 1.0}
    assert namespace["masks"].shape == (3, *mask.shape)
    np.testing.assert_array_equal(namespace["z_masked"], z * aux["mask"])
  else:
    summary = (tmp_path / "runs" / "mine" / "summary.json").read_text()
    assert '"test_accuracy"' in summary
    assert "my_dropped_fraction" in (tmp_path / "runs" / "mine" / "metrics.jsonl").read_text()
