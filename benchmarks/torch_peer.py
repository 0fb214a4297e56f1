r"""A PyTorch peer of overfocus-jax's residual CNNs and train step, for speed comparisons, on a CPU or a GPU.

    python -m benchmarks.torch_peer                                  # the default CNN, 28×28×1, batch 128
    python -m benchmarks.torch_peer --image-shape 32 32 3 --check    # + a numerical proof of the same step
    python -m benchmarks.torch_peer --device cuda --compile reduce-overhead --dtype bfloat16

The model is the same network as ``overfocus_jax.models.resnet.PreActResNet`` (architecture read from the
package's default config, or ``ResNet18``): 3×3 stem conv without bias → stages of pre-activation basic blocks
(BN → ReLU → conv3×3 → BN → ReLU → conv3×3, projection 1×1 conv on the *pre-activated* input when width or stride
change) → head BN → ReLU → mean over H, W → Linear. Convolutions pad like XLA's ``"SAME"`` (for a stride-2 3×3
conv on an even size that is 0 rows before and 1 after, which torch's symmetric ``padding=1`` is not), batch norm
uses eps 1e-5 and momentum 0.1 (== flax momentum 0.9). The step is the one of ``make_train_step``: forward in
train mode, mean cross-entropy, backward, SGD with momentum 0.9 and coupled weight decay 5e-4 (torch.optim.SGD's
``weight_decay`` == ``optax.add_decayed_weights`` before ``optax.sgd``), plus the accuracy metric.

Execution (:class:`TorchStep`): ``--device cpu|cuda`` (default cuda when available) holds the model, the
optimizer state and the fixed batch; ``--compile none|default|reduce-overhead`` runs eagerly or through
``torch.compile`` in that mode (the forward with the loss and metrics, whose backward AOTAutograd compiles with
it, and ``optimizer.step``; ``reduce-overhead`` replays them as CUDA graphs on a GPU); ``--dtype bfloat16`` runs
the forward under ``torch.autocast`` (parameters, loss and optimizer stay float32, like the JAX config's
``dtype=bfloat16``). Warm-up steps come before any timing and include the compilation; on a GPU every timed
block is bracketed by ``torch.cuda.synchronize()``.

Same-architecture proof: the parameter counts of both models are printed and asserted equal; ``--check`` goes
further and copies the JAX initial parameters into the torch model, runs two train steps in each framework on
the same batch, on the chosen device, and compares the logits, the loss and every updated parameter — in
float32 with TF32 off on both sides (``torch.backends.cuda.matmul.allow_tf32``/``cudnn.allow_tf32`` False;
JAX's default matmul precision ``highest``) — and fails (exit 1) above ``--check-tolerance``.

Prints one JSON line: step_ms, images_per_s, framework, model, batch_size, image_shape, device, compile, dtype,
threads, and the timing of both memory formats tried (contiguous NCHW and ``torch.channels_last``); the faster
one is reported.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10
LEARNING_RATE = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # torch's convention: new = (1 - 0.1) * old + 0.1 * batch; flax's momentum=0.9 is the same
COMPILE_MODES = ("none", "default", "reduce-overhead")
DTYPES = ("float32", "bfloat16")
CHECK_TOLERANCE = 1e-3  # largest absolute difference the same-step check accepts (float32, TF32 off)


def default_device() -> str:
  """cuda when torch sees a GPU, else cpu."""
  return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device) -> None:
  """Waits for the device's queued work (a no-op on the CPU, where torch runs synchronously)."""
  if torch.device(device).type == "cuda":
    torch.cuda.synchronize(device)


def default_config(model_name: str = "resnet"):
  """The package's default config with ``--config.model=model_name``."""
  from overfocus_jax import config as config_lib
  return config_lib.build_config(None, [("model", model_name)])


