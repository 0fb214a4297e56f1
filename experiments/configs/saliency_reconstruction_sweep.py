r"""The saliency-by-reconstruction model through ``overfocus train``: the learned saliency (``select=soft``), the
seed's code as written (``select=hard``) and the learned saliency with a variational decoder (a Gaussian latent of
64 units, β = 1), three seeds each, at experiments/configs/saliency_reconstruction.py's setting (K = 5 patches of
9×9, batch 16, 5 epochs of mnist5k): nine runs, each with its summary's ``test_mse``.

    overfocus sweep run --config experiments/configs/saliency_reconstruction_sweep.py --out sweeps/reconstruction
    python -c "import json; from overfocus_jax.sweeps import results
    for r in results.read('sweeps/reconstruction'):
        p = dict(x.split('=', 1) for x in r['job'].split('-'))
        print(json.dumps({'variant': p['select'] + '-' + p['decoder'], 'seed': int(p['seed']),
                          'test_mse': r['test_mse'], 'epochs': r['epochs'], 'run': r['job']}))" \
        > experiments/results/saliency_reconstruction_cli.jsonl

Runs are named ``select=S-decoder=D-seed=N``; ``overfocus explain --workdir
sweeps/reconstruction/select=soft-decoder=mlp-seed=0`` draws one run's heatmaps, patches and reconstructions.
"""

import importlib.util
import pathlib

# (select, decoder): the decoder is the seed's MLP, or a variational one through a 64-unit latent.
VARIANTS = (("soft", "mlp"), ("hard", "mlp"), ("soft", "vae64"))
LATENT = {"mlp": 0, "vae64": 64}
SEEDS = (0, 1, 2)
_BASE = pathlib.Path(__file__).with_name("saliency_reconstruction.py")


def get_config():
  spec = importlib.util.spec_from_file_location("saliency_reconstruction_config", _BASE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_sweep():
  return [{"name": f"select={select}-decoder={decoder}-seed={seed}", "reconstruction.select": select,
           "reconstruction.latent": LATENT[decoder], "seed": seed}
          for select, decoder in VARIANTS for seed in SEEDS]
