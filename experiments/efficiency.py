r"""The efficiency table: parameters, FLOPs per image, training images/s and test accuracy for every model.

    python experiments/efficiency.py                       # all models on mnist5k and digits (resumable)
    python experiments/efficiency.py --models focus corner --datasets mnist5k
    python experiments/efficiency.py --table-only
    python experiments/efficiency.py --alone               # every model with its defaults only: --config.model=NAME

For each model (its config file in ``experiments/configs/``) and dataset it runs

    overfocus train --workdir runs/efficiency/MODEL_DATASET --config CONFIG --config.dataset=DATASET --no-progress
    overfocus bench --config CONFIG --config.dataset=DATASET

(plus per (model, dataset) fields, DATASET_OVERRIDES: the focus models' glimpse size on 8×8 digits, resnet50_tv's
3 epochs on mnist5k)
and records the test accuracy of the finished run and the bench line: ``params``, ``flops_per_image`` (XLA's cost
analysis of the compiled inference forward pass for one image; a multiply-add is 2 FLOPs) and ``images_per_s`` of
the compiled train step (median of 3 repeats after warm-up). One JSON line per (model, dataset) goes to
``experiments/results/efficiency.jsonl``; finished pairs are skipped; a markdown table is printed. Throughput on a
shared machine is noisy: compare models measured in the same run.

``--alone`` trains every shipped model as a new user names it, ``overfocus train --config.model=NAME
--config.dataset=DATASET`` and nothing else (the defaults that fit the data: VGG's pools, ConvNeXt's stem and the
focus models' patch size chosen from the image size), and records its test accuracy and training time in
``experiments/results/models_alone.jsonl`` (no bench).
"""

import argparse
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
CONFIGS = {
    "resnet": HERE / "configs" / "default.py",
    "resnet18": HERE / "configs" / "resnet18.py",
    "attention": HERE / "configs" / "attention.py",
    "focus": HERE / "configs" / "focus.py",
    "focus_zoom": HERE / "configs" / "focus.py",  # the focus config, each patch's scale learned (focus.zoom)
    "corner": HERE / "configs" / "corner.py",
    "vgg16": HERE / "configs" / "vgg16.py",
    "convnext": HERE / "configs" / "convnext.py",
    "resnet18_tv": HERE / "configs" / "default.py",  # the default run's settings with torchvision's ResNet-18
    "resnet50_tv": HERE / "configs" / "default.py",  # and ResNet-50
    "mnist_cnn": HERE / "configs" / "mnist_cnn.py",
}
# Fields a model needs besides its config file, on every dataset.
MODEL_OVERRIDES = {
    # Both from scratch with the config's zero_init_residual=auto: on for resnet50_tv (without it its loss diverged
    # within the warm-up at the default settings), off for resnet18_tv (README, efficiency table).
    "resnet18_tv": ("--config.model=resnet18_tv",),
    "resnet50_tv": ("--config.model=resnet50_tv",),
    "focus_zoom": ("--config.focus.zoom=True",),
    "mnist_cnn": ("--config.environments.test_envs=()",),  # its config holds out ColoredMNIST's −90%
}
DATASETS = ("mnist5k", "digits")
# `overfocus bench` options by model (default: its own, 3 + 3×20 steps and two end-to-end epochs): fewer steps for the
# models whose step takes seconds here.
BENCH_ARGS = {"resnet50_tv": ("--steps", "5", "--warmup", "1", "--end-to-end-epochs", "0")}
DATASET_OVERRIDES = {
    # ResNet-50 at 28×28 (CIFAR stem) takes about 10 s a step on 2 CPU cores: 3 epochs on mnist5k.
    ("resnet50_tv", "mnist5k"): ("--config.num_epochs=3",),
    # The focus models' 12-pixel glimpses do not fit 8×8 digits: there they read 4 samples over half the image side.
    ("focus", "digits"): ("--config.focus.patch_size=4", "--config.focus.patch_scale=0.5"),
    ("focus_zoom", "digits"): ("--config.focus.patch_size=4", "--config.focus.patch_scale=0.5"),
    ("corner", "digits"): ("--config.focus.patch_size=4", "--config.focus.patch_scale=0.5",
                           "--config.corner.border=1"),
}


