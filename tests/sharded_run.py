"""Helper for test_sharding.py (not a test): a few train steps on every device this process sees.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_run.py OUT.npz 8
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_run.py OUT.npz 8 regularized

With ``regularized``, the same run is repeated for every entry of ``REGULARIZED`` and saved as ``OUT-NAME.npz``.

Runs 4 steps of a one-stage residual CNN (few distinct weight shapes: eager init compiles per shape) with
batch 16, no augmentation and fixed batches, through the real sharded, jitted step
of ``overfocus_jax.train.loop``, then evaluates on the test split, and saves the losses, the evaluation, the final
variables (flattened, one array per path) and facts about the sharding in ``OUT.npz``.
"""

import sys

import jax
import numpy as np

from overfocus_jax import config as config_lib
from overfocus_jax import parallel
from overfocus_jax.data import pipeline
from overfocus_jax.errors import UserError
from overfocus_jax.train import experiment, evaluation

STEPS, BATCH = 4, 16
FIELDS = [("dataset", "digits"), ("resnet.stem_features", "8"), ("resnet.stage_widths", "(8,)"),
          ("resnet.stage_sizes", "(1,)"), ("resnet.stage_strides", "(1,)"), ("batch_size", str(BATCH)),
          ("eval_batch_size", str(BATCH)), ("augment", "false"), ("schedule", "constant"), ("warmup_epochs", "0"),
          ("learning_rate", "0.1")]


REGULARIZED = {
    "sgdrop": [("regularizer.name", "sgdrop"), ("regularizer.sgdrop.granularity", "spatial"),
               ("regularizer.sgdrop.rate", "0.3"), ("regularizer.sgdrop.ema_decay", "0.9")],
    "rsc": [("regularizer.name", "rsc"), ("regularizer.rsc.batch_percent", "0.5")],
    "rsc_domainbed": [("regularizer.name", "rsc_domainbed")],
}


def main_regularized(out_path: str, expected_devices: int) -> None:
  for name, fields in REGULARIZED.items():
    main(out_path.replace(".npz", f"-{name}.npz"), expected_devices, fields)


def main(out_path: str, expected_devices: int, extra_fields=()) -> None:
  assert jax.device_count() == expected_devices, (jax.device_count(), expected_devices)
  config = config_lib.build_config(None, FIELDS + list(extra_fields))
  exp = experiment.build_experiment(config)
  assert exp.mesh.devices.size == expected_devices
  train_step = experiment.jit_train_step(exp)
  iterator = pipeline.make_train_iterator(exp.dataset, batch_size=BATCH, seed=0, augment=False)
  state, losses, accuracies, shards, rows, regularizer_metrics = exp.state, [], [], [], [], []
  for _ in range(STEPS):
    batch = parallel.shard_batch(next(iterator), exp.mesh)
    shards.append(len(batch["image"].addressable_shards))
    rows.append(batch["image"].addressable_shards[0].data.shape[0])
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
    regularizer_metrics.append([float(v) for k, v in sorted(metrics.items()) if k.startswith(("sgdrop", "rsc"))])
    accuracies.append(float(metrics["accuracy"]))
  test = evaluation.evaluate(exp, state, exp.dataset.test)
  # The per-epoch attribution metrics run replicated over the mesh.
  concentration = jax.device_get(evaluation.jit_attribution_probe(exp)(state, evaluation.attribution_batch(exp)))
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state.variables))[0]
  variables = {"var:" + jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
  replicated = all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params))
  try:
    parallel.check_batch_size(12, exp.mesh)
    rejects_12 = False
  except UserError as e:
    rejects_12 = "12" in str(e)
  chunked = chunked_device_stream(config)
  local = local_batch_norm(config) if expected_devices > 1 and not extra_fields else {}
  np.savez(out_path, **chunked, **local, losses=np.array(losses), accuracies=np.array(accuracies), shards=np.array(shards),
           rows=np.array(rows), device_count=jax.device_count(), params_replicated=replicated,
           test_loss=test["loss"], test_accuracy=test["accuracy"], test_n=test["n"], step=int(state.step),
           rejects_12=rejects_12, regularizer_metrics=np.array(regularizer_metrics),
           concentration=np.array([concentration[k] for k in sorted(concentration)]), **variables)


def chunked_device_stream(config) -> dict:
  """The loop's own path: the data on the devices, crops drawn inside two compiled chunks of 2 steps, the resident
  evaluation."""
  from overfocus_jax.train import loop, streams
  config = config.copy_and_resolve_references()
  config.augment = True
  exp = experiment.build_experiment(config)
  stream = streams.DeviceStream(exp)
  chunk = loop.compile_chunks(exp, exp.state, stream, 2)[2]
  state, loss_sums = exp.state, []
  for first_step in (0, 2):
    state, sums, first_bad = chunk(state, stream.chunk_data(first_step, 2))
    assert int(first_bad) == -1
    loss_sums.append(float(sums["loss"]))
  resident = evaluation.make_evaluator(exp, exp.dataset.test, resident=True)(state)
  return {"chunk_loss_sums": np.array(loss_sums), "resident_test_loss": resident["loss"],
          "resident_test_accuracy": resident["accuracy"], "chunk_step": int(state.step)}


def local_batch_norm(config) -> dict:
  """One step with ``batch_norm=local`` on every device, and its reference: the global step on one device for each
  device's rows alone (its own batch-norm statistics), the results averaged — what averaging the gradients and
  statistics gives after a first SGD step, which is linear in the gradient."""
  config = config.copy_and_resolve_references()
  config.batch_norm = "local"
  exp = experiment.build_experiment(config)
  batch = next(pipeline.make_train_iterator(exp.dataset, batch_size=BATCH, seed=0, augment=False))
  state, metrics = experiment.jit_train_step(exp)(exp.state, parallel.shard_batch(batch, exp.mesh))
  per_device = BATCH // jax.device_count()
  config.batch_norm, config.batch_size = "global", per_device
  single = experiment.build_experiment(config, mesh=parallel.make_mesh(jax.devices()[:1]))
  step = experiment.jit_train_step(single)
  fresh = lambda: jax.tree.map(lambda a: a.copy(), single.state)  # the step donates the state it is given
  results = [step(fresh(), parallel.shard_batch({k: v[i:i + per_device] for k, v in batch.items()}, single.mesh))
             for i in range(0, BATCH, per_device)]
  mean = lambda tree: jax.tree.map(lambda *leaves: np.mean(np.stack(leaves), axis=0), *jax.device_get(tree))
  reference = mean([r[0].variables for r in results])
  flat = lambda tree, tag: {f"{tag}:{jax.tree_util.keystr(path)}": np.asarray(leaf)
                            for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}
  return {**flat(state.variables, "local"), **flat(reference, "local_reference"), "local_loss": float(metrics["loss"]),
          "local_reference_loss": float(np.mean([float(r[1]["loss"]) for r in results]))}


if __name__ == "__main__":
  if sys.argv[3:] == ["regularized"]:
    main_regularized(sys.argv[1], int(sys.argv[2]))
  else:
    main(sys.argv[1], int(sys.argv[2]))
