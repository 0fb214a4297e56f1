r"""The table of experiments/configs/focus_keypoints_sweep.py: learned keypoints against frozen ones and Harris corners.

    overfocus sweep run --config experiments/configs/focus_keypoints_sweep.py --out sweeps/focus_keypoints \
        --launcher parallel --workers 2
    python experiments/focus_keypoints.py sweeps/focus_keypoints [--out experiments/results/focus_keypoints.jsonl]

For every finished run (overfocus_jax.sweeps.results) it runs ``overfocus explain`` once (input gradients on the first
256 test images; resumable: a run with its explain.json is not explained again) for the keypoints' ``spread_px``
(how much each follows the image) and ``moved_px`` (how far training took it from its initial position), writes one
JSON line per run, and prints a markdown table: per glimpse setting, keypoint variant and dataset, the test accuracy
(mean ± std over seeds; on a shortcut dataset, its decorrelated test split) and the keypoints' spread and movement in
pixels (mean over keypoints and seeds).
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

from overfocus_jax.sweeps import results as sweep_results

EXPLAIN_IMAGES = 256


def explained(workdir: pathlib.Path) -> dict:
  """The run's explain.json, made once."""
  path = workdir / "explain" / "explain.json"
  if not path.is_file():
    subprocess.run([sys.executable, "-m", "overfocus_jax", "explain", "--workdir", str(workdir), "--methods",
                    "input_gradient", "--images", str(EXPLAIN_IMAGES), "--n", "8", "--no-progress"], check=True,
                   stdout=subprocess.DEVNULL)
  return json.loads(path.read_text())


def fields_of(name: str) -> dict:
  """``setting=seed-variant=learned-dataset=mnist5k-seed=0`` → its parts."""
  return dict(part.split("=", 1) for part in name.split("-"))


def records(out: pathlib.Path) -> list[dict]:
  rows = []
  for summary in sweep_results.read(out):
    parts = fields_of(summary["job"])
    keypoints = explained(out / summary["job"])["keypoints"]
    rows.append({"run": summary["job"], "setting": parts["setting"], "variant": parts["variant"],
                 "dataset": parts["dataset"], "seed": int(parts["seed"]), "test_accuracy": summary["test_accuracy"],
                 "epochs": summary["epochs"], "spread_px": keypoints["spread_px"], "moved_px": keypoints["moved_px"],
                 "mean_px": keypoints["mean_px"]})
  return rows


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
  values = [scale * v for v in values]
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def table(rows: list[dict]) -> str:
  lines = ["| setting | keypoints | dataset | seeds | test acc. % | spread (px) | moved (px) |", "|---|---|---|---|---|---|---|"]
  keys = sorted({(r["setting"], r["variant"], r["dataset"]) for r in rows},
                key=lambda key: (key[0] != "shipped", key[2], key[1]))
  for setting, variant, dataset in keys:
    group = [r for r in rows if (r["setting"], r["variant"], r["dataset"]) == (setting, variant, dataset)]
    spread = [statistics.mean(r["spread_px"]) for r in group]
    moved = [statistics.mean(r["moved_px"]) for r in group]
    lines.append(f"| {setting} | {variant} | {dataset} | {len(group)} | "
                 f"{mean_std([r['test_accuracy'] for r in group], 100)} | {mean_std(spread, digits=2)} | "
                 f"{mean_std(moved, digits=2)} |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep", help="the sweep's --out folder")
  parser.add_argument("--out", help="also write one JSON line per run here")
  args = parser.parse_args()
  rows = records(pathlib.Path(args.sweep))
  if args.out:
    pathlib.Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
