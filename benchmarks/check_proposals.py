r"""Checks that the CPU speed-ups of BENCHMARKS.md keep the train step's math: two steps of the package's step
(both changes applied) and of the package before each change, from the same state and batch, must give the same
loss and parameters up to float rounding (different summation orders), and the same batch statistics.

    python benchmarks/check_proposals.py      # prints the largest differences; exits 1 if one is too large
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import cases  # noqa: E402
import step_time  # noqa: E402

TOLERANCE = 1e-4  # absolute, on parameters of order 0.1–1 after two SGD steps at lr 0.1


def two_steps(spec: dict):
  step, exp, batch = cases.make_jax_step(spec)
  state = exp.state
  metrics = None
  for _ in range(2):
    state, metrics = step(state, batch)
  return jax.device_get((state.params, state.batch_stats, metrics["loss"]))


def main() -> int:
  base = {"model": "resnet", "batch_size": 32, "image_shape": [28, 28, 1], "dataset": "mnist5k"}
  ref_params, ref_stats, ref_loss = two_steps(base)
  report, ok = {}, True
  for name, change in step_time.EARLIER.items():
    from overfocus_jax import parallel
    original_conv_for_mesh = parallel.conv_for_mesh
    try:
      params, stats, loss = two_steps({**base, **change})
    finally:
      parallel.conv_for_mesh = original_conv_for_mesh  # cases._patch_conv swaps it
    diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))  # noqa: E731
                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    report[name] = {"params_max_abs_diff": diff(params, ref_params),
                    "batch_stats_max_abs_diff": diff(stats, ref_stats),
                    "loss_abs_diff": abs(float(loss) - float(ref_loss))}
    ok &= all(v < TOLERANCE for v in report[name].values())
  print(json.dumps(report, indent=2))
  print("same step up to float rounding" if ok else f"DIFFERENCE above {TOLERANCE}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
