"""parallel.py: the CPU compiler options change speed, not results."""

import chex
import jax

from overfocus_jax import parallel
from overfocus_jax.train import step as step_lib


def test_cpu_compiler_options_are_used_and_keep_the_step_the_same(tiny_model_setup):
  mesh = parallel.make_mesh()
  options = parallel.compiler_options(mesh)
  assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}  # jaxlib 0.10 CPU
  _, model, tx, schedule, state, batch = tiny_model_setup
  train_step = step_lib.make_train_step(model, tx, schedule=schedule)
  with_options = parallel.jit_for_mesh(train_step, mesh)(state, batch)
  plain = jax.jit(train_step)(state, batch)
  chex.assert_trees_all_close(with_options, plain, rtol=1e-5, atol=1e-6)


def test_no_cpu_compiler_options_on_a_multi_device_mesh():
  """Several CPU devices keep XLA's defaults (Eigen convolutions there can starve the collectives' threads)."""
  import numpy as np
  devices = np.array(jax.devices() * 2)  # a 2-entry mesh is enough to take the multi-device branch
  mesh = jax.sharding.Mesh(devices, ("data",))
  assert parallel.compiler_options(mesh) is None
