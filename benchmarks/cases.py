"""Benchmark cases, each run in a worker process by ``harness.Worker`` (see harness.py for the protocol).

    python -m benchmarks.cases      # started by the harness, in the repository root; reads specs on stdin

A spec is a JSON object with a ``kind``:

  jax_step      the package's compiled train step (``experiment.build_experiment`` + ``experiment.jit_train_step``,
                exactly what ``overfocus train``/``overfocus bench`` run) on a fixed batch, built from the default
                config with the spec's fields as config overrides: ``platform_tuning`` (auto | off; default auto:
                the package as it is), ``dtype`` (float32 | bfloat16), model, batch_size, dataset.
                ``matmul_precision``: jax's default matmul precision for the process. ``overrides``: more
                ``[FIELD, VALUE]`` config overrides (e.g. ``[["regularizer.name", "rsc"]]``). ``flops``: true to
                report the model's FLOPs per image (``bench.inference_flops_per_image``, counted by XLA for the
                CPU where JAX has that backend, so the same number on every platform) in the info. ``warmup``:
                untimed steps after the compiling one (default 0).
  jax_part      forward (train-mode BN, loss), or forward+backward (``jax.value_and_grad``) of the same model,
                jitted with ``experiment.jit`` (the spec's ``platform_tuning``, as the train step).
  torch_step    the torch peer's train step (torch_peer.TorchStep); ``channels_last`` picks the memory format,
                ``device`` cpu (default) | cuda where model and batch live, ``compile`` none (default) | default |
                reduce-overhead the ``torch.compile`` mode, ``warmup`` the untimed steps before the first timed
                block (default 3 eager, 5 compiled; compilation happens in them). On a GPU every timed block
                starts and ends with ``torch.cuda.synchronize()``.
  torch_part    forward (no autograd graph) or forward+backward of the torch peer.
  jax_conv      one convolution (3×3 by default): ``op`` fwd | dx (input gradient) | dw (weight gradient) | all
                (fwd + both gradients). ``platform_tuning`` off (default): ``lax.conv_general_dilated`` under a
                plain ``jax.jit``, NHWC/HWIO or, with ``dimension_numbers: "NCHW"``, NCHW/OIHW; auto: the
                package's convolution for a one-device mesh (``platform_tuning.conv_module``) jitted with
                ``platform_tuning.jit`` — what the residual CNNs run with ``platform_tuning=auto``.
  torch_conv    the same with torch (``aten.convolution_backward`` for the gradients).

Common fields: model, batch_size, image_shape [H, W, C], dataset (mnist5k | synthetic: random images of
image_shape), dtype (float32 | bfloat16: the JAX config's dtype, torch autocast), seed, threads (torch); the
harness also takes env (e.g. XLA_FLAGS) and cpus (taskset) per case.
"""

import json
import os
import resource
import sys
import time
import traceback

import numpy as np

NUM_CLASSES = 10


def reply(message: dict) -> None:
  sys.stdout.write("@@" + json.dumps(message) + "\n")
  sys.stdout.flush()


def fixed_batch(spec):
  rng = np.random.default_rng(spec.get("seed", 0))
  h, w, c = spec["image_shape"]
  images = rng.standard_normal((spec["batch_size"], h, w, c), dtype=np.float32)
  labels = rng.integers(0, NUM_CLASSES, spec["batch_size"]).astype(np.int32)
  return images, labels


# ----------------------------------------------------------------------------------------------------- JAX


def jax_dataset(spec):
  """None for a named dataset (the experiment loads it: mnist5k is what ``overfocus bench`` uses by default),
  else random uint8 images of the spec's shape."""
  from overfocus_jax.data import sources
  if spec.get("dataset", "synthetic") != "synthetic":
    return None
  h, w, c = spec["image_shape"]
  rng = np.random.default_rng(0)
  n = max(256, spec["batch_size"])
  train = sources.ArraySource(rng.integers(0, 256, (n, h, w, c), dtype=np.uint8), rng.integers(0, NUM_CLASSES, n))
  test = sources.ArraySource(rng.integers(0, 256, (16, h, w, c), dtype=np.uint8), rng.integers(0, NUM_CLASSES, 16))
  return sources.ImageDataset(name="synthetic", train=train, test=test, image_shape=(h, w, c),
                              num_classes=NUM_CLASSES, natural_images=True, mean=(0.5,) * c, std=(0.25,) * c)


