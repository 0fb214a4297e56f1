"""Benchmark cases, each run in a worker process by ``harness.Worker`` (see harness.py for the protocol).

A spec is a JSON object with a ``kind``:

  jax_step      the package's compiled train step (``loop.build_experiment`` + ``loop.jit_train_step``, exactly what
                ``overfocus train``/``overfocus bench`` run), on a fixed batch. Optional ``conv_impl``: swaps the
                convolution flax uses for one with another weight-gradient formulation (see ``conv_variants``;
                ``"lax"``: XLA's own); ``compiler_options``: the same step jitted with these XLA options instead of
                the package's; ``xla_defaults``: the package before its two CPU changes (XLA's default compiler
                options and its own convolution gradients); ``matmul_precision``.
  jax_part      forward (train-mode BN, loss), or forward+backward (``jax.value_and_grad``) of the same model.
  torch_step    the torch peer's train step (torch_peer.TorchStep); ``channels_last`` picks the memory format.
  torch_part    forward (no autograd graph) or forward+backward of the torch peer.
  jax_conv      one 3×3 convolution: ``op`` fwd | dx (input gradient) | dw (weight gradient) | all (fwd + both
                gradients), NHWC/HWIO by default or other ``dimension_numbers``; ``dw_impl`` picks the formulation.
  torch_conv    the same with torch (``aten.convolution_backward`` for the gradients).

Common fields: model, batch_size, image_shape [H, W, C], dtype (float32 | bfloat16: JAX convolutions, torch
autocast), seed, threads (torch); the harness also takes env (e.g. XLA_FLAGS) and cpus (taskset) per case.
"""

import json
import os
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

NUM_CLASSES = 10


def _reply(message: dict) -> None:
  sys.stdout.write("@@" + json.dumps(message) + "\n")
  sys.stdout.flush()


def _batch(spec):
  rng = np.random.default_rng(spec.get("seed", 0))
  h, w, c = spec["image_shape"]
  images = rng.standard_normal((spec["batch_size"], h, w, c), dtype=np.float32)
  labels = rng.integers(0, NUM_CLASSES, spec["batch_size"]).astype(np.int32)
  return images, labels


# ----------------------------------------------------------------------------------------------------- JAX


def _jax_dataset(spec):
  """The real mnist5k for 28×28×1 (what ``overfocus bench`` uses by default), else a synthetic dataset."""
  from overfocus_jax.data import sources
  if spec.get("dataset", "synthetic") == "mnist5k":
    return sources.load_dataset("mnist5k")
  h, w, c = spec["image_shape"]
  rng = np.random.default_rng(0)
  train = sources.ArraySource(rng.integers(0, 256, (max(256, spec["batch_size"]), h, w, c), dtype=np.uint8),
                              rng.integers(0, NUM_CLASSES, max(256, spec["batch_size"])))
  test = sources.ArraySource(rng.integers(0, 256, (16, h, w, c), dtype=np.uint8),
                             rng.integers(0, NUM_CLASSES, 16))
  return sources.ImageDataset(name="synthetic", train=train, test=test, image_shape=(h, w, c),
                              num_classes=NUM_CLASSES, natural_images=True, mean=(0.5,) * c, std=(0.25,) * c)


def _jax_config(spec):
  from overfocus_jax.configs import default
  config = default.get_config()
  config.model = spec.get("model", "resnet")
  config.batch_size = spec["batch_size"]
  config.eval_batch_size = spec["batch_size"]
  config.dataset = spec.get("dataset", "synthetic")
  return config


def _patch_conv(spec):
  """Makes the package's residual CNNs use another convolution function and/or dtype (this worker only).

  ``conv_impl`` (jax_step only: jax_part builds its model without the train loop, so always with lax's
  convolution): absent → the package's own choice (``parallel.conv_for_mesh``: the sliced weight gradient of
  ``overfocus_jax.models.conv`` on one CPU device); ``"lax"`` → ``lax.conv_general_dilated``, XLA's own gradients;
  anything else → ``conv_variants.conv_with_dw(impl)``. ``xla_defaults`` implies ``"lax"``. ``dtype``: the
  convolutions' computation dtype (batch norm stays float32).
  """
  impl = spec.get("conv_impl", "lax" if spec.get("xla_defaults") else None)
  dtype = spec.get("dtype", "float32")
  if impl is not None:
    import conv_variants
    from overfocus_jax import parallel
    function = None if impl == "lax" else conv_variants.conv_with_dw(impl)
    parallel.conv_for_mesh = lambda mesh: function  # noqa: E731
  if dtype != "float32":
    import flax.linen as nn
    import jax.numpy as jnp
    original = nn.Conv

    def conv(*args, **kwargs):  # resnet.py passes dtype=float32 itself: override it, not default it
      return original(*args, **{**kwargs, "dtype": getattr(jnp, dtype)})

    nn.Conv = conv


