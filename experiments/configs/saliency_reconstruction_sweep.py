r"""The saliency-by-reconstruction model through ``overfocus train``: the learned saliency (``select=soft``) and the
seed's code as written (``select=hard``), three seeds each, at experiments/configs/saliency_reconstruction.py's
setting (K = 5 patches of 9×9, batch 16, 5 epochs of mnist5k): six runs, each with its summary's ``test_mse``.

    overfocus sweep run --config experiments/configs/saliency_reconstruction_sweep.py --out sweeps/reconstruction
    python -c "import json; from overfocus_jax.sweeps import results
    for r in results.read('sweeps/reconstruction'):
        p = dict(x.split('=', 1) for x in r['job'].split('-'))
        print(json.dumps({'select': p['select'], 'seed': int(p['seed']), 'test_mse': r['test_mse'],
                          'epochs': r['epochs'], 'run': r['job']}))" \
        > experiments/results/saliency_reconstruction_cli.jsonl

Runs are named ``select=S-seed=N``; ``overfocus explain --workdir sweeps/reconstruction/select=soft-seed=0`` draws
one run's heatmaps, patches and reconstructions.
"""

import importlib.util
import pathlib

SELECTS = ("soft", "hard")
SEEDS = (0, 1, 2)
_BASE = pathlib.Path(__file__).with_name("saliency_reconstruction.py")


def get_config():
  spec = importlib.util.spec_from_file_location("saliency_reconstruction_config", _BASE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_sweep():
  return [{"name": f"select={select}-seed={seed}", "reconstruction.select": select, "seed": seed}
          for select in SELECTS for seed in SEEDS]
