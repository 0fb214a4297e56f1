r"""Training-mode gradients of resnet18_tv / resnet50_tv against torchvision's own networks (needs torch).

    python experiments/check_train_gradients.py                  # resnet18 and resnet50, 32 mnist5k digits

``experiments/check_pretrained.py`` checks the inference function (eval mode, running statistics). Training runs
another one — batch statistics in every BN, and its backward pass — so this script compares that: the same weights
(ours, written in torchvision's names by ``resnet_tv.to_torchvision``), the same 32 mnist5k digits at 28×28 through
the CIFAR stem (torchvision's ``conv1`` swapped for a 3×3/1 one, its max-pool removed), train mode, cross-entropy:

  1. in float64, our loss and every parameter's gradient against torchvision's: the two compute the same function
     (largest relative difference per tensor, ‖g_ours − g_tv‖ / ‖g_tv‖);
  2. in float32, each side's gradients against the float64 ones (median and largest relative error over tensors):
     how much float32 rounding moves a freshly initialised network's gradients, ours and torchvision's.

It prints one line per check and exits 1 if the float64 gradients differ by more than 1e-6.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from overfocus_jax.data.sources import load_dataset
from overfocus_jax.models import resnet_tv

FACTORIES = {"resnet18": resnet_tv.ResNet18TV, "resnet50": resnet_tv.ResNet50TV}


def batch(n: int):
  data = load_dataset("mnist5k")
  images = (np.asarray(data.train.images[:n], np.float64) / 255.0 - np.asarray(data.mean)) / np.asarray(data.std)
  return images, np.asarray(data.train.labels[:n])


def our_gradients(name: str, images, labels, dtype):
  """Loss and gradients (torchvision's names) of our network in train mode, at seed 0's initialisation."""
  with jax.enable_x64(dtype == jnp.float64):  # float64 in here only (the tests import this module)
    return _our_gradients(name, images, labels, dtype)


def _our_gradients(name: str, images, labels, dtype):
  init = FACTORIES[name](num_classes=10, stem="cifar")
  variables = jax.jit(lambda key: init.init(key, jnp.zeros((1, 28, 28, 1)), train=False))(jax.random.PRNGKey(0))
  variables = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, variables)
  module = FACTORIES[name](num_classes=10, stem="cifar", dtype=dtype)

  def loss_fn(params):
    logits, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, jnp.asarray(images, dtype),
                             train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables["params"])
  named = resnet_tv.to_torchvision({"params": grads, "batch_stats": variables["batch_stats"]})
  return float(loss), named, resnet_tv.to_torchvision(jax.device_get(variables))


def torchvision_gradients(name: str, state: dict, images, labels, torch_dtype):
  import torch
  import torchvision
  net = getattr(torchvision.models, name)(num_classes=10)
  net.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)  # the CIFAR stem
  net.maxpool = torch.nn.Identity()
  net.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()})
  net.to(torch_dtype).train()
  logits = net(torch.tensor(images, dtype=torch_dtype).permute(0, 3, 1, 2))
  loss = torch.nn.functional.cross_entropy(logits, torch.tensor(labels, dtype=torch.long))
  loss.backward()
  return float(loss), {k: p.grad.detach().double().numpy() for k, p in net.named_parameters()}


def relative_errors(grads: dict, reference: dict) -> list[float]:
  return [float(np.linalg.norm(np.asarray(grads[k], np.float64) - reference[k]) / np.linalg.norm(reference[k]))
          for k in reference]


def float64_gap(name: str, images, labels) -> dict:
  """Check 1: our float64 loss and gradients against torchvision's; also returns what check 2 needs."""
  import torch
  loss, ours, state = our_gradients(name, images, labels, jnp.float64)
  tv_loss, tv = torchvision_gradients(name, state, images, labels, torch.float64)
  return {"loss": loss, "torchvision_loss": tv_loss, "largest_gradient_gap": max(relative_errors(ours, tv)),
          "state": state, "torchvision_gradients": tv}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", default=list(FACTORIES), choices=list(FACTORIES))
  parser.add_argument("--images", type=int, default=32)
  args = parser.parse_args()
  import torch
  images, labels = batch(args.images)
  worst = 0.0
  for name in args.models:
    gap = float64_gap(name, images, labels)
    worst, tv64 = max(worst, gap["largest_gradient_gap"]), gap["torchvision_gradients"]
    print(f"{name} float64: loss {gap['loss']:.9f} vs torchvision {gap['torchvision_loss']:.9f}; gradients at most "
          f"{gap['largest_gradient_gap']:.1e} apart (relative, per tensor)")
    _, ours32, _ = our_gradients(name, images, labels, jnp.float32)
    _, tv32 = torchvision_gradients(name, gap["state"], images, labels, torch.float32)
    for who, grads in (("ours", ours32), ("torchvision", tv32)):
      errors = relative_errors(grads, tv64)
      print(f"{name} float32 {who}: relative error against float64, median {np.median(errors):.2e}, "
            f"largest {max(errors):.2e}")
  return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