def make_jax_step(spec):
  """(jitted step, experiment, device batch) — the package's own train step for this spec."""
  import jax
  from overfocus_jax.train import loop
  _patch_conv(spec)
  if spec.get("matmul_precision"):
    jax.config.update("jax_default_matmul_precision", spec["matmul_precision"])
  config = _jax_config(spec)
  exp = loop.build_experiment(config, dataset=_jax_dataset(spec))
  images, labels = _batch(spec)
  batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
  if "compiler_options" in spec or spec.get("xla_defaults"):
    return _jit_train_step_with_options(exp, spec.get("compiler_options") or None), exp, batch
  return loop.jit_train_step(exp), exp, batch


def _jit_train_step_with_options(exp, compiler_options):
  """``loop.jit_train_step`` with XLA compiler options for this one executable (``jax.jit(compiler_options=)``):
  what the package would do to apply an XLA CPU option without touching the process-wide XLA_FLAGS."""
  import jax
  from overfocus_jax import parallel
  from overfocus_jax.train.step import make_train_step, no_regularizer
  step = make_train_step(exp.model, exp.tx, schedule=exp.schedule, regularizer=no_regularizer,
                         label_smoothing=exp.config.label_smoothing, steps_per_epoch=exp.steps_per_epoch)
  rep, data = parallel.replicated(exp.mesh), parallel.data_sharded(exp.mesh)
  return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0,
                 compiler_options=compiler_options)


def build_jax_step(spec, made=None):
  import jax
  step, exp, batch = made or make_jax_step(spec)
  holder = {"state": exp.state}
  t = time.perf_counter()
  holder["state"], _ = step(holder["state"], batch)
  jax.block_until_ready(holder["state"])
  compile_s = time.perf_counter() - t
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(holder["state"].params)))

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics

  def finish(out):
    jax.block_until_ready(holder["state"])

  return run, finish, {"compile_s": compile_s, "params": n_params, "backend": jax.default_backend()}


def build_jax_part(spec):
  import jax
  import jax.numpy as jnp
  from overfocus_jax.models import build_model, merge_batch_stats
  from overfocus_jax.train.step import cross_entropy
  _patch_conv(spec)
  config = _jax_config(spec)
  model = build_model(config, NUM_CLASSES)
  variables = model.init(jax.random.PRNGKey(0), tuple(spec["image_shape"]))
  images, labels = _batch(spec)
  images, labels = jax.device_put(images), jax.device_put(labels)

  def loss_fn(params, batch_stats, x, y):
    logits, state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True)
    return jnp.mean(cross_entropy(logits, y)), merge_batch_stats(batch_stats, state)

  if spec["part"] == "forward":
    fn = jax.jit(loss_fn)
  elif spec["part"] == "grad":
    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  else:
    raise ValueError(spec["part"])
  args = (variables["params"], variables["batch_stats"], images, labels)
  jax.block_until_ready(fn(*args))
  return (lambda: fn(*args)), jax.block_until_ready, {}


def build_jax_conv(spec):
  import jax
  import jax.numpy as jnp
  from jax import lax
  import conv_variants
  b, h, w, c = spec["input_shape"]
  o, k, s = spec["features"], spec.get("kernel", 3), spec.get("stride", 1)
  dtype = getattr(jnp, spec.get("dtype", "float32"))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, h, w, c), dtype=np.float32), dtype)
  kernel = jnp.asarray(rng.standard_normal((k, k, c, o), dtype=np.float32) * 0.1, dtype)
  dn = spec.get("dimension_numbers", "NHWC")
  if dn == "NCHW":  # the same convolution with NCHW/OIHW operands (the data transposed once, outside the timing)
    x, kernel = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(kernel, (3, 2, 0, 1))
    dimension_numbers = ("NCHW", "OIHW", "NCHW")
  else:
    dimension_numbers = ("NHWC", "HWIO", "NHWC")
  impl = spec.get("dw_impl", "xla")
  conv = conv_variants.conv_with_dw(impl) if impl != "xla" else lax.conv_general_dilated

  def f(x, kernel):
    return conv(x, kernel, (s, s), "SAME", dimension_numbers=dimension_numbers)

  y = jax.eval_shape(f, x, kernel)
  g = jnp.asarray(rng.standard_normal(y.shape, dtype=np.float32), dtype)
  op = spec["op"]
  if op == "fwd":
    fn, args = jax.jit(f), (x, kernel)
  elif op == "dx":
    fn, args = jax.jit(lambda x, kernel, g: jax.vjp(lambda x: f(x, kernel), x)[1](g)[0]), (x, kernel, g)
  elif op == "dw":
    fn, args = jax.jit(lambda x, kernel, g: jax.vjp(lambda k: f(x, k), kernel)[1](g)[0]), (x, kernel, g)
  elif op == "all":
    fn, args = jax.jit(lambda x, kernel, g: (f(x, kernel), jax.vjp(f, x, kernel)[1](g))), (x, kernel, g)
  else:
    raise ValueError(op)
  jax.block_until_ready(fn(*args))
  return (lambda: fn(*args)), jax.block_until_ready, {}


