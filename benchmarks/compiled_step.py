"""A fingerprint of the compiled train step: op count, convolutions, fusions and a hash of the op sequence.

Two source trees whose steps give the same fingerprint compile to the same program (same speed, same numbers).
To compare this tree with the one at commit C, for every regularizer:

    git worktree add /tmp/before C
    for reg in none sgdrop rsc rsc_domainbed; do
      (cd /tmp/before && PYTHONPATH=/tmp/before python /ABS/PATH/benchmarks/compiled_step.py $reg)
      python benchmarks/compiled_step.py $reg
    done

It runs as a file (not ``-m``) so the same script can fingerprint an older tree, whose train step was built by
``overfocus_jax.train.loop`` instead of ``overfocus_jax.train.experiment``.
"""

import collections
import hashlib
import re
import sys


def fingerprint(regularizer: str) -> dict:
  from overfocus_jax import config as config_lib, parallel
  from overfocus_jax.data import pipeline
  try:
    from overfocus_jax.train import experiment as assembly
  except ImportError:  # an older tree, whose train step the loop built
    from overfocus_jax.train import loop as assembly
  config = config_lib.build_config(None, [("regularizer.name", regularizer)])
  exp = assembly.build_experiment(config)
  batch = parallel.shard_batch(next(pipeline.make_train_iterator(
      exp.dataset, batch_size=config.batch_size, seed=config.seed, augment=config.augment)), exp.mesh)
  text = assembly.jit_train_step(exp).lower(exp.state, batch).compile().as_text()
  ops = re.findall(r"= [a-z0-9\[\],{}]+ ([a-z\-]+)\(", re.sub(r", metadata=\{[^}]*\}", "", text))
  counts = collections.Counter(ops)
  return {"regularizer": regularizer, "ops": len(ops), "convolutions": counts["convolution"],
          "fusions": counts["fusion"], "op_sequence_sha1": hashlib.sha1(" ".join(ops).encode()).hexdigest()[:12]}


if __name__ == "__main__":
  import json
  print(json.dumps(fingerprint(sys.argv[1] if len(sys.argv) > 1 else "none")))
