r"""Why one step per dispatch on a CPU: XLA:CPU compiles convolution gradients inside a loop as naive loops.

    python -m benchmarks.cpu_loops                 # → one JSON line; ~2 min on 2 cores

Times, interleaved (A, B, A, B, …; medians), on this CPU:

- a 3×3 convolution's weight gradient (batch 128, 28×28×32 → 32) as one compiled call, and the same inside a
  ``lax.fori_loop`` of 3 iterations (per iteration);
- the package's train step on the default model (``experiment.jit_train_step``) and the same step inside the
  loop's compiled chunk of K = 3 steps (``dispatch.make_train_chunk`` on a host chunk; per step).

In the first, XLA rewrites the weight gradient into the convolution library's layout (``dim_labels`` b01f_01io) and
calls it; in the loop body it keeps ``f01b_i01o->01bf`` and emits a loop nest. ``config.steps_per_dispatch=0``
(the default) therefore means K = 1 on CPUs (:func:`overfocus_jax.train.dispatch.default_steps_per_dispatch`).
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROUNDS, LOOP = 3, 3


def timed(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def conv_cases() -> dict:
  x = jnp.ones((128, 28, 28, 32), jnp.float32)
  w = jnp.full((3, 3, 32, 32), 0.01, jnp.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  grad = jax.grad(lambda w, x: jnp.sum(conv(x, w) ** 2))
  alone = jax.jit(grad)
  looped = jax.jit(lambda w, x: jax.lax.fori_loop(0, LOOP, lambda i, w: w - 1e-9 * grad(w, x), w))
  return {"weight_gradient": (lambda: alone(w, x), 1), "weight_gradient_in_loop": (lambda: looped(w, x), LOOP)}


def step_cases() -> dict:
  from overfocus_jax import config as config_lib
  from overfocus_jax.data import pipeline
  from overfocus_jax.train import dispatch, experiment
  from overfocus_jax.train.step import make_train_step
  exp = experiment.build_experiment(config_lib.build_config(None, []))
  iterator = pipeline.make_train_iterator(exp.dataset, batch_size=128, seed=0, augment=False, normalized=False)
  raw = [next(iterator) for _ in range(LOOP)]
  stacked = {k: jnp.asarray(np.stack([b[k] for b in raw])) for k in ("image", "label")}
  batch = {"image": jnp.asarray(pipeline.normalize(raw[0]["image"], exp.dataset.mean, exp.dataset.std)),
           "label": jnp.asarray(raw[0]["label"])}
  step = make_train_step(exp.model, exp.tx, schedule=exp.schedule)
  chunk = jax.jit(dispatch.make_train_chunk(step, dispatch.host_feed(exp.dataset.mean, exp.dataset.std)),
                  static_argnums=2)
  alone = jax.jit(step)
  state = exp.state
  return {"train_step": (lambda: alone(state, batch), 1), "train_step_in_chunk": (lambda: chunk(state, stacked, LOOP),
                                                                                  LOOP)}


def main() -> int:
  cases = {**conv_cases(), **step_cases()}
  seconds = {name: [] for name in cases}
  for _ in range(ROUNDS):
    for name, (fn, per) in cases.items():
      seconds[name].append(timed(fn) / per)
  ms = {name: statistics.median(values) * 1e3 for name, values in seconds.items()}
  print(json.dumps({"command": "python -m benchmarks.cpu_loops", "backend": jax.default_backend(),
                    "jax": jax.__version__, "ms_per_iteration": ms,
                    "weight_gradient_loop_slowdown": ms["weight_gradient_in_loop"] / ms["weight_gradient"],
                    "train_step_loop_slowdown": ms["train_step_in_chunk"] / ms["train_step"]}))
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