def architecture(model_name: str) -> dict:
  """The architecture of the JAX model of that name, from the package's default config."""
  arch = default_config().resnet
  common = dict(stem_kernel=arch.stem_kernel, stem_strides=arch.stem_strides, stem_pool=arch.stem_pool)
  if model_name == "resnet":
    return dict(stem_features=arch.stem_features, stage_widths=tuple(arch.stage_widths),
                stage_sizes=tuple(arch.stage_sizes), stage_strides=tuple(arch.stage_strides), **common)
  if model_name == "resnet18":  # as overfocus_jax.models.resnet.ResNet18
    return dict(stem_features=64, stage_widths=(64, 128, 256, 512), stage_sizes=(2, 2, 2, 2),
                stage_strides=(1, 2, 2, 2), **common)
  raise ValueError(f"unknown model {model_name!r}")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """XLA/TensorFlow "SAME" padding (before, after) along one axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class SameConv(nn.Conv2d):
  """A bias-free conv with "SAME" padding; symmetric padding is passed to the conv itself (no extra op)."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1):
    super().__init__(in_channels, out_channels, kernel, stride=stride, padding=0, bias=False)

  def forward(self, x):
    k, s = self.kernel_size[0], self.stride[0]
    (top, bottom), (left, right) = same_padding(x.shape[-2], k, s), same_padding(x.shape[-1], k, s)
    if top == bottom and left == right:
      return F.conv2d(x, self.weight, None, self.stride, (top, left))
    return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, None, self.stride, 0)


