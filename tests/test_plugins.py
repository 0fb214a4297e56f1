"""Your own model, regularizer and dataset by import path (examples/plugin): trained, evaluated, explained and
benchmarked by the CLI, the paths recorded with the run; every way a path can be wrong is one line, exit code 2."""

import json
import pathlib

import pytest

from conftest import assert_one_line_error, last_json_line, read_metrics, run_cli

PLUGIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "examples" / "plugin"
MODEL = "--config.model=my_plugin.nets:TinyNet"
REGULARIZER = "--config.regularizer.name=my_plugin.reg:drop_strongest"
DATASET = "--config.dataset=my_plugin.data:small_digits"
QUICK = ("--config.batch_size=64", "--config.eval_batch_size=64", "--no-progress")


@pytest.fixture
def in_plugin_dir(monkeypatch):
  monkeypatch.chdir(PLUGIN_DIR)  # where a user runs it: the package is found from the working directory


def test_train_eval_explain_and_bench_a_plugin_model_regularizer_and_dataset(in_plugin_dir, tmp_path, capsys):
  workdir = tmp_path / "run"
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, MODEL, "--config.model_args.width=8", REGULARIZER,
                           "--config.regularizer.args.share=0.5", DATASET, "--config.num_epochs=2", *QUICK)
  assert code == 0, err
  summary = last_json_line(out)
  assert summary["model"] == "my_plugin.nets:TinyNet" and summary["dataset"] == "my_plugin.data:small_digits"
  assert summary["test_accuracy"] > 0.3  # it learns (chance is 0.1)
  metrics = read_metrics(workdir)
  assert len(metrics) == 2 and 0.3 < metrics[-1]["train_strongest_dropped_fraction"] < 0.7  # the plugin's metric
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model_args"] == {"width": 8} and saved["regularizer"]["args"] == {"share": 0.5}
  code, out, err = run_cli(capsys, "eval", "--workdir", workdir)
  assert code == 0, err
  assert last_json_line(out)["accuracy"] == summary["test_accuracy"]
  code, out, err = run_cli(capsys, "explain", "--workdir", workdir, "--n", "2", "--images", "16", "--no-progress")
  assert code == 0, err
  explained = last_json_line(out)
  assert {"latent", "grad_cam"} <= set(explained["methods"]) and all(pathlib.Path(p).is_file()
                                                                    for p in explained["figures"].values())
  code, out, err = run_cli(capsys, "bench", MODEL, DATASET, "--steps", "2", "--repeats", "1", "--warmup", "1",
                           "--end-to-end-epochs", "0")
  assert code == 0, err
  assert last_json_line(out)["step_ms"] > 0


def test_an_nnx_model_by_import_path_trains(in_plugin_dir, tmp_path, capsys):
  code, out, err = run_cli(capsys, "train", "--workdir", tmp_path / "nnx", "--config.model=my_plugin.nets:TinyNNX",
                           "--config.model_args.width=8", "--config.regularizer.name=sgdrop", DATASET,
                           "--config.num_epochs=2", *QUICK)
  assert code == 0, err
  assert last_json_line(out)["test_accuracy"] > 0.3


BAD_PLUGINS = {
    "broken.py": 'raise ImportError("this module is broken")\n',
    "wrong.py": "def model(num_classes):\n  return [num_classes]\n",
}


@pytest.mark.parametrize("flags, fragments", [
    (["--config.model=my_plugin.nets"], ["unknown model 'my_plugin.nets'", "import path"]),
    (["--config.model=my_plugin.nowhere:TinyNet"], ["model='my_plugin.nowhere:TinyNet'", "no module"]),
    (["--config.model=bad_plugins.broken:Net"], ["does not import", "ImportError: this module is broken"]),
    (["--config.model=my_plugin.nets:Missing"], ["my_plugin.nets has no 'Missing'"]),
    (["--config.model=bad_plugins.wrong:model"], ["returned list, not a model"]),
    (["--config.model=my_plugin.data:small_digits"], ["does not take the options given", "num_classes"]),
    ([MODEL, "--config.model_args.depth=3"], ["does not take the options given", "depth"]),
    (["--config.model_args.width=8"], ["model_args", "is for a model given by import path"]),
    (["--config.regularizer.name=my_plugin.nets:TinyNet", "--config.regularizer.args.num_classes=3"],
     ["returned TinyNet, not an overfocus_jax.Regularizer"]),
    (["--config.dataset=my_plugin.reg:drop_strongest"], ["returned Regularizer, not an ImageDataset"]),
])
def test_a_wrong_import_path_is_one_line(in_plugin_dir, tmp_path, capsys, monkeypatch, flags, fragments):
  (tmp_path / "bad_plugins").mkdir()
  for name, text in BAD_PLUGINS.items():
    (tmp_path / "bad_plugins" / name).write_text(text)
  monkeypatch.syspath_prepend(str(tmp_path))
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "run", DATASET, *flags, *QUICK)
  assert_one_line_error(code, err, *fragments)
