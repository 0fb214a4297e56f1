r"""Many train steps per dispatch: one compiled call runs a chunk of K steps in a loop on the device.

    for i < K:                                              lax.fori_loop (K = 1: the step alone, no loop)
      batch_i      = feed(data, state.step, i)              the device stream, or host batch i of K
      state, m_i   = train_step(state, batch_i)
      sums        += m_i                                    metrics summed on the device
      first_bad    = the first step whose metrics are not finite   (−1: none)

The host syncs once per chunk (to read ``sums`` and ``first_bad``); the state is donated, so the chunk updates it
in place. K is static: an epoch of S steps compiles at most two programs, K and S mod K. A chunk lies within one
epoch (the loop cuts chunks at epoch ends), so the device stream's data carries that epoch's order.

On XLA:CPU a loop costs far more than it saves: inside a while loop the convolutions' gradients are not rewritten
into the library kernels and run as naive loops (``python -m benchmarks.cpu_loops`` times a weight gradient and the
train step alone and inside a loop), so :func:`default_steps_per_dispatch` is 1 there and the loop is only used
where the compiler handles it.

Two feeds: :func:`device_feed` builds each batch from a dataset in device memory (:mod:`overfocus_jax.data.
on_device`); :func:`host_feed` reads batch ``i`` of K uint8 batches stacked on a leading axis by the host pipeline
and normalizes it on the device.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from overfocus_jax.data import on_device

# Metrics that may legitimately be NaN (a step without a schedule reports its learning rate as NaN).
NOT_CHECKED = ("learning_rate",)


# ``feed(data, step, i) -> {'image': float (B,H,W,C), 'label': int32 (B,)}``: step ``step``'s batch, the i-th of
# its chunk.
Feed = Callable[[Any, jax.Array, jax.Array], dict]
# XLA:CPU runs convolution gradients inside loops as naive loops (module docstring); elsewhere K steps per call.
CPU_STEPS_PER_DISPATCH, ACCELERATOR_STEPS_PER_DISPATCH = 1, 20


def default_steps_per_dispatch(platform: str) -> int:
  """``config.steps_per_dispatch=0``'s K on ``platform`` (``jax.default_backend()``)."""
  return CPU_STEPS_PER_DISPATCH if platform == "cpu" else ACCELERATOR_STEPS_PER_DISPATCH


def device_feed(spec: on_device.StreamSpec) -> Feed:
  """Batches of the device stream: ``data`` = ``{'split': Split, 'order': the epoch's order}``."""
  return lambda data, step, i: on_device.train_batch(data["split"], step, data["order"], spec)


def host_feed(mean, std) -> Feed:
  """Batch ``i`` of a host chunk ``{'image': uint8 (K,B,H,W,C), 'label': int32 (K,B)}``, normalized here."""
  return lambda data, step, i: {"image": on_device.normalize(data["image"][i], mean, std), "label": data["label"][i]}


def all_finite(metrics: dict) -> jax.Array:
  """Whether every checked metric of a step is finite (a scalar bool)."""
  checks = [jnp.all(jnp.isfinite(v)) for k, v in metrics.items() if k not in NOT_CHECKED]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def make_train_chunk(train_step: Callable, feed: Feed, batch_sharding: jax.sharding.Sharding | None = None):
  """Returns ``train_chunk(state, data, num_steps) -> (state, metric sums, first_bad_step)``, a pure function ready
  for ``jax.jit`` with ``num_steps`` static (donate the state). ``batch_sharding`` constrains each built batch (the
  data axis of the mesh)."""

  def build(data, step, i):
    batch = feed(data, step, i)
    return jax.lax.with_sharding_constraint(batch, batch_sharding) if batch_sharding is not None else batch

  def train_chunk(state, data, num_steps: int):
    def body(i, carry):
      state, sums, first_bad = carry
      state, metrics = train_step(state, build(data, state.step, i))
      first_bad = jnp.where((first_bad < 0) & ~all_finite(metrics), state.step, first_bad)
      return state, jax.tree.map(jnp.add, sums, metrics), first_bad

    shapes = jax.eval_shape(lambda s: train_step(s, build(data, s.step, 0))[1], state)
    start = (state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), jnp.int32(-1))
    if num_steps == 1:  # no loop: XLA:CPU compiles the step well only outside one
      return body(0, start)
    return jax.lax.fori_loop(0, num_steps, body, start)

  return train_chunk
