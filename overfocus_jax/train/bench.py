"""Timing the compiled train step, and what a model costs: parameters and XLA-counted FLOPs per image.

``overfocus bench`` prints :func:`time_train_step`'s dict. Times are host wall-clock around
``jax.block_until_ready``, after compilation and warm-up, the median of ``repeats`` runs of ``steps`` steps on one
batch.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from overfocus_jax import parallel
from overfocus_jax.data import pipeline
from overfocus_jax.models import parameter_count
from overfocus_jax.train.experiment import Experiment, jit_train_step


def inference_flops_per_image(exp: Experiment) -> float | None:
  """FLOPs of one image's inference forward pass, from XLA's cost analysis of the compiled computation
  (a multiply-add counts 2); None where the backend reports none."""
  variables = jax.device_get(exp.state.variables)
  forward = jax.jit(lambda v, x: exp.model.apply(v, x, train=False)[0])
  analysis = forward.lower(variables, jnp.zeros((1, *exp.dataset.image_shape), jnp.float32)).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jaxlibs return one dict per computation
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


def time_train_step(exp: Experiment, *, steps: int = 20, repeats: int = 3, warmup: int = 3) -> dict:
  """Times ``exp``'s jitted train step on one training batch; returns ``step_ms``, ``images_per_s`` and context."""
  if steps < 1 or repeats < 1 or warmup < 0:
    raise ValueError(f"need steps >= 1, repeats >= 1, warmup >= 0; got {steps=}, {repeats=}, {warmup=}")
  config = exp.config
  train_step = jit_train_step(exp)
  batch = parallel.shard_batch(next(pipeline.make_train_iterator(
      exp.dataset, batch_size=config.batch_size, seed=config.seed, augment=config.augment)), exp.mesh)
  params, flops = parameter_count(exp.state.params), inference_flops_per_image(exp)  # before donation frees them
  state = exp.state
  start = time.perf_counter()
  state, _ = train_step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, _ = train_step(state, batch)
  jax.block_until_ready(state)
  per_step = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, _ = train_step(state, batch)
    jax.block_until_ready(state)
    per_step.append((time.perf_counter() - start) / steps)
  step_s = float(np.median(per_step))
  return {
      "step_ms": step_s * 1e3, "images_per_s": config.batch_size / step_s, "devices": exp.mesh.devices.size,
      "params": params, "flops_per_image": flops,
      "batch_size": config.batch_size, "model": config.model, "regularizer": config.regularizer.name,
      "dataset": config.dataset, "image_shape": list(exp.dataset.image_shape), "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind, "dtype": config.dtype, "platform_tuning": config.platform_tuning,
      "compile_s": compile_s, "step_ms_repeats": [t * 1e3 for t in per_step],
  }
