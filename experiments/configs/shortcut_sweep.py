r"""The shortcut benchmark as a sweep: ERM, SGDrop at the library's default, SGDrop at the paper's setting and RSC on
each of the three shortcut kinds (a patch's place, a glyph's shape, a colour), three seeds each, on the shortcut
config (experiments/configs/shortcut.py): 36 runs.

    overfocus sweep run --config experiments/configs/shortcut_sweep.py --out sweeps/shortcut \
        --launcher parallel --workers 2
    python experiments/shortcut.py --from-sweep sweeps/shortcut --kind patch --methods erm sgdrop sgdrop_paper rsc \
        --out experiments/results/sgdrop_rule_patch_shortcut.jsonl

Each run is the one ``python experiments/shortcut.py --kind KIND --methods METHOD --seeds SEED`` trains in its own
process (the same config fields, so the same numbers); ``--from-sweep`` adds each finished run's clean-digit
accuracy and writes the same records and table. Runs are named ``kind=K-method=M-seed=S``.
"""

import importlib.util
import pathlib

HERE = pathlib.Path(__file__).resolve().parent


def _sibling(path: pathlib.Path, name: str):
  """A module by its file path: the config files are loaded by path, not as a package."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


SHORTCUT_CONFIG = _sibling(HERE / "shortcut.py", "shortcut_config")
METHODS = _sibling(HERE.parent / "methods.py", "shortcut_methods").METHODS
KINDS = {"patch": "mnist5k_shortcut", "glyph": "mnist5k_glyph", "color": "mnist5k_color"}  # as experiments/shortcut.py
SWEPT_METHODS = ("erm", "sgdrop", "sgdrop_paper", "rsc")
SEEDS = (0, 1, 2)


def get_config():
  return SHORTCUT_CONFIG.get_config()


def get_sweep():
  runs = []
  for kind, dataset in KINDS.items():
    for method in SWEPT_METHODS:
      for seed in SEEDS:
        runs.append({"name": f"kind={kind}-method={method}-seed={seed}", "dataset": dataset,
                     **dict(METHODS[method]), "seed": seed})
  return runs
