r"""The no-collapse check as a sweep: ERM, SGDrop's default and RSC on every shipped model config, each on its own
dataset, three seeds: 81 runs, each config's runs from its own file (a run's ``"config"``).

    overfocus sweep run --config experiments/configs/no_collapse_sweep.py --out sweeps/no_collapse \
        --launcher parallel --workers 2
    python experiments/no_collapse.py --from-sweep sweeps/no_collapse --out experiments/results/no_collapse.jsonl

Each run is the one ``python experiments/no_collapse.py --configs CONFIG --methods METHOD --seeds SEED`` trains in
its own process (the same config fields, so the same numbers). Runs are named ``config=C-method=M-seed=S``.
"""

import importlib.util
import pathlib

from overfocus_jax.configs import default

HERE = pathlib.Path(__file__).resolve().parent
CONFIGS = ("default", "shortcut", "resnet18", "attention", "focus", "corner", "vgg16", "convnext", "mnist_cnn")
SWEPT_METHODS = ("erm", "sgdrop", "rsc")
SEEDS = (0, 1, 2)


def _methods() -> dict:
  """experiments/methods.py's named settings (the config files are loaded by path, not as a package)."""
  spec = importlib.util.spec_from_file_location("no_collapse_methods", HERE.parent / "methods.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.METHODS


def get_config():
  return default.get_config()  # every run names its own config file


def get_sweep():
  methods = _methods()
  return [{"name": f"config={config}-method={method}-seed={seed}", "config": f"{config}.py",
           **dict(methods[method]), "seed": seed}
          for config in CONFIGS for method in SWEPT_METHODS for seed in SEEDS]
