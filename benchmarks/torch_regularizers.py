r"""PyTorch peers of the SGDrop and RSC train steps, timed against the plain step in one process.

    python -m benchmarks.torch_regularizers              # default CNN, 28×28×1, batch 128, torch threads = cores
    python -m benchmarks.torch_regularizers --threads 1
    python -m benchmarks.torch_regularizers --device cuda --compile default --dtype bfloat16

The same maths as ``overfocus_jax.challenge`` (see sgdrop.py and rsc.py there), written the way a PyTorch user
would: the head in eval mode on a detached copy of z, ``torch.autograd.grad`` of the true-class logits,
``topk`` masks of exactly ⌈ρN⌉ units, then the loss on ``head(z * mask)``. Rounds are interleaved (plain,
SGDrop, RSC, plain, …) so machine noise hits all alike. Prints one JSON line per step kind with its median time
and the ratio to the plain step, and a markdown table. ``--device``, ``--compile`` and ``--dtype`` are
torch_peer's (each step is a ``torch_peer.TorchStep`` whose :meth:`logits` applies the regularizer; under
``torch.compile`` the head's ``torch.autograd.grad`` is a graph break, so the compiled step comes in pieces).
"""

import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

from benchmarks.torch_peer import COMPILE_MODES, DTYPES, TorchStep, default_device, time_per_step


def topk_drop_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
  """(B, N) → 0 at the ⌈fraction·N⌉ highest scores of each row, 1 elsewhere."""
  k = min(scores.shape[1], math.ceil(round(fraction * scores.shape[1], 9)))
  mask = torch.ones_like(scores)
  if k:
    mask.scatter_(1, scores.topk(k, dim=1).indices, 0.0)
  return mask


def head_gradient(head, z, labels):
  """(logits, ∂Σ_b ψ_{y_b}(z_b)/∂z) with the head in eval mode on a detached copy of z."""
  head.eval()
  z_detached = z.detach().requires_grad_(True)
  logits = head(z_detached)
  (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), z_detached)
  head.train()
  return logits.detach(), grad


class SGDropStep(TorchStep):
  """SGDrop: A = ReLU(g ⊙ z), drop the top ρ of the units (element or spatial), loss on head(z ⊙ M)."""

  def __init__(self, *args, rate: float = 0.1, granularity: str = "element", **kwargs):
    super().__init__(*args, **kwargs)
    self.rate, self.granularity = rate, granularity

  def logits(self, x, labels):
    z = self.model.encoder(x)
    _, grad = head_gradient(self.model.head, z, labels)
    attribution = F.relu(grad * z.detach())  # (B, C, H, W)
    batch, channels, height, width = attribution.shape
    if self.granularity == "element":
      mask = topk_drop_mask(attribution.flatten(1), self.rate).view_as(attribution)
    else:
      mask = topk_drop_mask(attribution.sum(1).flatten(1), self.rate).view(batch, 1, height, width)
    return self.model.head(z * mask)


class RSCStep(TorchStep):
  """Official RSC (DeLightCMU/RSC): spatial or channel mask by a coin, batch selection, loss on the masked z."""

  def __init__(self, *args, percent: float = 0.3, **kwargs):
    super().__init__(*args, **kwargs)
    self.percent, self.generator = percent, torch.Generator().manual_seed(0)

  def logits(self, x, labels):
    z = self.model.encoder(x)
    logits_before, grad = head_gradient(self.model.head, z, labels)
    batch, channels, height, width = z.shape
    channel_mean = grad.mean(dim=(2, 3))  # (B, C)
    if torch.rand((), generator=self.generator) < 0.5:
      scores = (z.detach() * channel_mean[:, :, None, None]).sum(1).flatten(1)
      mask = topk_drop_mask(scores, 1 / 3).view(batch, 1, height, width)
    else:
      mask = topk_drop_mask(channel_mean, 1 / 3.2).view(batch, channels, 1, 1)
    with torch.no_grad():
      self.model.head.eval()
      logits_after = self.model.head(z.detach() * mask)
      self.model.head.train()
      p_before = F.softmax(logits_before, 1).gather(1, labels[:, None])[:, 0]
      p_after = F.softmax(logits_after, 1).gather(1, labels[:, None])[:, 0]
      change = torch.clamp(p_before - p_after - 1e-4, min=0)
      threshold = change.sort(descending=True).values[min(round(batch * self.percent), batch - 1)]
      keep = (change > threshold).float().view(batch, 1, 1, 1)
      mask = keep * mask + (1 - keep)
    return self.model.head(z * mask)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="resnet", choices=("resnet", "resnet18"))
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--image-shape", type=int, nargs=3, default=(28, 28, 1))
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--threads", type=int, default=None)
  parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(),
                      help="where model and data live (default: cuda when available)")
  parser.add_argument("--compile", choices=COMPILE_MODES, default="none", help="eager or a torch.compile mode")
  parser.add_argument("--dtype", choices=DTYPES, default="float32", help="bfloat16: autocast forward")
  parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 eager, 5 compiled)")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  common = dict(channels_last=True, device=args.device, compile=args.compile,
                bf16_autocast=args.dtype == "bfloat16")
  steps = {
      "none": TorchStep(args.model, args.batch_size, args.image_shape, **common),
      "sgdrop (element)": SGDropStep(args.model, args.batch_size, args.image_shape, **common),
      "sgdrop (spatial)": SGDropStep(args.model, args.batch_size, args.image_shape, granularity="spatial",
                                     rate=0.3, **common),
      "rsc": RSCStep(args.model, args.batch_size, args.image_shape, **common),
  }
  warmup = args.warmup if args.warmup is not None else (2 if args.compile == "none" else 5)
  for step in steps.values():  # warm-up, compilation included
    step.warm_up(warmup)
  times = {name: [] for name in steps}
  for _ in range(args.rounds):
    for name, step in steps.items():
      times[name].append(time_per_step(step, args.steps))
  base = statistics.median(times["none"])
  mode = "eager" if args.compile == "none" else f"torch.compile {args.compile}"
  print(f"| regularizer (PyTorch {mode}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads) | step ms "
        "| × none |\n|---|---|---|")
  for name, values in times.items():
    print(f"| {name} | {1e3 * statistics.median(values):.1f} | {statistics.median(values) / base:.3f} |")
  for name, values in times.items():
    print(json.dumps({"framework": "torch", "regularizer": name, "step_ms": 1e3 * statistics.median(values),
                      "ratio_to_none": statistics.median(values) / base, "threads": torch.get_num_threads(),
                      "batch_size": args.batch_size, "image_shape": list(args.image_shape),
                      "device": args.device, "compile": args.compile, "dtype": args.dtype}))
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
