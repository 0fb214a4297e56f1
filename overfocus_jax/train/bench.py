"""Timing the compiled train step and the train loop end to end, and what a model costs: parameters and
XLA-counted FLOPs per image.

``overfocus bench`` prints :func:`time_train_step`'s dict merged with :func:`time_end_to_end`'s. The step: host
wall-clock around ``jax.block_until_ready``, after compilation and warm-up, the median of ``repeats`` runs of
``steps`` steps on one batch. End to end: whole epochs of the loop's own path (:func:`overfocus_jax.train.loop.
train_epoch`: the run's data stream, K steps per dispatch, one host sync per chunk), after one untimed epoch.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from overfocus_jax import host_memory, parallel
from overfocus_jax.data import pipeline
from overfocus_jax.models import build_model, parameter_count, platform_of
from overfocus_jax.train import loop, streams
from overfocus_jax.train.experiment import Experiment, jit_train_step


def inference_flops_per_image(exp: Experiment) -> float | None:
  """FLOPs of one image's inference forward pass, from XLA's cost analysis of the compiled computation
  (a multiply-add counts 2); None where the backend reports none."""
  variables = jax.device_get(exp.state.variables)
  # Counted on the model with XLA's own convolutions: a oneDNN kernel (platform tuning on a CPU) is an FFI call,
  # whose FLOPs XLA does not see. Same parameters, same maths.
  model = build_model(exp.config, exp.dataset.num_classes)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  analysis = forward.lower(variables, jnp.zeros((1, *exp.dataset.image_shape), jnp.float32)).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jaxlibs return one dict per computation
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


def cpu_convolutions(exp: Experiment) -> str | None:
  """What runs the step's convolutions on a one-device CPU mesh: ``"onednn"``, or ``"xla"`` and why not oneDNN;
  None on other meshes (GPUs, TPUs, several devices), where XLA's own always do."""
  from overfocus_jax import onednn, platform_tuning
  one_cpu = exp.mesh.devices.size == 1 and exp.mesh.devices.flat[0].platform == "cpu"
  if not one_cpu:
    return None
  if not platform_tuning.applies(exp.mesh, exp.config.platform_tuning):
    return "xla (platform_tuning=off)"
  if exp.config.platform_tuning == "xla":
    return "xla (platform_tuning=xla)"
  if not platform_of(exp.config.model).onednn:
    return f"xla (oneDNN not used for {exp.config.model})"
  return "onednn" if onednn.available() else f"xla ({onednn.status()})"


def time_train_step(exp: Experiment, *, steps: int = 20, repeats: int = 3, warmup: int = 3) -> dict:
  """Times ``exp``'s jitted train step on one training batch; returns ``step_ms``, ``images_per_s`` and context."""
  if steps < 1 or repeats < 1 or warmup < 0:
    raise ValueError(f"need steps >= 1, repeats >= 1, warmup >= 0; got {steps=}, {repeats=}, {warmup=}")
  config = exp.config
  train_step = jit_train_step(exp)
  batch = parallel.shard_batch(next(pipeline.make_train_iterator(
      exp.dataset, batch_size=config.batch_size, seed=config.seed, augment=config.augment,
      augmentation=streams.augmentation_policy(exp))), exp.mesh)
  params, flops = parameter_count(exp.state.params), inference_flops_per_image(exp)  # before donation frees them
  state = jax.tree.map(jnp.copy, exp.state)  # the step donates its state; the experiment's stays usable
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
      "cpu_convolutions": cpu_convolutions(exp), "host_memory": host_memory.status(), "compile_s": compile_s, "step_ms_repeats": [t * 1e3 for t in per_step],
  }


def time_end_to_end(exp: Experiment, *, epochs: int = 1) -> dict:
  """Images/s of ``epochs`` whole epochs through the train loop's path, after an untimed first epoch; the data
  stream and K follow the config (``data_on_device``, ``steps_per_dispatch``)."""
  if epochs < 1:
    raise ValueError(f"need epochs >= 1; got {epochs=}")
  stream = streams.make_stream(exp, None)
  chunk_size = loop.steps_per_dispatch(exp.config, exp.steps_per_epoch)
  state = jax.tree.map(jnp.copy, exp.state)  # the chunks donate their state; the experiment's stays usable
  chunks = loop.compile_chunks(exp, state, stream, chunk_size)
  seconds = []
  try:
    for epoch in range(epochs + 1):
      state, _, elapsed = loop.train_epoch(exp, state, stream, chunks, chunk_size, epoch, progress=False)
      seconds.append(elapsed)
  finally:
    stream.close()
  images = epochs * exp.steps_per_epoch * exp.config.batch_size
  timed = sum(seconds[1:])
  return {"end_to_end_images_per_s": images / timed, "end_to_end_step_ms": timed / (epochs * exp.steps_per_epoch) * 1e3,
          "end_to_end_epochs": epochs, "data_on_device": stream.resident, "steps_per_dispatch": chunk_size}
