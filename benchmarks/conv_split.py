r"""Can XLA:CPU run YNNPACK's one-core convolutions side by side? Split the batch and see.

    python -m benchmarks.conv_split                # → one JSON line; ~1 min on 2 cores

jaxlib 0.10's XLA:CPU sends each convolution to YNNPACK, which runs it on one core; the package instead compiles
its CPU steps with Eigen's convolutions on every core (``platform_tuning.CPU_COMPILER_OPTIONS``). A third way to use
both cores would be to keep YNNPACK and give XLA independent work: cut the batch into ``n`` slices whose
convolutions — forward, input gradient and weight gradient of ``L = Σ conv(x, W)²``, the weight gradients summed —
share no data, so that XLA's thunk executor can run them at the same time. This times, interleaved (5 rounds of 3
calls, medians), on three of the default model's layer shapes at batch 128:

- ``ynnpack``: one call, XLA's default compile;
- ``ynnpack_slices_2``, ``ynnpack_slices_4``: the batch in 2 or 4 independent slices, the same compile;
- ``eigen``: one call with the package's compiler options.

If the slices ran side by side, ``ynnpack_slices_2`` would take about half of ``ynnpack``.
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from overfocus_jax import platform_tuning

ROUNDS, CALLS = 5, 3
SHAPES = ((128, 28, 28, 32, 32), (128, 14, 14, 64, 64), (128, 7, 7, 128, 128))  # batch, H, W, C_in, C_out


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


both_gradients = jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1))


def in_slices(x, w, slices: int):
  """Both gradients, the batch cut into independent slices; the input gradients concatenated, the weights' summed."""
  parts = [both_gradients(part, w) for part in jnp.split(x, slices)]
  return jnp.concatenate([dx for dx, _ in parts]), sum(dw for _, dw in parts)


def cases() -> dict:
  options = platform_tuning.CPU_COMPILER_OPTIONS
  return {"ynnpack": jax.jit(both_gradients),
          "ynnpack_slices_2": jax.jit(lambda x, w: in_slices(x, w, 2)),
          "ynnpack_slices_4": jax.jit(lambda x, w: in_slices(x, w, 4)),
          "eigen": jax.jit(both_gradients, compiler_options=options)}


def time_shape(shape) -> dict:
  batch, height, width, c_in, c_out = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, height, width, c_in)), jnp.float32)
  w = jnp.asarray(0.1 * rng.standard_normal((3, 3, c_in, c_out)), jnp.float32)
  compiled = cases()
  for fn in compiled.values():
    jax.block_until_ready(fn(x, w))
  seconds = {name: [] for name in compiled}
  for _ in range(ROUNDS):
    for name, fn in compiled.items():
      start = time.perf_counter()
      for _ in range(CALLS):
        jax.block_until_ready(fn(x, w))
      seconds[name].append((time.perf_counter() - start) / CALLS)
  return {name: round(statistics.median(values) * 1e3, 2) for name, values in seconds.items()}


def main() -> int:
  rows = {"x".join(map(str, shape)): time_shape(shape) for shape in SHAPES}
  print(json.dumps({"command": "python -m benchmarks.conv_split", "backend": jax.default_backend(),
                    "jax": jax.__version__, "ms_forward_and_both_gradients": rows}))
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
