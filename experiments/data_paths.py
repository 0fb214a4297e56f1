r"""Do the two data paths train the same model? The default run with its data on the device and on the host.

    python experiments/data_paths.py --seeds 0 1 2
    python experiments/data_paths.py --seeds 0 1 2 --dtype bfloat16 --modes on     # bf16 beside float32
    python experiments/data_paths.py --config resnet18 --epochs 3 --seeds 0
    python experiments/data_paths.py --table-only
    overfocus sweep run --config experiments/configs/data_paths_sweep.py --out sweeps/data_paths --launcher local
    python experiments/data_paths.py --from-sweep sweeps/data_paths

``--config.data_on_device=on`` shuffles and augments inside the compiled step with the JAX PRNG;
``--config.data_on_device=off`` runs the grain pipeline on the host with NumPy's. Same distribution of batches,
different draws, so the runs of one seed differ as two seeds do; the check is that the mean test accuracies agree
to ±0.5 point, and the same of ``--config.dtype=bfloat16`` against float32. One JSON line per run in ``experiments/results/data_paths.jsonl`` (finished runs are skipped), with
the throughput each path reached on this machine (``images_per_s``: the run's train images over its train time).
"""

import argparse
import json
import pathlib
import statistics
import sys

from sweep_records import append_from_sweep, finished_runs  # experiments/sweep_records.py, beside this script

HERE = pathlib.Path(__file__).resolve().parent
MODES = ("on", "off")


def run_overrides(mode: str, dtype: str, seed: int, epochs: int | None = None) -> list[tuple[str, str]]:
  """The config overrides of one run on top of its config file."""
  return [("data_on_device", mode), ("dtype", dtype), ("seed", str(seed))] + (
      [("num_epochs", str(epochs))] if epochs else [])


def run_one(config_name: str, mode: str, dtype: str, seed: int, epochs: int | None, runs_dir: pathlib.Path) -> dict:
  """Trains one run in this process and returns its record."""
  from overfocus_jax import config as config_lib
  from overfocus_jax.train import loop
  config = config_lib.build_config(str(HERE / "configs" / f"{config_name}.py"),
                                   run_overrides(mode, dtype, seed, epochs))
  name = f"{config_name}{f'_e{epochs}' if epochs else ''}_data_{mode}{'' if dtype == 'float32' else '_' + dtype}"
  workdir = runs_dir / f"{name}_s{seed}"
  loop.train_and_evaluate(config, workdir, progress=False)
  return record_of(workdir, config_name, mode, dtype, seed)


def record_of(workdir: pathlib.Path, config_name: str, mode: str, dtype: str, seed: int) -> dict:
  """The record of a finished run in ``workdir``, trained here or by a sweep."""
  summary = json.loads((workdir / "summary.json").read_text())
  return {"config": config_name, "data_on_device": mode, "dtype": dtype, "seed": seed, "epochs": summary["epochs"],
          "steps_per_dispatch": summary["steps_per_dispatch"], "test_accuracy": summary["test_accuracy"],
          "images_per_s": summary["images_per_s"], "wall_time_s": summary["wall_time_s"]}


def from_sweep(out: pathlib.Path) -> list[dict]:
  """The records of a sweep of experiments/configs/data_paths_sweep.py: one per finished run, named
  ``config=C-data=M-dtype=D-seed=S``."""
  return [{**record_of(workdir, parts["config"], parts["data"], parts["dtype"], int(parts["seed"])),
           "epochs_override": None} for workdir, parts in finished_runs(out)]


def dtype_of(record: dict) -> str:
  return record.get("dtype", "float32")  # the first records were written before the --dtype option


def table(results: list[dict]) -> str:
  lines = ["| config | epochs | dtype | data_on_device | seeds | test acc. | train img/s |",
           "|---|---|---|---|---|---|---|"]
  for key in sorted({(r["config"], r["epochs"], dtype_of(r)) for r in results}):
    for mode in MODES:
      rows = [r for r in results if (r["config"], r["epochs"], dtype_of(r), r["data_on_device"]) == (*key, mode)]
      if not rows:
        continue
      accuracy = [100 * r["test_accuracy"] for r in rows]
      spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
      speed = statistics.median(r["images_per_s"] for r in rows)
      lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {mode} | {len(rows)} | {statistics.mean(accuracy):.2f} ± "
                   f"{spread:.2f} | {speed:.0f} |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="default", help="a config in experiments/configs/")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--epochs", type=int, help="override the config's num_epochs")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="data_on_device values")
  parser.add_argument("--runs", default=str(HERE / "runs" / "data_paths"), help="workdirs of the runs")
  parser.add_argument("--out", default=str(HERE / "results" / "data_paths.jsonl"))
  parser.add_argument("--table-only", action="store_true")
  parser.add_argument("--from-sweep", metavar="DIR",
                      help="record the finished runs of a sweep of experiments/configs/data_paths_sweep.py "
                           "(overfocus sweep run --config ... --out DIR) instead of training here")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  results = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
  key = lambda r: (r["config"], r["data_on_device"], dtype_of(r), r["seed"], r.get("epochs_override"))
  if args.from_sweep:
    if append_from_sweep(args.from_sweep, "data_paths_sweep.py", out, results, from_sweep, key):
      return 2
  elif not args.table_only:
    done = {key(r) for r in results}
    for seed in args.seeds:
      for mode in args.modes:  # interleaved, so that load on the machine falls on both paths alike
        if (args.config, mode, args.dtype, seed, args.epochs) in done:
          continue
        record = {**run_one(args.config, mode, args.dtype, seed, args.epochs, pathlib.Path(args.runs)),
                  "epochs_override": args.epochs}
        results.append(record)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
          f.write(json.dumps(record) + "\n")
        print(json.dumps(record), file=sys.stderr, flush=True)
  print(table(results))
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
