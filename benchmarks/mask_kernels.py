r"""The drop mask's two kernels on the current backend: ``lax.top_k`` against the threshold kernel.

    python -m benchmarks.mask_kernels                    # → one JSON line + a table; ~15 s on 2 CPU cores
    python -m benchmarks.mask_kernels --rounds 7 --step  # + the paper's SGDrop step with each kernel; ~1 min
    python -m benchmarks.mask_kernels --rounds 7 --calls 50 --sizes 49 128 256 512 --fraction 0.34   # small k

For each row length N (scores (B, N), the shapes SGDrop's quantile rule ranks: B = 128, N = 256 … 16384 latent
elements, ρ = 0.1, so k = ⌈ρN⌉ = 26 … 1639 per row), both kernels are compiled (``jax.jit``), checked to build the
same mask on random scores and on integer-valued ones (ties), then timed in interleaved rounds (top_k, threshold,
top_k, …; each timing ``--calls`` calls, blocked on the last; medians):

- ``top_k``: :func:`overfocus_jax.challenge.masks.top_k_drop_mask` (``lax.top_k`` + a scatter);
- ``threshold``: :func:`overfocus_jax.challenge.masks.threshold_drop_mask` (32 + ⌈log₂ N⌉ counting passes, in two
  ``lax.fori_loop``\ s).

``threshold_over_top_k`` is the threshold kernel's time over top_k's: below 1 it is the faster. ``--step`` adds
the paper's SGDrop step (element units, ρ = 0.1, every sample: B = 128, N = 6272, k = 628 on the default model)
compiled with each kernel (the rule patched while it traces) and plainly, timed the same way (``--step-calls``
steps per timing).
``masks.mask_kernel``'s rule ("auto": top_k for k up to ``TOP_K_MAX_K["cpu"]`` = 24 on a CPU, read off this, and
up to ``DEFAULT_TOP_K_MAX_K`` = 16 elsewhere; threshold above) is what this measures; on a GPU it has not been run
yet. The ``auto picks`` column is the rule's choice on the current backend.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from overfocus_jax.challenge import masks

KERNELS = {"top_k": masks.top_k_drop_mask, "threshold": masks.threshold_drop_mask}


def timed(fn, scores, calls: int) -> float:
  """Seconds per call over ``calls`` calls, blocked on the last."""
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(scores)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def compiled(fraction: float) -> dict:
  """Each kernel jitted for ``fraction``."""
  return {name: jax.jit(lambda s, kernel=kernel: kernel(s, fraction)) for name, kernel in KERNELS.items()}


def check_same(fns: dict, batch: int, size: int) -> None:
  """Both kernels build the same mask on random scores and on integer-valued (tied) ones, else AssertionError."""
  rng = np.random.default_rng(size)
  for scores in (rng.normal(size=(batch, size)), rng.integers(0, 4, (batch, size))):
    scores = jnp.asarray(scores, jnp.float32)
    assert np.array_equal(fns["top_k"](scores), fns["threshold"](scores)), f"the kernels differ at N = {size}"


def measure(batch: int, size: int, fraction: float, rounds: int, calls: int) -> dict:
  """One row of the record: ms per call of each kernel (medians of interleaved rounds) and their ratio."""
  fns = compiled(fraction)
  check_same(fns, batch, size)
  scores = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (batch, size)))  # like ReLU'd attributions
  for fn in fns.values():
    timed(fn, scores, 1)  # compile and warm up
  seconds = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      seconds[name].append(timed(fn, scores, calls))
  ms = {name: statistics.median(values) * 1e3 for name, values in seconds.items()}
  return {"batch": batch, "size": size, "k": masks.drop_count(fraction, size), "ms_per_call": ms,
          "threshold_over_top_k": ms["threshold"] / ms["top_k"],
          "auto": masks.mask_kernel(masks.drop_count(fraction, size))}


def step_functions() -> tuple[dict, dict, dict]:
  """({name: jitted train step}, {name: state}, batch): the plain step and the paper's SGDrop step with each kernel,
  compiled and warmed up."""
  from unittest import mock

  from benchmarks.regularizer_overhead import PAPER_SGDROP
  from overfocus_jax import config as config_lib, parallel
  from overfocus_jax.data import pipeline
  from overfocus_jax.train import experiment
  steps, states, batch = {}, {}, None
  for name in ("none", *KERNELS):
    config = config_lib.build_config(None, [] if name == "none" else PAPER_SGDROP)
    exp = experiment.build_experiment(config)
    if batch is None:
      batch = parallel.shard_batch(next(pipeline.make_train_iterator(exp.dataset, batch_size=config.batch_size,
                                                                      seed=0, augment=False)), exp.mesh)
    rule = lambda k, kernel="auto", platform=None, name=name: name  # noqa: E731
    with contextlib.nullcontext() if name == "none" else mock.patch.object(masks, "mask_kernel", rule):
      steps[name] = experiment.jit_train_step(exp)
      top_k_in_step = "chlo.top_k" in steps[name].lower(exp.state, batch).as_text()  # traced under the patch
      assert top_k_in_step == (name == "top_k"), f"the {name} step {'runs' if top_k_in_step else 'lacks'} a top_k"
      state, _ = steps[name](exp.state, batch)
    states[name] = jax.block_until_ready(steps[name](state, batch)[0])
  return steps, states, batch


def measure_step(rounds: int, calls: int) -> dict:
  """ms per train step (medians of interleaved rounds) of the plain step and the SGDrop step with each kernel."""
  steps, states, batch = step_functions()
  seconds = {name: [] for name in steps}
  for _ in range(rounds):
    for name, step in steps.items():
      start = time.perf_counter()
      for _ in range(calls):
        states[name], _ = step(states[name], batch)
      jax.block_until_ready(states[name])
      seconds[name].append((time.perf_counter() - start) / calls)
  ms = {name: statistics.median(values) * 1e3 for name, values in seconds.items()}
  return {"ms_per_step": ms, "threshold_over_top_k": ms["threshold"] / ms["top_k"],
          "over_none": {name: ms[name] / ms["none"] for name in KERNELS}}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
  parser.add_argument("--fraction", type=float, default=0.1)
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
  parser.add_argument("--calls", type=int, default=10, help="calls per timing")
  parser.add_argument("--step", action="store_true", help="also time the paper's SGDrop step with each kernel")
  parser.add_argument("--step-calls", type=int, default=4, help="steps per timing with --step")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  rows = [measure(args.batch, size, args.fraction, args.rounds, args.calls) for size in args.sizes]
  step = measure_step(args.rounds, args.step_calls) if args.step else None
  device = jax.devices()[0]
  command = "python -m benchmarks.mask_kernels " + " ".join(sys.argv[1:] if argv is None else argv)
  print(json.dumps({"command": command, "backend": jax.default_backend(), "device_kind": device.device_kind,
                    "jax": jax.__version__, "fraction": args.fraction,
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "rows": rows, "step": step}))
  print("\n| B × N | k | top_k ms | threshold ms | threshold / top_k | auto picks |\n|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['batch']} × {r['size']} | {r['k']} | {r['ms_per_call']['top_k']:.3f} | "
          f"{r['ms_per_call']['threshold']:.3f} | **{r['threshold_over_top_k']:.2f}** | {r['auto']} |")
  if step:
    ms = step["ms_per_step"]
    print(f"\nSGDrop (paper, element) step ms: none {ms['none']:.1f}, top_k {ms['top_k']:.1f}, threshold "
          f"{ms['threshold']:.1f}; threshold / top_k **{step['threshold_over_top_k']:.3f}**")
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
