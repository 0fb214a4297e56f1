r"""Does a regularizer's default collapse training? ERM against each method on every shipped model config.

    python experiments/no_collapse.py --methods erm sgdrop rsc --seeds 0 1 2
    python experiments/no_collapse.py --configs default attention --methods erm sgdrop_mass_0.5 --epochs 4
    python experiments/no_collapse.py --configs mnist_cnn --dataset mnist5k --epochs 3   # not its ColoredMNIST
    python experiments/no_collapse.py --table-only
    overfocus sweep run --config experiments/configs/no_collapse_sweep.py --out sweeps/no_collapse --launcher parallel
    python experiments/no_collapse.py --from-sweep sweeps/no_collapse

For each config (``experiments/configs/NAME.py``, on its own dataset unless ``--dataset`` names another), method and
seed it trains a run and records
the first epoch's train accuracy on the samples the regularizer masked (``train_regularized_accuracy``: at or below
chance, 1/classes, the masks remove all of the class evidence; the whole batch's accuracy would mix in the samples
RSC or a partial-batch SGDrop leave alone) and the final test accuracy. The table gives, per config and method,
mean ± std over seeds and the gap to ERM's test accuracy at the same config, epochs and seeds. The rule a default
must meet: epoch-1 masked train accuracy above chance, and final test accuracy within 1 point of ERM's
(mean of 3 seeds). One JSON line per run (resumable: finished runs are skipped).
"""

import argparse
import json
import pathlib
import statistics
import sys

from methods import METHODS, regularizer_fields  # experiments/methods.py, beside this script
from sweep_records import append_from_sweep, finished_runs

HERE = pathlib.Path(__file__).resolve().parent
CONFIGS = ("default", "shortcut", "resnet18", "attention", "focus", "corner", "vgg16", "convnext", "mnist_cnn")


def run_overrides(method: str, seed: int, epochs: int | None = None,
                  dataset: str | None = None) -> list[tuple[str, str]]:
  """The config overrides of one run on top of its config file: its method's fields, its seed, [epochs, dataset]."""
  overrides = METHODS[method] + [("seed", str(seed))] + ([("num_epochs", str(epochs))] if epochs else [])
  if dataset:  # another dataset than the config's own; a config that holds out environments holds out none
    overrides += [("dataset", dataset), ("environments.test_envs", "()")]
  return overrides


def run_one(config_name: str, method: str, seed: int, epochs: int | None, runs_dir: pathlib.Path,
            dataset: str | None = None) -> dict:
  """Trains one run in this process and returns its record."""
  from overfocus_jax import config as config_lib
  from overfocus_jax.train import loop
  config = config_lib.build_config(str(HERE / "configs" / f"{config_name}.py"),
                                   run_overrides(method, seed, epochs, dataset))
  setting = f"{f'_{dataset}' if dataset else ''}{f'_e{epochs}' if epochs else ''}"
  workdir = runs_dir / f"{config_name}{setting}_{method}_s{seed}"
  loop.train_and_evaluate(config, workdir, progress=False)
  return record_of(workdir, config_name, method, seed, epochs, dataset)


def record_of(workdir: pathlib.Path, config_name: str, method: str, seed: int, epochs: int | None = None,
              dataset: str | None = None) -> dict:
  """The record of a finished run in ``workdir``, trained here or by a sweep."""
  from overfocus_jax.train import workdir as workdir_lib
  summary = json.loads((workdir / "summary.json").read_text())
  records = workdir_lib.read_metrics(workdir)
  run = workdir_lib.load_trained(workdir)
  return {"config": config_name, "method": method, "seed": seed, "epochs_override": epochs,
          "dataset_override": dataset, "epochs": summary["epochs"], "dataset": run.config.dataset,
          "model": run.config.model, "chance": 1 / run.exp.dataset.num_classes,
          "first_epoch_train_accuracy": records[0]["train_accuracy"],
          "first_epoch_masked_accuracy": records[0].get("train_regularized_accuracy"),
          "test_accuracy": summary["test_accuracy"],
          "train_accuracy": summary["train_accuracy"], "wall_time_s": summary["wall_time_s"],
          "overrides": dict(run_overrides(method, seed, epochs, dataset)),
          "regularizer_fields": regularizer_fields(run.config)}