def batch_norm(features: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(features, eps=BN_EPS, momentum=BN_MOMENTUM)


class PreActBlock(nn.Module):
  """BN → ReLU → conv3×3 → BN → ReLU → conv3×3, plus the identity or the projection of the pre-activation."""

  def __init__(self, in_features: int, features: int, strides: int):
    super().__init__()
    self.bn1 = batch_norm(in_features)
    self.conv1 = SameConv(in_features, features, 3, strides)
    self.bn2 = batch_norm(features)
    self.conv2 = SameConv(features, features, 3)
    self.proj = SameConv(in_features, features, 1, strides) if in_features != features or strides != 1 else None

  def forward(self, x):
    pre = F.relu(self.bn1(x))
    shortcut = self.proj(pre) if self.proj is not None else x
    y = self.conv1(pre)
    y = self.conv2(F.relu(self.bn2(y)))
    return shortcut + y


class Encoder(nn.Module):

  def __init__(self, in_channels: int, stem_features: int, stage_widths, stage_sizes, stage_strides,
               stem_kernel: int = 3, stem_strides: int = 1, stem_pool: str = "none"):
    super().__init__()
    if stem_pool != "none":
      raise NotImplementedError("the torch peer implements stem_pool='none' only (the benchmarked configs)")
    self.stem = SameConv(in_channels, stem_features, stem_kernel, stem_strides)
    self.block_names = []
    features = stem_features
    for stage, (width, size, stride) in enumerate(zip(stage_widths, stage_sizes, stage_strides)):
      for block in range(size):
        name = f"stage{stage + 1}_block{block + 1}"  # flax's names, so parameters map one to one
        self.add_module(name, PreActBlock(features, width, stride if block == 0 else 1))
        self.block_names.append(name)
        features = width

  def forward(self, x):
    x = self.stem(x)
    for name in self.block_names:
      x = getattr(self, name)(x)
    return x


class Head(nn.Module):

  def __init__(self, features: int, num_classes: int):
    super().__init__()
    self.bn = batch_norm(features)
    self.dense = nn.Linear(features, num_classes)

  def forward(self, z):
    return self.dense(F.relu(self.bn(z)).mean(dim=(2, 3)))


class PreActResNet(nn.Module):

  def __init__(self, in_channels: int, num_classes: int, **arch):
    super().__init__()
    self.encoder = Encoder(in_channels, **arch)
    self.head = Head(arch["stage_widths"][-1], num_classes)

  def forward(self, x):
    return self.head(self.encoder(x))


def build_torch_model(model_name: str, image_shape, num_classes: int = NUM_CLASSES) -> PreActResNet:
  return PreActResNet(image_shape[-1], num_classes, **architecture(model_name))


def torch_param_count(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def jax_model_and_variables(model_name: str, image_shape, num_classes: int = NUM_CLASSES, seed: int = 0):
  """The package's model (built from its default config, plain ``nn.Conv``) and its initial variables."""
  import jax
  from overfocus_jax.models import build_model
  model = build_model(default_config(model_name), num_classes)
  return model, model.init(jax.random.PRNGKey(seed), tuple(image_shape))


def jax_param_count(model_name: str, image_shape, num_classes: int = NUM_CLASSES) -> int:
  from overfocus_jax.train import bench
  _, variables = jax_model_and_variables(model_name, image_shape, num_classes)
  return bench.parameter_count(variables["params"])


def _flat(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      yield from _flat(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def jax_to_torch_name(path: tuple) -> str:
  *modules, leaf = path
  return ".".join(modules) + "." + {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]


def jax_to_torch_array(path: tuple, value) -> np.ndarray:
  value = np.asarray(value)
  if path[-1] == "kernel" and value.ndim == 4:  # HWIO → OIHW
    return value.transpose(3, 2, 0, 1)
  if path[-1] == "kernel" and value.ndim == 2:  # (in, out) → (out, in)
    return value.T
  return value


def load_jax_params(torch_model: nn.Module, params) -> None:
  """Copies a flax parameter tree into the torch model (names map one to one; every parameter must be set)."""
  state = dict(torch_model.named_parameters())
  seen = set()
  with torch.no_grad():
    for path, value in _flat(params):
      name = jax_to_torch_name(path)
      array = jax_to_torch_array(path, value)
      if state[name].shape != array.shape:
        raise AssertionError(f"{name}: torch {tuple(state[name].shape)} vs jax {array.shape}")
      state[name].copy_(torch.from_numpy(np.array(array, np.float32)))
      seen.add(name)
  missing = set(state) - seen
  if missing:
    raise AssertionError(f"torch parameters without a JAX counterpart: {sorted(missing)}")


class TorchStep:
  """One train step of the torch peer on a fixed NHWC batch held on ``device`` (converted to NCHW inside the
  step, as a loader that yields channels-last arrays would need).

  ``compile``: "none" (eager) or a ``torch.compile`` mode ("default", "reduce-overhead"), applied to
  :meth:`forward` (forward, loss and accuracy; AOTAutograd compiles its backward) and to ``optimizer.step``.
  ``bf16_autocast``: the forward under ``torch.autocast(device, bfloat16)``. Subclasses change the step by
  overriding :meth:`logits`. Calls return (loss, accuracy, logits), detached; under ``reduce-overhead`` they are
  overwritten by the next call (clone what you keep).
  """

  def __init__(self, model_name: str, batch_size: int, image_shape, *, channels_last: bool, seed: int = 0,
               images: np.ndarray | None = None, labels: np.ndarray | None = None, bf16_autocast: bool = False,
               device: str = "cpu", compile: str = "none"):
    if compile not in COMPILE_MODES:
      raise ValueError(f"compile must be one of {COMPILE_MODES}; got {compile=}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    h, w, c = image_shape
    if images is None:
      images = rng.standard_normal((batch_size, h, w, c), dtype=np.float32)
    if labels is None:
      labels = rng.integers(0, NUM_CLASSES, batch_size)
    self.device = torch.device(device)
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.model = build_torch_model(model_name, image_shape).to(self.device, memory_format=self.memory_format)
    self.model.train()
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                                     weight_decay=WEIGHT_DECAY)
    self.images_nhwc = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device)
    self.labels = torch.from_numpy(np.asarray(labels, np.int64)).to(self.device)
    self.bf16_autocast = bf16_autocast
    self.compile = compile
    if compile == "none":
      self._forward, self._update = self.forward, self.optimizer.step
    else:
      mode = None if compile == "default" else compile
      self._forward = torch.compile(self.forward, mode=mode)
      self._update = torch.compile(self._optimizer_step, mode=mode)

  def _optimizer_step(self):
    self.optimizer.step()

  def logits(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits the loss is taken on (NCHW input; inside autocast when bf16)."""
    return self.model(x)

  def forward(self, images_nhwc: torch.Tensor, labels: torch.Tensor):
    """(mean cross-entropy, accuracy, detached logits) of the batch: everything before the backward pass."""
    x = images_nhwc.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast):
      logits = self.logits(x, labels)
    loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.detach().argmax(-1) == labels).float().mean()
    return loss, accuracy, logits.detach()

  def __call__(self):
    if self.compile == "reduce-overhead":
      torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the CUDA graphs may reuse the last outputs
    self.optimizer.zero_grad(set_to_none=True)
    loss, accuracy, logits = self._forward(self.images_nhwc, self.labels)
    loss.backward()
    self._update()
    return loss.detach(), accuracy, logits

  def synchronize(self) -> None:
    synchronize(self.device)

  def warm_up(self, steps: int) -> float:
    """Runs ``steps`` untimed steps (compilation and CUDA-graph recording happen here); returns their seconds."""
    start = time.perf_counter()
    for _ in range(steps):
      self()
    self.synchronize()
    return time.perf_counter() - start


def time_per_step(step, steps: int) -> float:
  """Seconds per step over ``steps`` consecutive calls, with the device synchronised before and after."""
  sync = getattr(step, "synchronize", lambda: None)
  sync()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  return (time.perf_counter() - start) / steps


@contextlib.contextmanager
def full_float32():
  """TF32 off for torch (CUDA matmuls and cuDNN convolutions) and JAX (matmul/conv precision ``highest``)."""
  import jax
  saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
  torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
  try:
    with jax.default_matmul_precision("highest"):
      yield
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_same_step(model_name: str, image_shape, batch_size: int = 16, seed: int = 0, *, device: str = "cpu",
                    compile: str = "none") -> dict:
  """Two train steps of the JAX package and of the torch peer from the same parameters and batch, float32 with
  TF32 off on both sides; JAX on its default device, torch on ``device``.

  Returns the largest absolute differences of the logits, the loss and the updated parameters, and the JAX
  backend.
  """
  import jax
  import optax
  from overfocus_jax.models import build_model
  from overfocus_jax import optimization
  from overfocus_jax.train import state as state_lib
  from overfocus_jax.train.step import make_train_step
  with full_float32():
    config = default_config(model_name)
    model = build_model(config, NUM_CLASSES)  # plain nn.Conv: the maths, without any platform tuning
    tx = optimization.make_optimizer(config, optax.constant_schedule(LEARNING_RATE))
    state = state_lib.create_train_state(model, tx, seed=seed, input_shape=tuple(image_shape))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, *image_shape), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch_size)
    jax_logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=True)[0])(variables, images))
    step = jax.jit(make_train_step(model, tx))
    batch = {"image": images, "label": labels.astype(np.int32)}
    new_state, metrics = step(state, batch)
    new_state, metrics = step(new_state, batch)  # a second step exercises the momentum buffer too
    jax_loss = float(metrics["loss"])
    jax_params = jax.device_get(new_state.params)

    torch_step = TorchStep(model_name, batch_size, image_shape, channels_last=False, images=images, labels=labels,
                           device=device, compile=compile)
    load_jax_params(torch_step.model, variables["params"])
    torch_step()
    torch_loss = float(torch_step()[0])
    with torch.no_grad():
      fresh = build_torch_model(model_name, image_shape).to(device)
      load_jax_params(fresh, variables["params"])
      fresh.train()
      x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()
      torch_logits = fresh(x).cpu().numpy()
    params = {name: p.detach().cpu().numpy() for name, p in torch_step.model.named_parameters()}
  param_diff = max(float(np.max(np.abs(jax_to_torch_array(path, value) - params[jax_to_torch_name(path)])))
                   for path, value in _flat(jax_params))
  return {"logits_max_abs_diff": float(np.max(np.abs(jax_logits - torch_logits))),
          "loss_abs_diff_step2": abs(jax_loss - torch_loss),
          "params_max_abs_diff_after_2_steps": param_diff,
          "jax_backend": jax.default_backend(), "torch_device": str(torch.device(device)), "compile": compile}


def check_failures(check: dict, tolerance: float = CHECK_TOLERANCE) -> list[str]:
  """The differences of a :func:`check_same_step` result that exceed ``tolerance`` (empty: the check passes)."""
  return [f"{key} = {check[key]:.3g} > {tolerance:g}" for key in
          ("logits_max_abs_diff", "loss_abs_diff_step2", "params_max_abs_diff_after_2_steps")
          if not check[key] <= tolerance]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", choices=("resnet", "resnet18"), default="resnet")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--image-shape", type=int, nargs=3, default=(28, 28, 1), metavar=("H", "W", "C"))
  parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(),
                      help="where model and data live (default: cuda when available)")
  parser.add_argument("--compile", choices=COMPILE_MODES, default="none",
                      help="eager (none) or torch.compile in this mode")
  parser.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="bfloat16: the forward under torch.autocast (parameters stay float32)")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=5, help="repeats per memory format (interleaved); median")
  parser.add_argument("--warmup", type=int, default=None,
                      help="untimed steps first, compilation included (default 3 eager, 5 compiled)")
  parser.add_argument("--threads", type=int, default=torch.get_num_threads())
  parser.add_argument("--check", action="store_true",
                      help="also prove numerically that two steps equal the JAX package's (float32, TF32 off)")
  parser.add_argument("--check-only", action="store_true", help="the --check alone, no timing")
  parser.add_argument("--check-tolerance", type=float, default=CHECK_TOLERANCE)
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  if args.device == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the JAX side of the check runs where the torch side does
  else:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the GPU's memory to torch as well
  if args.device == "cuda" and not torch.cuda.is_available():
    parser.error("--device cuda: torch sees no CUDA device (a CPU build of torch, or no GPU)")
  warmup = args.warmup if args.warmup is not None else (3 if args.compile == "none" else 5)

  image_shape = tuple(args.image_shape)
  n_torch = torch_param_count(build_torch_model(args.model, image_shape))
  n_jax = jax_param_count(args.model, image_shape)
  print(f"parameters: torch {n_torch:,}  jax {n_jax:,}", file=sys.stderr)
  assert n_torch == n_jax, (n_torch, n_jax)
  check = None
  if args.check or args.check_only:
    check = check_same_step(args.model, image_shape, device=args.device, compile=args.compile)
    check["tolerance"] = args.check_tolerance
    check["failures"] = check_failures(check, args.check_tolerance)
    print(f"same-step check: {check}", file=sys.stderr)
    if args.check_only:
      print(json.dumps({"model": args.model, "image_shape": list(image_shape), "params_torch": n_torch,
                        "params_jax": n_jax, "same_step_check": check}))
    if check["failures"]:
      print(f"same-step check FAILED: {'; '.join(check['failures'])}", file=sys.stderr)
      return 1
    if args.check_only:
      return 0

  steps = {fmt: TorchStep(args.model, args.batch_size, image_shape, channels_last=(fmt == "channels_last"),
                          device=args.device, compile=args.compile, bf16_autocast=args.dtype == "bfloat16")
           for fmt in ("nchw", "channels_last")}
  warmup_s = {fmt: step.warm_up(warmup) for fmt, step in steps.items()}
  times = {fmt: [] for fmt in steps}
  for _ in range(args.repeats):  # interleaved, so both formats see the same machine load
    for fmt, step in steps.items():
      times[fmt].append(time_per_step(step, args.steps))
  medians = {fmt: statistics.median(t) for fmt, t in times.items()}
  best = min(medians, key=medians.get)
  result = {
      "framework": f"torch {torch.__version__}", "model": args.model, "batch_size": args.batch_size,
      "image_shape": list(image_shape), "device": args.device, "device_name": device_name(args.device),
      "compile": args.compile, "dtype": args.dtype, "threads": torch.get_num_threads(),
      "step_ms": medians[best] * 1e3, "images_per_s": args.batch_size / medians[best], "memory_format": best,
      "step_ms_by_format": {fmt: m * 1e3 for fmt, m in medians.items()},
      "warmup_steps": warmup, "warmup_s_by_format": warmup_s, "params_torch": n_torch, "params_jax": n_jax,
  }
  if check is not None:
    result["same_step_check"] = check
  print(json.dumps(result))
  return 0


def device_name(device) -> str:
  """The GPU's name (``torch.cuda.get_device_name``) or "cpu"."""
  device = torch.device(device)
  return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
