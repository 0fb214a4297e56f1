r"""Where do shortcut-trained models look? The share of attribution that falls on the planted patch.

    python experiments/shortcut.py --runs-dir runs/shortcut_tracked --out experiments/results/shortcut_tracked.jsonl \
        --methods erm sgdrop_element_0.03 sgdrop_spatial_0.3 rsc --seeds 0 1 2
    python experiments/patch_attribution.py runs/shortcut_tracked/*_s?

For each run, on the 1,000 held-out mnist5k digits stamped with the 3×3 patch

- ``aligned``: at the position that encodes their label (as in 95% of training images), attributing the true class;
- ``decorrelated``: at the random position of the benchmark's test split, attributing the predicted class,

the patch share of a map :math:`m \ge 0` is :math:`\sum_{p \in \text{patch}} m_p / \sum_p m_p`, averaged over
images, for the input gradient and integrated gradients (:math:`|\cdot|` summed over channels) and Grad-CAM on
:math:`z` upsampled to the image. The patch covers 9 of 784 pixels (1.1%): a share far above that means the model
reads the patch. ``follows_patch`` is the fraction of decorrelated images classified as the class the patch
position encodes. Writes one JSON line per run and prints a markdown table of mean ± std over seeds per method.
"""

import argparse
import json
import pathlib
import re
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from overfocus_jax.data import pipeline, shifts
from overfocus_jax.data.sources import load_dataset
from overfocus_jax.explain import attributions, figures
from overfocus_jax.train import workdir as workdir_lib

HERE = pathlib.Path(__file__).resolve().parent
MAPS = ("input_gradient", "integrated_gradients", "grad_cam")
BATCH = 100


def patch_masks(position_ids: np.ndarray, height: int, width: int) -> np.ndarray:
  """``(N, H, W)`` booleans: the pixels of each image's patch."""
  masks = np.zeros((len(position_ids), height, width), bool)
  for mask, (row, col) in zip(masks, shifts.patch_positions(height, width)[position_ids]):
    mask[row:row + shifts.PATCH_SIZE, col:col + shifts.PATCH_SIZE] = True
  return masks


def make_maps_fn(run, target: str):
  model, variables = run.exp.model, run.state.variables

  @jax.jit
  def maps(x, labels):
    logits_fn = lambda inputs: model.apply(variables, inputs, train=False)[0]
    height, width = x.shape[1:3]
    cam = attributions.grad_cam(lambda v: model.encode(variables, v)[0], lambda z: model.classify(variables, z)[0],
                                x, labels, target)
    return {"input_gradient": attributions.to_heatmap(attributions.input_gradient(logits_fn, x, labels, target)),
            "integrated_gradients": attributions.to_heatmap(
                attributions.integrated_gradients(logits_fn, x, labels, steps=16, target=target)),
            "grad_cam": attributions.upsample_to(cam, height, width),
            "prediction": jnp.argmax(logits_fn(x), axis=-1)}

  return maps


def measure(run, images: np.ndarray, labels: np.ndarray, position_ids: np.ndarray, target: str) -> dict:
  dataset = run.exp.dataset
  maps_fn = make_maps_fn(run, target)
  masks = patch_masks(position_ids, *images.shape[1:3])
  shares = {name: [] for name in MAPS}
  predictions = []
  for start in range(0, len(images), BATCH):
    x = pipeline.normalize(images[start:start + BATCH], dataset.mean, dataset.std)
    out = jax.device_get(maps_fn(x, labels[start:start + BATCH]))
    box = masks[start:start + BATCH]
    for name in MAPS:
      heat = np.maximum(out[name], 0)
      shares[name].append((heat * box).sum(axis=(1, 2)) / np.maximum(heat.sum(axis=(1, 2)), 1e-12))
    predictions.append(out["prediction"])
  predictions = np.concatenate(predictions)
  result = {f"{name}_patch_share": float(np.concatenate(v).mean()) for name, v in shares.items()}
  result["accuracy"] = float(np.mean(predictions == labels))
  result["follows_patch"] = float(np.mean(predictions == position_ids % 10))
  return result