def jax_config(spec):
  """The default config with the spec's fields as ``--config.*`` overrides (validated like the CLI's)."""
  from overfocus_jax import config as config_lib
  overrides = [("model", spec.get("model", "resnet")), ("batch_size", str(spec["batch_size"])),
               ("eval_batch_size", str(spec["batch_size"])),
               ("platform_tuning", spec.get("platform_tuning", "auto")), ("dtype", spec.get("dtype", "float32"))]
  if spec.get("dataset", "synthetic") != "synthetic":
    overrides.append(("dataset", spec["dataset"]))
  overrides += [(field, str(value)) for field, value in spec.get("overrides", [])]
  return config_lib.build_config(None, overrides)


def jax_experiment(spec):
  import jax
  from overfocus_jax.train import experiment
  if spec.get("matmul_precision"):
    jax.config.update("jax_default_matmul_precision", spec["matmul_precision"])
  return experiment.build_experiment(jax_config(spec), dataset=jax_dataset(spec))


def make_jax_step(spec):
  """(jitted step, experiment, device batch) — the package's own train step for this spec."""
  from overfocus_jax import parallel
  from overfocus_jax.train import experiment
  exp = jax_experiment(spec)
  images, labels = fixed_batch(spec)
  batch = parallel.shard_batch({"image": images, "label": labels}, exp.mesh)
  return experiment.jit_train_step(exp), exp, batch


def build_jax_step(spec, made=None):
  import jax
  from overfocus_jax import host_memory
  from overfocus_jax.train import bench
  step, exp, batch = made or make_jax_step(spec)
  n_params = bench.parameter_count(exp.state.params)  # before the first step donates the state's buffers
  flops = jax_flops_per_image(exp) if spec.get("flops") else None
  holder = {"state": exp.state}
  t = time.perf_counter()
  holder["state"], _ = step(holder["state"], batch)
  jax.block_until_ready(holder["state"])
  compile_s = time.perf_counter() - t
  for _ in range(spec.get("warmup", 0)):  # untimed steps after compilation, as the torch peer's ``warmup``
    holder["state"], _ = step(holder["state"], batch)
  jax.block_until_ready(holder["state"])

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics

  def finish(out):
    jax.block_until_ready(holder["state"])

  info = {"compile_s": compile_s, "params": n_params, "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "platform_tuning": exp.config.platform_tuning,
          "dtype": exp.config.dtype, "regularizer": exp.config.regularizer.name, "host_memory": host_memory.status(),
          "matmul_precision": jax.config.jax_default_matmul_precision}
  if spec.get("flops"):
    info["flops_per_image"] = flops
  return run, finish, info


def jax_flops_per_image(exp):
  """The model's inference FLOPs per image as XLA counts them for the CPU where JAX has its CPU backend (a GPU's
  convolutions are library calls that its cost analysis may count otherwise), else for the default device; None
  where that fails."""
  import jax
  from overfocus_jax.train import bench
  try:
    try:
      cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
      return bench.inference_flops_per_image(exp)
    with jax.default_device(cpu):
      return bench.inference_flops_per_image(exp)
  except Exception:  # noqa: BLE001 -- a missing number, not a failed case
    traceback.print_exc()
    return None


def build_jax_part(spec):
  import jax
  import jax.numpy as jnp
  from overfocus_jax import parallel
  from overfocus_jax.train import experiment
  from overfocus_jax.train.step import cross_entropy
  exp = jax_experiment(spec)
  model = exp.model
  images, labels = fixed_batch(spec)
  batch = parallel.shard_batch({"image": images, "label": labels}, exp.mesh)

  def loss_fn(params, batch_stats, x, y):
    logits, new_state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True)
    return jnp.mean(cross_entropy(logits, y)), new_state

  if spec["part"] == "forward":
    fn = loss_fn
  elif spec["part"] == "grad":
    fn = jax.value_and_grad(loss_fn, has_aux=True)
  else:
    raise ValueError(spec["part"])
  fn = experiment.jit(exp, fn)  # with the config's platform tuning, as the train step
  args = (exp.state.params, exp.state.batch_stats, batch["image"], batch["label"])
  jax.block_until_ready(fn(*args))
  return (lambda: fn(*args)), jax.block_until_ready, {}