def _overfocus(*args: str) -> dict:
  """Runs ``overfocus ARGS`` and returns its last stdout line as JSON."""
  done = subprocess.run([sys.executable, "-m", "overfocus_jax", *args], capture_output=True, text=True)
  if done.returncode != 0:
    raise SystemExit(f"overfocus {' '.join(args)} failed:\n{done.stderr[-2000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def measure(model: str, dataset: str, runs_dir: pathlib.Path) -> dict:
  fields = ("--config", str(CONFIGS[model]), f"--config.dataset={dataset}", *MODEL_OVERRIDES.get(model, ()),
            *DATASET_OVERRIDES.get((model, dataset), ()))
  workdir = runs_dir / f"{model}_{dataset}"
  summary = _overfocus("train", "--workdir", str(workdir), *fields, "--no-progress")
  bench = _overfocus("bench", *fields, *BENCH_ARGS.get(model, ()))
  return {"model": model, "dataset": dataset, "overrides": list(fields[2:]), "test_accuracy": summary["test_accuracy"],
          "epochs": summary["epochs"],
          "train_wall_time_s": summary["wall_time_s"], "params": bench["params"],
          "flops_per_image": bench["flops_per_image"], "images_per_s": bench["images_per_s"],
          "batch_size": bench["batch_size"], "device_kind": bench["device_kind"], "workdir": str(workdir),
          "bench_args": list(BENCH_ARGS.get(model, ()))}


def measure_alone(model: str, dataset: str, runs_dir: pathlib.Path) -> dict:
  """``model`` with nothing but its name and the dataset: what ``--config.model=NAME`` trains to."""
  workdir = runs_dir / f"{model}_{dataset}"
  code = _commit()  # the code the run starts from
  summary = _overfocus("train", "--workdir", str(workdir), f"--config.model={model}", f"--config.dataset={dataset}",
                       "--no-progress")
  return {"model": model, "dataset": dataset, "test_accuracy": summary["test_accuracy"], "epochs": summary["epochs"],
          "train_wall_time_s": summary["wall_time_s"], "workdir": str(workdir), "commit": code}


def _commit() -> str:
  """The checkout's commit, with ``+`` when its tracked files differ from it."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()
  return git("rev-parse", "--short", "HEAD") + ("+" if git("status", "--porcelain", "--untracked-files=no") else "")


def alone_table(results: list[dict], models, datasets) -> str:
  lines = ["| model | " + " | ".join(f"{d}: test acc. % (epochs), train time" for d in datasets) + " |",
           "|" + "---|" * (1 + len(datasets))]
  for model in models:
    rows = {r["dataset"]: r for r in results if r["model"] == model}
    if rows:
      cells = [f"{100 * rows[d]['test_accuracy']:.1f} ({rows[d]['epochs']}), {rows[d]['train_wall_time_s']:.0f} s"
               if d in rows else "–" for d in datasets]
      lines.append(f"| `{model}` | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def table(results: list[dict], models, datasets) -> str:
  header = "| model | params | MFLOPs / image (28×28) | train img/s (28×28) | " + \
      " | ".join(f"{d} test acc. (epochs)" for d in datasets) + " |"
  lines = [header, "|" + "---|" * (4 + len(datasets))]
  for model in models:
    rows = {r["dataset"]: r for r in results if r["model"] == model}
    if not rows:
      continue
    ref = rows.get("mnist5k") or next(iter(rows.values()))
    flops = f"{ref['flops_per_image'] / 1e6:.2f}" if ref["flops_per_image"] is not None else "–"
    accs = [f"{100 * rows[d]['test_accuracy']:.1f} ({rows[d]['epochs']})" if d in rows else "–" for d in datasets]
    lines.append(f"| {model} | {ref['params']:,} | {flops} | {ref['images_per_s']:.0f} | " + " | ".join(accs) + " |")
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  from overfocus_jax.models import MODELS, task_of
  classifiers = [name for name in MODELS if task_of(name) == "classify"]  # the reconstruction model has no accuracy
  parser.add_argument("--models", nargs="+", choices=sorted({*CONFIGS, *classifiers}),
                      help="default: every config's model (with --alone: every shipped classifier)")
  parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
  parser.add_argument("--alone", action="store_true", help="each model with its defaults only (no config file)")
  parser.add_argument("--out", help="default: experiments/results/efficiency.jsonl (models_alone.jsonl with --alone)")
  parser.add_argument("--runs-dir", help="default: runs/efficiency (runs/alone with --alone)")
  parser.add_argument("--table-only", action="store_true")
  args = parser.parse_args()
  args.models = args.models or list(classifiers if args.alone else CONFIGS)
  if not args.alone and set(args.models) - set(CONFIGS):
    parser.error(f"no config for {sorted(set(args.models) - set(CONFIGS))}; use --alone")
  args.out = args.out or str(HERE / "results" / ("models_alone.jsonl" if args.alone else "efficiency.jsonl"))
  args.runs_dir = args.runs_dir or ("runs/alone" if args.alone else "runs/efficiency")
  out = pathlib.Path(args.out)
  results = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
  if not args.table_only:
    for model in args.models:
      for dataset in args.datasets:
        if any(r["model"] == model and r["dataset"] == dataset for r in results):
          continue
        result = (measure_alone if args.alone else measure)(model, dataset, pathlib.Path(args.runs_dir))
        results.append(result)
        with out.open("a") as f:
          f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
  print((alone_table if args.alone else table)(results, args.models, args.datasets))
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