def measure_run(workdir: pathlib.Path) -> dict:
  run = workdir_lib.load_trained(workdir)
  clean = load_dataset("mnist5k")
  images, labels = clean.test.images, clean.test.labels
  correlation = shifts.parse_correlation(run.config.dataset, run.config.dataset.partition(":")[2])
  _, test_ids = shifts.shortcut_position_plan(clean.train.labels, len(labels), correlation)
  aligned_ids = labels % shifts.NUM_POSITIONS
  records = workdir_lib.read_metrics(workdir)
  return {
      "workdir": str(workdir), "method": re.sub(r"_s\d+$", "", workdir.name), "step": run.step,
      "aligned": measure(run, shifts.stamp_patches(images, aligned_ids), labels, aligned_ids, "true"),
      "decorrelated": measure(run, shifts.stamp_patches(images, test_ids), labels, test_ids, "predicted"),
      "attribution_ratio_by_epoch": [r.get("attribution_ratio") for r in records],
      "generalization_gap_by_epoch": [r["train_accuracy"] - r["test_accuracy"] for r in records],
  }


def _mean_std(values) -> str:
  values = [100 * v for v in values]
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def table(results: list[dict]) -> str:
  lines = ["| method | runs | decorrelated acc. | follows patch | patch share of IG (aligned) | input grad. (aligned) "
           "| Grad-CAM (aligned) | IG (decorrelated, predicted class) | final attribution ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
  for method in dict.fromkeys(r["method"] for r in results):
    rows = [r for r in results if r["method"] == method]
    ratios = [r["attribution_ratio_by_epoch"][-1] for r in rows if r["attribution_ratio_by_epoch"][-1] is not None]
    lines.append(" | ".join([
        f"| {method}", str(len(rows)), _mean_std([r["decorrelated"]["accuracy"] for r in rows]),
        _mean_std([r["decorrelated"]["follows_patch"] for r in rows]),
        _mean_std([r["aligned"]["integrated_gradients_patch_share"] for r in rows]),
        _mean_std([r["aligned"]["input_gradient_patch_share"] for r in rows]),
        _mean_std([r["aligned"]["grad_cam_patch_share"] for r in rows]),
        _mean_std([r["decorrelated"]["integrated_gradients_patch_share"] for r in rows]),
        f"{statistics.mean(ratios):.3f}" if ratios else "–"]) + " |")
  return "\n".join(lines)


def mean_curves(workdirs) -> dict:
  """Per method, the per-epoch metrics averaged over its seeds, in the records ``figures.training_curves`` draws."""
  by_method = {}
  for workdir in workdirs:
    records = workdir_lib.read_metrics(workdir)
    by_method.setdefault(re.sub(r"_s\d+$", "", workdir.name), []).append(records)
  curves = {}
  for method, runs in by_method.items():
    epochs = min(len(r) for r in runs)
    curves[f"{method} ({len(runs)} seeds)"] = [
        {"epoch": e + 1, **{key: statistics.mean(r[e][key] for r in runs)
                            for key in ("attribution_ratio", "train_accuracy", "test_accuracy") if key in runs[0][e]}}
        for e in range(epochs)]
  return curves


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
  parser.add_argument("--out", default=str(HERE / "results" / "patch_attribution.jsonl"))
  parser.add_argument("--figure", default=str(HERE / "results" / "shortcut_training_curves.png"),
                      help="attribution ratio and generalization gap per epoch, mean over seeds per method")
  args = parser.parse_args()
  figures.training_curves(pathlib.Path(args.figure), mean_curves([w.resolve() for w in args.workdirs]))
  results = []
  with open(args.out, "w") as f:
    for workdir in args.workdirs:
      result = measure_run(workdir.resolve())
      results.append(result)
      f.write(json.dumps(result) + "\n")
      print(f"{workdir}: aligned IG patch share {result['aligned']['integrated_gradients_patch_share']:.3f}, "
            f"decorrelated accuracy {result['decorrelated']['accuracy']:.3f}", flush=True)
  print(table(results))
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