def build_jax_conv(spec):
  import jax
  import jax.numpy as jnp
  from jax import lax
  from overfocus_jax import parallel, platform_tuning
  b, h, w, c = spec["input_shape"]
  o, k, s = spec["features"], spec.get("kernel", 3), spec.get("stride", 1)
  dtype = getattr(jnp, spec.get("dtype", "float32"))
  mode = spec.get("platform_tuning", "off")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, h, w, c), dtype=np.float32), dtype)
  kernel = jnp.asarray(rng.standard_normal((k, k, c, o), dtype=np.float32) * 0.1, dtype)
  if spec.get("dimension_numbers", "NHWC") == "NCHW":
    # The same convolution on NCHW/OIHW operands (transposed once, outside the timing), XLA as it comes.
    if mode != "off":
      raise ValueError("dimension_numbers NCHW is timed with platform_tuning off only")
    x, kernel = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(kernel, (3, 2, 0, 1))

    def f(x, kernel):
      return lax.conv_general_dilated(x, kernel, (s, s), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))

    jit = jax.jit
  else:
    # The flax convolution the residual CNNs use under this platform_tuning on one CPU device, with its kernel.
    mesh = parallel.make_mesh(jax.devices()[:1])
    layer = platform_tuning.conv_module(mesh, mode)(features=o, kernel_size=(k, k), strides=(s, s), padding="SAME",
                                                   use_bias=False, dtype=dtype, param_dtype=dtype)

    def f(x, kernel):
      return layer.apply({"params": {"kernel": kernel}}, x)

    def jit(fn):
      return platform_tuning.jit(fn, mesh, mode)

  y = jax.eval_shape(f, x, kernel)
  g = jnp.asarray(rng.standard_normal(y.shape, dtype=np.float32), dtype)
  op = spec["op"]
  if op == "fwd":
    fn, args = jit(f), (x, kernel)
  elif op == "dx":
    fn, args = jit(lambda x, kernel, g: jax.vjp(lambda x: f(x, kernel), x)[1](g)[0]), (x, kernel, g)
  elif op == "dw":
    fn, args = jit(lambda x, kernel, g: jax.vjp(lambda k: f(x, k), kernel)[1](g)[0]), (x, kernel, g)
  elif op == "all":
    fn, args = jit(lambda x, kernel, g: (f(x, kernel), jax.vjp(f, x, kernel)[1](g))), (x, kernel, g)
  else:
    raise ValueError(op)
  jax.block_until_ready(fn(*args))
  return (lambda: fn(*args)), jax.block_until_ready, {}


# --------------------------------------------------------------------------------------------------- torch


def build_torch_step(spec):
  import torch
  from benchmarks import torch_peer
  torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
  images, labels = fixed_batch(spec)
  compile_mode = spec.get("compile", "none")
  step = torch_peer.TorchStep(spec.get("model", "resnet"), spec["batch_size"], tuple(spec["image_shape"]),
                              channels_last=spec.get("channels_last", False), images=images, labels=labels,
                              bf16_autocast=spec.get("dtype") == "bfloat16", device=spec.get("device", "cpu"),
                              compile=compile_mode)
  warmup = spec.get("warmup", 3 if compile_mode == "none" else 5)
  warmup_s = step.warm_up(warmup)
  info = {"params": torch_peer.torch_param_count(step.model), "threads": torch.get_num_threads(),
          "device": str(step.device), "device_name": torch_peer.device_name(step.device), "compile": compile_mode,
          "dtype": spec.get("dtype", "float32"), "channels_last": spec.get("channels_last", False),
          "warmup_steps": warmup, "warmup_s": warmup_s}
  if step.device.type == "cuda":
    info["allow_tf32"] = {"cuda.matmul": torch.backends.cuda.matmul.allow_tf32,
                          "cudnn": torch.backends.cudnn.allow_tf32}
  return step, (lambda out: step.synchronize()), info


def build_torch_part(spec):
  import torch
  import torch.nn.functional as F
  from benchmarks import torch_peer
  torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
  images, labels = fixed_batch(spec)
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


def minor_faults() -> int:
  """This process's minor page faults so far (pages the kernel mapped on first touch)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def serve() -> None:
  spec = json.loads(sys.stdin.readline())
  try:
    run, finish, info = BUILDERS[spec["kind"]](spec)
  except Exception as e:  # reported to the parent, which raises
    traceback.print_exc()
    reply({"error": f"{type(e).__name__}: {e}"})
    return
  reply({"ready": True, "info": info})
  for line in sys.stdin:
    steps = json.loads(line)["steps"]
    finish(None)  # nothing left running from before (a GPU's queue) counts in this block
    start, cpu_start, faults = time.perf_counter(), time.process_time(), minor_faults()
    out = None
    for _ in range(steps):
      out = run()
    finish(out)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    reply({"seconds": wall / steps, "cpu_per_wall": cpu / wall, "minor_faults": (minor_faults() - faults) / steps})


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.stdout = os.fdopen(os.dup(1), "w")  # protocol channel
  os.dup2(2, 1)  # anything a library prints on fd 1 goes to stderr
  serve()
