"""Runs the shortcut benchmark: each method × seed trains on a shortcut dataset and is tested on the decorrelated
test split and on clean digits. Writes one JSON line per run (resumable: finished runs are skipped) and prints a
markdown table of mean ± std over seeds.

    python experiments/shortcut.py --seeds 0 1 2
    python experiments/shortcut.py --seeds 0 1 2 --methods sgdrop_spatial_0.1 --table-only
    python experiments/shortcut.py --kind color --config overfocus_jax/configs/default.py --epochs 4 ...
    overfocus sweep run --config experiments/configs/shortcut_sweep.py --out sweeps/shortcut --launcher parallel
    python experiments/shortcut.py --from-sweep sweeps/shortcut --kind patch --methods erm sgdrop sgdrop_paper rsc

``--kind patch`` trains on ``mnist5k_shortcut`` (clean test: ``mnist5k``), ``--kind color`` on ``mnist5k_color`` (clean
test: ``mnist5k_rgb``), ``--kind glyph`` on ``mnist5k_glyph`` (clean test: ``mnist5k``); ``--config`` is the base config
(default: experiments/configs/shortcut.py), ``--epochs`` overrides its epochs; ``--columns FILE ...`` prints one table
with a column per results file. Each record also keeps the first epoch's train accuracy, on the whole batch and on the
samples the regularizer masked alone: at or below chance there, the regularizer collapsed training.
"""

import argparse
import json
import pathlib
import statistics
import sys

from methods import METHODS, regularizer_fields  # experiments/methods.py, beside this script
from sweep_records import append_from_sweep, finished_runs

HERE = pathlib.Path(__file__).resolve().parent

DEFAULT_METHODS = ("erm", "sgdrop_element_0.1", "sgdrop_spatial_0.3", "rsc", "rsc_domainbed")


KINDS = {"patch": ("mnist5k_shortcut", "mnist5k"), "color": ("mnist5k_color", "mnist5k_rgb"),  # train, clean test
         "glyph": ("mnist5k_glyph", "mnist5k")}
DEFAULT_CONFIG = HERE / "configs" / "shortcut.py"


def run_name(method: str, seed: int, kind: str, config_path: pathlib.Path, epochs: int | None) -> str:
  """The run's workdir name: everything that makes two runs different (the original runs keep their old names)."""
  setting = "" if (kind, config_path.name, epochs) == ("patch", DEFAULT_CONFIG.name, None) else \
      f"{kind}_{config_path.stem}{f'_e{epochs}' if epochs else ''}_"
  return f"{setting}{method}_s{seed}"


def run_key(record: dict) -> tuple:
  """What identifies a finished run in a results file (records from before --kind/--config count as the defaults)."""
  return (record["method"], record["seed"], record.get("kind", "patch"), record.get("config", DEFAULT_CONFIG.name),
          record.get("epochs_override"))


def run_overrides(method: str, seed: int, kind: str = "patch", epochs: int | None = None) -> list[tuple[str, str]]:
  """The config overrides of one run: its training data, its method's fields (experiments/methods.py), its seed."""
  overrides = [("dataset", KINDS[kind][0])] + METHODS[method] + [("seed", str(seed))]
  return overrides + ([("num_epochs", str(epochs))] if epochs else [])


def run_one(method: str, seed: int, runs_dir: pathlib.Path, *, kind: str = "patch",
            config_path: pathlib.Path = DEFAULT_CONFIG, epochs: int | None = None) -> dict:
  """Trains one run in this process and returns its record."""
  from overfocus_jax import config as config_lib
  from overfocus_jax.train import loop
  config = config_lib.build_config(str(config_path), run_overrides(method, seed, kind, epochs))
  workdir = runs_dir / f"{run_name(method, seed, kind, config_path, epochs)}"
  loop.train_and_evaluate(config, workdir, progress=False)
  return record_of(workdir, method, seed, kind=kind, config_path=config_path, epochs=epochs)


def record_of(workdir: pathlib.Path, method: str, seed: int, *, kind: str = "patch",
              config_path: pathlib.Path = DEFAULT_CONFIG, epochs: int | None = None) -> dict:
  """The record of a finished run in ``workdir``, trained here or by a sweep: its summary, its accuracy on clean
  digits and its first epoch's train accuracies."""
  from overfocus_jax.train import evaluation, workdir as workdir_lib
  summary = json.loads((workdir / "summary.json").read_text())
  run = workdir_lib.load_trained(workdir)  # the finished run, read back as `overfocus eval` does
  clean_test, _ = evaluation.evaluation_split(run.exp, KINDS[kind][1])  # the same digits, no cue
  clean = evaluation.evaluate(run.exp, run.state, clean_test)
  first_epoch = workdir_lib.read_metrics(workdir)[0]
  return {"method": method, "seed": seed, "decorrelated_accuracy": summary["test_accuracy"],
          "clean_accuracy": clean["accuracy"], "train_accuracy": summary["train_accuracy"],
          "first_epoch_train_accuracy": first_epoch["train_accuracy"],
          "first_epoch_masked_accuracy": first_epoch.get("train_regularized_accuracy"),
          "epochs": summary["epochs"], "wall_time_s": summary["wall_time_s"], "kind": kind,
          "config": config_path.name, "epochs_override": epochs, "model": run.config.model,
          "overrides": dict(run_overrides(method, seed, kind, epochs)),
          "regularizer_fields": regularizer_fields(run.config)}


