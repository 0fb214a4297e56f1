"""oneDNN convolutions (overfocus_jax/onednn.py): the same values and gradients as XLA's, in the train step too, and
a clear reason wherever they cannot be built."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from overfocus_jax import config as config_lib, onednn, parallel
from overfocus_jax.data import pipeline
from overfocus_jax.train import bench, experiment

needs_kernels = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN kernels unavailable: {onednn.status()}")
NHWC = ("NHWC", "HWIO", "NHWC")


def _reference(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


@needs_kernels
@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding", [
    ((3, 9, 9, 2), (3, 3, 2, 5), (1, 1), "SAME"),
    ((4, 10, 10, 6), (3, 3, 6, 8), (2, 2), "SAME"),          # stride 2, padding (0, 1): the asymmetric case
    ((4, 10, 10, 6), (1, 1, 6, 8), (2, 2), "VALID"),         # a residual projection
    ((2, 11, 7, 3), (5, 3, 3, 4), (1, 2), ((2, 1), (0, 3))),  # non-square, uneven strides, explicit pads
    ((5, 28, 28, 1), (3, 3, 1, 16), (1, 1), "SAME")])         # a one-channel stem
def test_values_and_both_gradients_match_xla(x_shape, kernel_shape, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal(kernel_shape), jnp.float32)
  hook = onednn.make_conv_general_dilated()
  ours, ours_vjp = jax.vjp(lambda x, k: hook(x, k, strides, padding, dimension_numbers=NHWC), x, kernel)
  theirs, theirs_vjp = jax.vjp(lambda x, k: _reference(x, k, strides, padding), x, kernel)
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
  g = jnp.asarray(rng.standard_normal(theirs.shape), jnp.float32)
  for mine, reference in zip(ours_vjp(g), theirs_vjp(g)):
    np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=2e-4)
  assert "ffi" in str(jax.make_jaxpr(lambda x, k: hook(x, k, strides, padding, dimension_numbers=NHWC))(x, kernel))


@needs_kernels
@pytest.mark.parametrize("strides, padding", [((1, 1), "SAME"), ((2, 2), "SAME")])
def test_bfloat16_matches_xlas_bfloat16_convolution(strides, padding):
  """bf16 operands, float32 accumulation, each result rounded to bf16 once: what XLA's bf16 convolution gives."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, 10, 10, 16)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 16, 8)) * 0.1, jnp.bfloat16)
  hook = onednn.make_conv_general_dilated()
  ours, ours_vjp = jax.vjp(lambda x, k: hook(x, k, strides, padding, dimension_numbers=NHWC), x, kernel)
  theirs, theirs_vjp = jax.vjp(lambda x, k: _reference(x, k, strides, padding), x, kernel)
  assert ours.dtype == jnp.bfloat16
  g = jnp.asarray(rng.standard_normal(theirs.shape), jnp.bfloat16)
  for mine, reference in zip((ours, *ours_vjp(g)), (theirs, *theirs_vjp(g))):
    assert mine.dtype == reference.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(reference.astype(jnp.float32))))
    np.testing.assert_allclose(mine.astype(jnp.float32), reference.astype(jnp.float32), rtol=0, atol=2e-2 * scale)


@needs_kernels
def test_under_jit_and_vmap():
  rng = np.random.default_rng(1)
  xs = jnp.asarray(rng.standard_normal((3, 2, 8, 8, 4)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 4)), jnp.float32)
  pads = ((1, 1), (1, 1))
  mapped = jax.jit(jax.vmap(lambda x: onednn.conv(x, kernel, (1, 1), pads)))(xs)
  np.testing.assert_allclose(mapped, jax.vmap(lambda x: _reference(x, kernel, (1, 1), pads))(xs), rtol=1e-5,
                             atol=1e-4)


@pytest.mark.parametrize("case", ["preferred float32 output", "float16", "dilated", "grouped", "nchw"])
def test_other_convolutions_go_to_the_fallback(case):
  x, kernel, kwargs, numbers = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), {}, NHWC
  if case == "preferred float32 output":
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    kwargs = {"preferred_element_type": jnp.float32}
  elif case == "float16":
    x, kernel = x.astype(jnp.float16), kernel.astype(jnp.float16)
  elif case == "dilated":
    kwargs = {"rhs_dilation": (2, 2)}
  elif case == "grouped":
    kernel, kwargs = jnp.ones((3, 3, 1, 4)), {"feature_group_count": 4}
  else:
    x, kernel, numbers = jnp.ones((2, 4, 8, 8)), jnp.ones((4, 4, 3, 3)), ("NCHW", "OIHW", "NCHW")
  hook = onednn.make_conv_general_dilated()
  ours = jax.make_jaxpr(lambda x, k: hook(x, k, (1, 1), "SAME", dimension_numbers=numbers, **kwargs))(x, kernel)
  theirs = jax.make_jaxpr(lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=numbers,
                                                                **kwargs))(x, kernel)
  assert str(ours) == str(theirs)


@needs_kernels
def test_the_train_step_is_the_same_with_and_without_the_kernels():
  """One step of the default model from the same state and batch, oneDNN vs XLA's convolutions: same loss and
  parameters to float rounding (the sums run in another order)."""
  results = {}
  for with_kernels in (True, False):
    config = config_lib.build_config(None, [("batch_size", "16"),
                                            ("platform_tuning", "auto" if with_kernels else "xla")])
    exp = experiment.build_experiment(config, mesh=parallel.make_mesh(jax.devices("cpu")[:1]))
    batch = parallel.shard_batch(next(pipeline.make_train_iterator(exp.dataset, batch_size=16, seed=0,
                                                                   augment=False)), exp.mesh)
    state, metrics = experiment.jit_train_step(exp)(exp.state, batch)
    results[with_kernels] = (jax.device_get(state.params), float(metrics["loss"]))
    assert bench.cpu_convolutions(exp) == ("onednn" if with_kernels else "xla (platform_tuning=xla)")
  assert abs(results[True][1] - results[False][1]) < 1e-5
  for a, b in zip(jax.tree_util.tree_leaves(results[True][0]), jax.tree_util.tree_leaves(results[False][0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _status_in_subprocess(env: dict) -> str:
  code = "from overfocus_jax import onednn; print(onednn.available(), onednn.status())"
  done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  return done.stdout.strip().splitlines()[-1]


def test_off_and_a_missing_compiler_are_reported_not_raised(tmp_path):
  assert _status_in_subprocess({onednn.ENV: "off"}) == f"False off (${onednn.ENV}=off)"
  line = _status_in_subprocess({"CXX": str(tmp_path / "no-such-compiler"), onednn.CACHE_ENV: str(tmp_path / "c")})
  assert line.startswith("False ") and ("no C++ compiler" in line or "Linux x86-64" in line)