# --------------------------------------------------------------------------------------------------- torch


def build_torch_step(spec):
  import torch
  import torch_peer
  torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
  images, labels = _batch(spec)
  step = torch_peer.TorchStep(spec.get("model", "resnet"), spec["batch_size"], tuple(spec["image_shape"]),
                              channels_last=spec.get("channels_last", False), images=images, labels=labels,
                              bf16_autocast=spec.get("dtype") == "bfloat16")
  for _ in range(3):
    step()
  return step, (lambda out: None), {"params": torch_peer.torch_param_count(step.model),
                                    "threads": torch.get_num_threads()}


def build_torch_part(spec):
  import torch
  import torch.nn.functional as F
  import torch_peer
  torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
  images, labels = _batch(spec)
  fmt = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
  model = torch_peer.build_torch_model(spec.get("model", "resnet"), tuple(spec["image_shape"])).to(
      memory_format=fmt)
  model.train()
  x_nhwc, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

  def forward():
    x = x_nhwc.permute(0, 3, 1, 2).contiguous(memory_format=fmt)
    return F.cross_entropy(model(x), y)

  if spec["part"] == "forward":
    def run():
      with torch.no_grad():
        return forward()
  else:
    def run():
      model.zero_grad(set_to_none=True)
      loss = forward()
      loss.backward()
      return loss
  for _ in range(3):
    run()
  return run, (lambda out: None), {}


def build_torch_conv(spec):
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
  b, h, w, c = spec["input_shape"]
  o, k, s = spec["features"], spec.get("kernel", 3), spec.get("stride", 1)
  rng = np.random.default_rng(0)
  fmt = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
  x = torch.from_numpy(rng.standard_normal((b, h, w, c), dtype=np.float32)).permute(0, 3, 1, 2).contiguous(
      memory_format=fmt)
  weight = torch.from_numpy(rng.standard_normal((k, k, c, o), dtype=np.float32) * 0.1).permute(3, 2, 0, 1)
  weight = weight.contiguous(memory_format=fmt)
  pad = (k - 1) // 2  # symmetric: the same FLOPs as "SAME" (the torch peer pads exactly; this is one kernel)
  y = F.conv2d(x, weight, None, s, pad)
  g = torch.from_numpy(rng.standard_normal(tuple(y.shape), dtype=np.float32)).contiguous(memory_format=fmt)
  mask = {"dx": [True, False, False], "dw": [False, True, False], "all": [True, True, False]}

  def backward(which):
    return torch.ops.aten.convolution_backward(g, x, weight, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1,
                                               which)

  op = spec["op"]
  if op == "fwd":
    def run():
      with torch.no_grad():
        return F.conv2d(x, weight, None, s, pad)
  elif op == "all":
    def run():
      with torch.no_grad():
        F.conv2d(x, weight, None, s, pad)
      return backward(mask["all"])
  else:
    def run():
      return backward(mask[op])
  for _ in range(3):
    run()
  return run, (lambda out: None), {}


BUILDERS = {"jax_step": build_jax_step, "jax_part": build_jax_part, "jax_conv": build_jax_conv,
            "torch_step": build_torch_step, "torch_part": build_torch_part, "torch_conv": build_torch_conv}


def serve() -> None:
  spec = json.loads(sys.stdin.readline())
  try:
    run, finish, info = BUILDERS[spec["kind"]](spec)
  except Exception as e:  # reported to the parent, which raises
    traceback.print_exc()
    _reply({"error": f"{type(e).__name__}: {e}"})
    return
  _reply({"ready": True, "info": info})
  for line in sys.stdin:
    steps = json.loads(line)["steps"]
    start, cpu_start = time.perf_counter(), time.process_time()
    out = None
    for _ in range(steps):
      out = run()
    finish(out)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    _reply({"seconds": wall / steps, "cpu_per_wall": cpu / wall})


if __name__ == "__main__":
  sys.stdout = os.fdopen(os.dup(1), "w")  # protocol channel
  os.dup2(2, 1)  # anything a library prints on fd 1 goes to stderr
  serve()
