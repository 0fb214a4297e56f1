r"""The named reference variants against their reference code (the transcriptions in ``tests/test_peers.py``): for
each case, whether the masks are equal entry for entry, and the largest differences of the loss and of the
gradients, with the largest gradient they are read against.

    python -m benchmarks.reference_peers --out benchmarks/results/reference_peers.json     # ~1 min; needs torch

Cases: DomainBed's ``RSC.update`` on its MNIST_CNN (a ColoredMNIST batch of real digits with repeated samples) at
f = b = 1/3 and at fractions its sweep draws; the official RSC's masking of a 7×7 map with constant background
(ties) at epochs 0, 10 and 20 with the coin on each side; SGDrop's masks against their formulas in torch.
"""

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "tests")
import test_peers as peers  # noqa: E402  (the transcriptions of the references)

from overfocus_jax.challenge import rsc as rsc_lib  # noqa: E402
from overfocus_jax.models import mnist_cnn  # noqa: E402

torch = peers.torch
F = peers.F


def domainbed_case(f: float, b: float) -> dict:
  x, labels = peers.colored_batch(64)
  variables = jax.device_get(mnist_cnn.MNISTCNN(num_classes=2).init(jax.random.PRNGKey(1), jnp.asarray(x[:1])))
  peer = peers.TorchMNISTCNN(variables)
  reference = peers.domainbed_rsc_update(peer, peers.nchw(x), torch.from_numpy(labels), 2, f, b)
  loss, mask, aux, grads = peers.jax_domainbed_update(variables, jnp.asarray(x), jnp.asarray(labels, jnp.int32), f, b)
  theirs = peers.torch_gradients(peer)
  exact = peers.float64_gradients(variables, x, labels, reference["mask"])
  encoder = grads["encoder"]
  ours = {**{f"conv{i}.weight": np.transpose(encoder[f"conv{i + 1}"]["kernel"], (3, 2, 0, 1)) for i in range(4)},
          **{f"conv{i}.bias": encoder[f"conv{i + 1}"]["bias"] for i in range(4)},
          **{f"norm{i}.weight": encoder[f"bn{i}"]["scale"] for i in range(4)},
          **{f"norm{i}.bias": encoder[f"bn{i}"]["bias"] for i in range(4)},
          "classifier.weight": np.transpose(grads["head"]["classifier"]["kernel"]),
          "classifier.bias": grads["head"]["classifier"]["bias"]}
  return {"variant": "rsc_domainbed", "case": f"f={f:.4g}, b={b:.4g}",
          "masks_equal": bool(np.array_equal(np.asarray(mask), reference["mask"].numpy())
                              and np.array_equal(np.asarray(aux["mask_f"]), reference["mask_f"].numpy())),
          "loss_difference": abs(float(loss) - float(reference["loss"].detach())),
          "gradient_difference": peers.largest_difference(ours, theirs),
          "largest_gradient": max(float(np.max(np.abs(v))) for v in theirs.values()),
          "torch_float32_error": peers.largest_difference(theirs, exact),
          "our_float32_error": peers.largest_difference(ours, exact)}


def official_case(epoch: int, choose_one: int) -> dict:
  z = peers.feature_map()
  rng = np.random.default_rng(epoch + choose_one)
  weights = rng.normal(size=(16, 10)).astype(np.float32)
  bias = rng.normal(size=(10,)).astype(np.float32)
  labels = rng.integers(0, 10, len(z))
  labels[1::4] = labels[0::4]
  head = torch.nn.Linear(16, 10)
  head.weight.data, head.bias.data = peers.to_torch(weights.T), peers.to_torch(bias)
  reference = peers.official_rsc_mask(peers.nchw(z), head, torch.from_numpy(labels), epoch, choose_one)
  position = rsc_lib.selection_position(len(z), rsc_lib.official_percent(epoch // 10))
  mask, aux = rsc_lib.rsc_mask(lambda latent: jnp.mean(latent, axis=(1, 2)) @ weights + bias, jnp.asarray(z),
                               jnp.asarray(labels, jnp.int32), jax.random.PRNGKey(0),
                               spatial_probability=1.0 if choose_one <= 4 else 0.0, position=position)
  ours = np.transpose(np.asarray(mask), (0, 3, 1, 2))
  x_torch = peers.nchw(z).requires_grad_(True)
  loss_t = F.cross_entropy(head(F.avg_pool2d(x_torch * reference, 7).view(len(z), -1)), torch.from_numpy(labels))
  loss_t.backward()

  def loss_fn(w, b, latent):
    logits = jnp.mean(latent * mask, axis=(1, 2)) @ w + b
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=-1))

  loss, (g_w, g_b, g_z) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(weights, bias, jnp.asarray(z))
  theirs = {"w": head.weight.grad.numpy().T, "b": head.bias.grad.numpy(),
            "z": np.transpose(x_torch.grad.numpy(), (0, 2, 3, 1))}
  mine = {"w": np.asarray(g_w), "b": np.asarray(g_b), "z": np.asarray(g_z)}
  chosen = np.asarray(aux["chosen"])
  dropped = np.sum(np.asarray(mask)[..., 0] == 0, axis=(1, 2))[chosen] if choose_one <= 4 else None
  return {"variant": "rsc", "case": f"epoch {epoch}, {'spatial' if choose_one <= 4 else 'channel'}",
          "masks_equal": bool(np.array_equal(ours, np.broadcast_to(reference.numpy(), ours.shape))),
          "loss_difference": abs(float(loss) - float(loss_t.detach())),
          "gradient_difference": max(float(np.max(np.abs(theirs[k] - mine[k]))) for k in theirs),
          "largest_gradient": max(float(np.max(np.abs(v))) for v in theirs.values()),
          "samples_with_fewer_than_k": None if dropped is None else int(np.sum(dropped < 17))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  rows = [domainbed_case(f, b) for f, b in ((1 / 3, 1 / 3), (0.047, 0.25), (0.25, 0.047), (0.5, 0.5), (0.0, 0.0),
                                            (0.4183, 0.1237))]
  rows += [official_case(epoch, coin) for epoch in (0, 10, 20) for coin in (2, 7)]
  for row in rows:
    print(json.dumps(row), flush=True)
  print("\n| variant | case | masks equal | loss diff | gradient diff (largest gradient) | float32 vs float64: "
        "PyTorch / ours |")
  print("|---|---|---|---|---|---|")
  for row in rows:
    against = (f"{row['torch_float32_error']:.1e} / {row['our_float32_error']:.1e}" if "our_float32_error" in row
               else "—")
    print(f"| {row['variant']} | {row['case']} | {'yes' if row['masks_equal'] else 'NO'} | "
          f"{row['loss_difference']:.1e} | {row['gradient_difference']:.1e} ({row['largest_gradient']:.2g}) | "
          f"{against} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  main()
