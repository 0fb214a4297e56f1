r"""oneDNN convolutions (``overfocus_jax/onednn.py``) against XLA's, for every shipped model config, on this CPU.

    python -m benchmarks.onednn_models                     # every config; one JSON line and a markdown table
    python -m benchmarks.onednn_models --configs default resnet18 --rounds 5

For each config it builds the train step twice in one process — at ``platform_tuning=auto`` with the oneDNN
kernels (for every model, whether its ``Platform.onednn`` asks for them or not), and at ``platform_tuning=xla``
(XLA's convolutions, Eigen with the sliced weight gradient or the shifted depthwise sums: the package before them)
— checks that one step from the same state and batch gives the same loss and parameters to float rounding, then
times them in interleaved rounds (``--rounds`` × ``--steps``, medians).
``Platform(onednn=True)`` in a model's file marks the models where the kernels won.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = {"default": None, **{name: str(ROOT / "experiments" / "configs" / f"{name}.py") for name in (
    "shortcut", "resnet18", "attention", "focus", "corner", "vgg16", "convnext", "mnist_cnn")}}


def build(config_file, overrides, with_onednn: bool):
  import dataclasses
  from overfocus_jax import config as config_lib, models as models_lib, parallel
  from overfocus_jax.data import pipeline
  from overfocus_jax.train import experiment
  shipped = dict(models_lib.REGISTRY)
  for name, spec in shipped.items():  # measure every model with the kernels, whether it prefers them or not
    models_lib.REGISTRY[name] = dataclasses.replace(spec, platform=dataclasses.replace(spec.platform, onednn=True))
  try:
    config = config_lib.build_config(config_file, [*overrides, ("platform_tuning", "auto" if with_onednn else "xla")])
    exp = experiment.build_experiment(config)
  finally:
    models_lib.REGISTRY.update(shipped)
  batch = parallel.shard_batch(next(pipeline.make_train_iterator(
      exp.dataset, batch_size=config.batch_size, seed=0, augment=False)), exp.mesh)
  return experiment.jit_train_step(exp), exp.state, batch, config


def largest_difference(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def measure(name: str, rounds: int, steps: int, overrides) -> dict:
  cases = {"onednn": build(CONFIGS[name], overrides, True), "xla": build(CONFIGS[name], overrides, False)}
  first, states = {}, {}
  for case, (step, state, batch, _) in cases.items():  # both from the same initial state (same config and seed)
    first[case] = jax.block_until_ready(step(state, batch))
    states[case] = first[case][0]
  params = {case: jax.device_get(result[0].params) for case, result in first.items()}
  losses = {case: float(result[1]["loss"]) for case, result in first.items()}
  seconds = {case: [] for case in cases}
  for _ in range(rounds):
    for case, (step, _, batch, _) in cases.items():
      start = time.perf_counter()
      for _ in range(steps):  # the step donates its state: thread it through
        states[case] = step(states[case], batch)[0]
      jax.block_until_ready(states[case])
      seconds[case].append((time.perf_counter() - start) / steps)
  ms = {case: statistics.median(values) * 1e3 for case, values in seconds.items()}
  config = cases["onednn"][3]
  return {"config": name, "model": config.model, "batch_size": config.batch_size, "dtype": config.dtype,
          "onednn_step_ms": round(ms["onednn"], 2), "xla_step_ms": round(ms["xla"], 2),
          "speedup": round(ms["xla"] / ms["onednn"], 3),
          "params_max_abs_diff": largest_difference(params["onednn"], params["xla"]),
          "loss_abs_diff": abs(losses["onednn"] - losses["xla"])}


def main(argv=None) -> int:
  from overfocus_jax import onednn
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--batch-size", type=int, help="override every config's batch_size")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="override every config's dtype")
  args = parser.parse_args(argv)
  if not onednn.available():
    print(f"benchmarks.onednn_models: the oneDNN kernels are not available: {onednn.status()}", file=sys.stderr)
    return 1
  overrides = [("batch_size", str(args.batch_size))] if args.batch_size else []
  overrides += [("dtype", args.dtype)] if args.dtype else []
  rows = []
  for name in args.configs:
    rows.append(measure(name, args.rounds, args.steps, overrides))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  print("| config | model | batch | dtype | oneDNN step ms | XLA step ms | speedup | max param diff after a step |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['config']} | {r['model']} | {r['batch_size']} | {r['dtype']} | {r['onednn_step_ms']} | {r['xla_step_ms']} | "
          f"{r['speedup']:.2f}× | {r['params_max_abs_diff']:.1e} |")
  print(json.dumps({"command": "python -m benchmarks.onednn_models " + " ".join(argv or sys.argv[1:]),
                    "jax": jax.__version__, "rows": rows}))
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
