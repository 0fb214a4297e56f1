"""parallel.py: the CPU compiler options change speed, not results."""

import chex
import jax
import numpy as np

from overfocus_jax import config as config_lib, parallel
from overfocus_jax.models import build_model
from overfocus_jax.train import state as state_lib, step as step_lib


def test_cpu_compiler_options_are_used_and_keep_the_step_the_same():
  mesh = parallel.make_mesh()
  options = parallel.compiler_options(mesh)
  assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}  # jaxlib 0.10 CPU
  config = config_lib.load_config_file(config_lib.default_config_path())
  config.resnet.update(dict(stem_features=8, stage_widths=(8, 16), stage_sizes=(1, 1), stage_strides=(1, 2)))
  model = build_model(config, 10)
  schedule = state_lib.make_schedule(config, 10)
  tx = state_lib.make_optimizer(config, schedule)
  state = state_lib.create_train_state(model, tx, seed=0, input_shape=(12, 12, 3))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 12, 12, 3)).astype(np.float32), "label": rng.integers(0, 10, 16)}
  train_step = step_lib.make_train_step(model, tx, schedule=schedule)
  with_options = parallel.jit_for_mesh(train_step, mesh)(state, batch)
  plain = jax.jit(train_step)(state, batch)
  chex.assert_trees_all_close(with_options, plain, rtol=1e-5, atol=1e-6)