def from_sweep(out: pathlib.Path) -> list[dict]:
  """The records of a sweep of experiments/configs/shortcut_sweep.py (overfocus_jax.sweeps.results): one per
  finished run, named ``kind=K-method=M-seed=S``."""
  return [record_of(workdir, parts["method"], int(parts["seed"]), kind=parts["kind"])
          for workdir, parts in finished_runs(out)]


def mean_std(rows: list[dict], key: str) -> str:
  """``mean ± std`` of ``key`` over ``rows``, in % (the sample std; 0 for one row)."""
  values = [100 * r[key] for r in rows]
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def mean_std_if_known(rows: list[dict], key: str) -> str:
  """``mean_std``, or ``–`` where a row has no value (ERM masks nothing; older records lack the masked accuracy)."""
  return mean_std(rows, key) if all(r.get(key) is not None for r in rows) else "–"


def table(results: list[dict], methods) -> str:
  lines = ["| method | seeds | decorrelated test acc. | clean test acc. | train acc. | epoch-1 train acc. | "
           "epoch-1 acc. on masked samples |", "|---|---|---|---|---|---|---|"]
  for method in methods:
    rows = [r for r in results if r["method"] == method]
    if not rows:
      continue
    lines.append(f"| {method} | {len(rows)} | {mean_std(rows, 'decorrelated_accuracy')} | "
                 f"{mean_std(rows, 'clean_accuracy')} | {mean_std(rows, 'train_accuracy')} | "
                 f"{mean_std_if_known(rows, 'first_epoch_train_accuracy')} | "
                 f"{mean_std_if_known(rows, 'first_epoch_masked_accuracy')} |")
  return "\n".join(lines)


def cell(rows: list[dict]) -> str:
  """``decorrelated / clean / epoch-1 masked (seeds)``, mean ± std in %, as in experiments/README.md's tables."""
  if not rows:
    return "–"
  return " / ".join(mean_std_if_known(rows, key) for key in
                    ("decorrelated_accuracy", "clean_accuracy", "first_epoch_masked_accuracy")) + f" ({len(rows)})"


def columns_table(paths: list[pathlib.Path], methods) -> str:
  """One row per method, one cell per results file (each file one kind and config): the README's summary tables."""
  files = {path: [json.loads(line) for line in path.read_text().splitlines()] for path in paths}
  lines = ["| method | " + " | ".join(path.stem for path in paths) + " |", "|---|" + "---|" * len(paths)]
  for method in methods:
    lines.append(f"| `{method}` | " + " | ".join(cell([r for r in rows if r["method"] == method])
                                               for rows in files.values()) + " |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS), metavar="METHOD",
                      help="names from experiments/methods.py")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--out", default=str(HERE / "results" / "shortcut.jsonl"))
  parser.add_argument("--runs-dir", default="runs/shortcut")
  parser.add_argument("--table-only", action="store_true", help="print the table of finished runs")
  parser.add_argument("--kind", default="patch", choices=sorted(KINDS),
                      help="the shortcut: a patch's place, a colour or a glyph's shape")
  parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the base config file")
  parser.add_argument("--epochs", type=int, help="override the config's num_epochs")
  parser.add_argument("--from-sweep", metavar="DIR",
                      help="record the finished runs of a sweep of experiments/configs/shortcut_sweep.py (overfocus "
                           "sweep run --config ... --out DIR) instead of training here")
  parser.add_argument("--columns", nargs="+", metavar="RESULTS",
                      help="print one table, a column per results file (decorrelated / clean / epoch-1 masked), "
                           "and run nothing")
  args = parser.parse_args()
  if args.columns:
    missing = [path for path in args.columns if not pathlib.Path(path).is_file()]
    if missing:
      print(f"error: --columns: no results file {missing[0]}; run the experiment that writes it first", file=sys.stderr)
      return 2
    print(columns_table([pathlib.Path(path) for path in args.columns], args.methods))
    return 0
  out = pathlib.Path(args.out)
  results = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
  if args.from_sweep:
    if append_from_sweep(args.from_sweep, "shortcut_sweep.py", out, results, from_sweep, run_key):
      return 2
  elif not args.table_only:
    done = {run_key(r) for r in results}
    config_path = pathlib.Path(args.config)
    for method in args.methods:
      for seed in args.seeds:
        if (method, seed, args.kind, config_path.name, args.epochs) in done:
          continue
        result = run_one(method, seed, pathlib.Path(args.runs_dir), kind=args.kind, config_path=config_path,
                         epochs=args.epochs)
        print(json.dumps(result), flush=True)
        with out.open("a") as f:
          f.write(json.dumps(result) + "\n")
        results.append(result)
  shown = [r for r in results if r.get("kind", "patch") == args.kind
           and r.get("config", DEFAULT_CONFIG.name) == pathlib.Path(args.config).name]
  print(table(shown, args.methods))
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