def from_sweep(out: pathlib.Path) -> list[dict]:
  """The records of a sweep of experiments/configs/no_collapse_sweep.py: one per finished run, named
  ``config=C-method=M-seed=S``."""
  return [record_of(workdir, parts["config"], parts["method"], int(parts["seed"]))
          for workdir, parts in finished_runs(out)]


def _mean_std(values: list[float]) -> str:
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def table(results: list[dict], configs, methods) -> str:
  lines = ["| config | epochs | method | seeds | epoch-1 masked train acc. (chance) | test acc. | Δ vs ERM |",
           "|---|---|---|---|---|---|---|"]
  for config in configs:
    settings = sorted({(r.get("dataset_override") or "", r["epochs"]) for r in results if r["config"] == config})
    for dataset, epochs in settings:
      label = f"{config} on {dataset}" if dataset else config
      rows_of = lambda m: sorted((r for r in results
                                  if (r["config"], r.get("dataset_override") or "", r["epochs"], r["method"])
                                  == (config, dataset, epochs, m)),
                                 key=lambda r: r["seed"])
      erm = {r["seed"]: r["test_accuracy"] for r in rows_of("erm")}
      for method in methods:
        rows = rows_of(method)
        if not rows:
          continue
        paired = [100 * (r["test_accuracy"] - erm[r["seed"]]) for r in rows if r["seed"] in erm]
        delta = f"{statistics.mean(paired):+.1f}" if paired and method != "erm" else "–"
        masked = [r.get("first_epoch_masked_accuracy") for r in rows]
        first = "–" if None in masked else _mean_std([100 * value for value in masked])
        lines.append(f"| {label} | {epochs} | {method} | {len(rows)} | {first} ({100 * rows[0]['chance']:.0f}) | "
                     f"{_mean_std([100 * r['test_accuracy'] for r in rows])} | {delta} |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
  parser.add_argument("--methods", nargs="+", default=["erm", "sgdrop", "rsc"], choices=sorted(METHODS),
                      metavar="METHOD",
                      help="names from experiments/methods.py")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--epochs", type=int, help="override every config's num_epochs")
  parser.add_argument("--dataset", help="train every config on this dataset instead of its own (its environments, "
                      "if any, all for training), e.g. mnist5k for mnist_cnn, whose own is ColoredMNIST")
  parser.add_argument("--out", default=str(HERE / "results" / "no_collapse.jsonl"))
  parser.add_argument("--runs-dir", default="runs/no_collapse")
  parser.add_argument("--table-only", action="store_true", help="print the table of finished runs")
  parser.add_argument("--from-sweep", metavar="DIR",
                      help="record the finished runs of a sweep of experiments/configs/no_collapse_sweep.py "
                           "(overfocus sweep run --config ... --out DIR) instead of training here")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  results = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
  key = lambda r: (r["config"], r["method"], r["seed"], r["epochs_override"], r.get("dataset_override"))
  if args.from_sweep:
    if append_from_sweep(args.from_sweep, "no_collapse_sweep.py", out, results, from_sweep, key):
      return 2
  elif not args.table_only:
    done = {key(r) for r in results}
    for config in args.configs:
      for method in args.methods:
        for seed in args.seeds:
          if (config, method, seed, args.epochs, args.dataset) in done:
            continue
          result = run_one(config, method, seed, args.epochs, pathlib.Path(args.runs_dir), args.dataset)
          print(json.dumps(result), flush=True)
          with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
          results.append(result)
  print(table(results, args.configs, args.methods))
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
