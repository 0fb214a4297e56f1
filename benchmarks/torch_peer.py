r"""A PyTorch eager peer of overfocus-jax's residual CNNs and train step, for speed comparisons.

    python -m benchmarks.torch_peer                                  # the default CNN, 28×28×1, batch 128
    python -m benchmarks.torch_peer --image-shape 32 32 3 --check    # + a numerical proof of the same step

The model is the same network as ``overfocus_jax.models.resnet.PreActResNet`` (architecture read from the
package's default config, or ``ResNet18``): 3×3 stem conv without bias → stages of pre-activation basic blocks
(BN → ReLU → conv3×3 → BN → ReLU → conv3×3, projection 1×1 conv on the *pre-activated* input when width or stride
change) → head BN → ReLU → mean over H, W → Linear. Convolutions pad like XLA's ``"SAME"`` (for a stride-2 3×3
conv on an even size that is 0 rows before and 1 after, which torch's symmetric ``padding=1`` is not), batch norm
uses eps 1e-5 and momentum 0.1 (== flax momentum 0.9). The step is the one of ``make_train_step``: forward in
train mode, mean cross-entropy, backward, SGD with momentum 0.9 and coupled weight decay 5e-4 (torch.optim.SGD's
``weight_decay`` == ``optax.add_decayed_weights`` before ``optax.sgd``), plus the accuracy metric.

Same-architecture proof: the parameter counts of both models are printed and asserted equal; ``--check`` goes
further and copies the JAX initial parameters into the torch model, runs one train step in each framework on
the same batch and compares the logits, the loss and every updated parameter.

Prints one JSON line: step_ms, images_per_s, framework, model, batch_size, image_shape, threads, and the timing
of both memory formats tried (contiguous NCHW and ``torch.channels_last``); the faster one is reported.
"""

import argparse
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
  """One train step of the torch peer on a fixed NHWC batch (converted to NCHW inside the step, as a loader
  that yields channels-last arrays would need)."""

  def __init__(self, model_name: str, batch_size: int, image_shape, *, channels_last: bool, seed: int = 0,
               images: np.ndarray | None = None, labels: np.ndarray | None = None, bf16_autocast: bool = False):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    h, w, c = image_shape
    if images is None:
      images = rng.standard_normal((batch_size, h, w, c), dtype=np.float32)
    if labels is None:
      labels = rng.integers(0, NUM_CLASSES, batch_size)
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.model = build_torch_model(model_name, image_shape).to(memory_format=self.memory_format)
    self.model.train()
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                                     weight_decay=WEIGHT_DECAY)
    self.images_nhwc = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    self.labels = torch.from_numpy(np.asarray(labels, np.int64))
    self.bf16_autocast = bf16_autocast  # convolutions and the dense layer in bfloat16 (an experiment, not the peer)

  def __call__(self):
    x = self.images_nhwc.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format)
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16_autocast):
      logits = self.model(x)
    loss = F.cross_entropy(logits.float(), self.labels)
    loss.backward()
    self.optimizer.step()
    accuracy = (logits.detach().argmax(-1) == self.labels).float().mean()
    return loss.detach(), accuracy, logits.detach()


def time_per_step(step, steps: int) -> float:
  """Seconds per step over ``steps`` consecutive calls (torch CPU eager is synchronous)."""
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return (time.perf_counter() - start) / steps


def check_same_step(model_name: str, image_shape, batch_size: int = 16, seed: int = 0) -> dict:
  """One train step of the JAX package and of the torch peer from the same parameters and batch.

  Returns the largest absolute differences of the logits, the loss and the updated parameters.
  """
  import jax
  import optax
  from overfocus_jax.models import build_model
  from overfocus_jax.train import state as state_lib
  from overfocus_jax.train.step import make_train_step
  config = default_config(model_name)
  model = build_model(config, NUM_CLASSES)  # plain nn.Conv: the maths, without any platform tuning
  tx = state_lib.make_optimizer(config, optax.constant_schedule(LEARNING_RATE))
  state = state_lib.create_train_state(model, tx, seed=seed, input_shape=tuple(image_shape))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, *image_shape), dtype=np.float32)
  labels = rng.integers(0, NUM_CLASSES, batch_size)
  jax_logits, _ = model.apply(variables, images, train=True)
  step = jax.jit(make_train_step(model, tx))
  batch = {"image": images, "label": labels.astype(np.int32)}
  new_state, metrics = step(state, batch)
  new_state, metrics = step(new_state, batch)  # a second step exercises the momentum buffer too

  torch_step = TorchStep(model_name, batch_size, image_shape, channels_last=False, images=images, labels=labels)
  load_jax_params(torch_step.model, variables["params"])
  torch_step()
  torch_loss, _, torch_logits_2 = torch_step()
  torch_step.model.train()
  with torch.no_grad():
    fresh = build_torch_model(model_name, image_shape)
    load_jax_params(fresh, variables["params"])
    torch_logits = fresh(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()).numpy()
  params = dict(torch_step.model.named_parameters())
  param_diff = max(float(np.max(np.abs(jax_to_torch_array(path, value) - params[jax_to_torch_name(path)]
                                       .detach().numpy())))
                   for path, value in _flat(jax.device_get(new_state.params)))
  return {"logits_max_abs_diff": float(np.max(np.abs(np.asarray(jax_logits) - torch_logits))),
          "loss_abs_diff_step2": abs(float(metrics["loss"]) - float(torch_loss)),
          "params_max_abs_diff_after_2_steps": param_diff}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", choices=("resnet", "resnet18"), default="resnet")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--image-shape", type=int, nargs=3, default=(28, 28, 1), metavar=("H", "W", "C"))
  parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  parser.add_argument("--repeats", type=int, default=5, help="repeats per memory format (interleaved); median")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--threads", type=int, default=torch.get_num_threads())
  parser.add_argument("--check", action="store_true",
                      help="also prove numerically that one step equals the JAX package's step")
  args = parser.parse_args(argv)
  torch.set_num_threads(args.threads)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  image_shape = tuple(args.image_shape)
  n_torch = torch_param_count(build_torch_model(args.model, image_shape))
  n_jax = jax_param_count(args.model, image_shape)
  print(f"parameters: torch {n_torch:,}  jax {n_jax:,}", file=sys.stderr)
  assert n_torch == n_jax, (n_torch, n_jax)
  check = check_same_step(args.model, image_shape) if args.check else None
  if check is not None:
    print(f"same-step check: {check}", file=sys.stderr)

  steps = {fmt: TorchStep(args.model, args.batch_size, image_shape, channels_last=(fmt == "channels_last"))
           for fmt in ("nchw", "channels_last")}
  for step in steps.values():
    for _ in range(args.warmup):
      step()
  times = {fmt: [] for fmt in steps}
  for _ in range(args.repeats):  # interleaved, so both formats see the same machine load
    for fmt, step in steps.items():
      times[fmt].append(time_per_step(step, args.steps))
  medians = {fmt: statistics.median(t) for fmt, t in times.items()}
  best = min(medians, key=medians.get)
  result = {
      "framework": f"torch {torch.__version__}", "model": args.model, "batch_size": args.batch_size,
      "image_shape": list(image_shape), "threads": torch.get_num_threads(),
      "step_ms": medians[best] * 1e3, "images_per_s": args.batch_size / medians[best], "memory_format": best,
      "step_ms_by_format": {fmt: m * 1e3 for fmt, m in medians.items()},
      "params_torch": n_torch, "params_jax": n_jax,
  }
  if check is not None:
    result["same_step_check"] = check
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
