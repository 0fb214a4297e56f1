"""How concentrated is the latent attribution A(z, c) = ReLU(∂ψ_c/∂z ⊙ z) of a trained model?

    python experiments/attribution_mass.py runs/shortcut/erm_s0 [--dataset mnist5k_shortcut]

For each granularity SGDrop can drop at (element, spatial position, channel), prints the share of each test
image's positive attribution held by its top 3%, 10% and 30% of units (the units SGDrop would drop at ρ = 0.03,
0.1, 0.3), averaged over the test split. A share near 1 means dropping those units removes nearly all of the
evidence for the true class: the masked head cannot fit, and training collapses rather than spreading out.
"""

import argparse
import json
import pathlib
import sys

import jax
import numpy as np

from overfocus_jax.challenge.attribution import gradient_times_activation
from overfocus_jax.challenge.masks import drop_count
from overfocus_jax.data import pipeline
from overfocus_jax.data.sources import load_dataset
from overfocus_jax.train import workdir as workdir_lib

RATES = (0.03, 0.1, 0.3)


def top_share(scores: np.ndarray, rate: float) -> np.ndarray:
  """Per row: the share of the row's total held by its ⌈rate·N⌉ largest entries."""
  k = drop_count(rate, scores.shape[1])
  top = -np.sort(-scores, axis=1)[:, :k].sum(axis=1)
  return top / np.maximum(scores.sum(axis=1), 1e-12)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--dataset", default=None)
  args = parser.parse_args()
  workdir = pathlib.Path(args.workdir).resolve()
  run = workdir_lib.load_trained(workdir)
  exp, state = run.exp, run.state
  dataset = load_dataset(args.dataset) if args.dataset else exp.dataset

  @jax.jit
  def attribute(images, labels):
    z, _ = exp.model.encode(state.variables, images)
    return gradient_times_activation(lambda zz: exp.model.classify(state.variables, zz)[0], z, labels)

  maps = []
  for batch in pipeline.eval_batches(dataset.test, batch_size=256, mean=exp.dataset.mean, std=exp.dataset.std):
    attr = np.asarray(attribute(batch["image"], batch["label"]))
    maps.append(attr[batch["mask"] > 0])
  attr = np.concatenate(maps)  # (N, H, W, C)
  views = {"element": attr.reshape(len(attr), -1), "spatial": attr.sum(-1).reshape(len(attr), -1),
           "channel": attr.sum((1, 2))}
  result = {"workdir": str(workdir), "latent_shape": list(attr.shape[1:]),
            "zero_fraction": float(np.mean(attr == 0))}  # units with no positive attribution at all
  for name, scores in views.items():
    result[name] = {f"top_{rate}": float(top_share(scores, rate).mean()) for rate in RATES}
    result[name]["units"] = scores.shape[1]
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
