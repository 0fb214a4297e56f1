"""platform_tuning.py: one switch; on one CPU device the sliced weight gradient (XLA's gradient summed in another
order, used where it pays) and the CPU compiler option change speed, not results. Meshes are built from CPU
devices explicitly, so the suite passes whatever JAX's default backend is."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from overfocus_jax import models, onednn, parallel
from overfocus_jax import platform_tuning
from overfocus_jax import platform_tuning as conv  # the sliced convolution's functions
from overfocus_jax.models import build_model
from overfocus_jax.train import state as state_lib, step as step_lib

CPU = jax.devices("cpu")

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("layer, slices", [
    ((128, 28, 28, 1, 16), 1),      # the stem: too few input channels to gain
    ((128, 28, 28, 16, 32), 16),    # narrow layers on large maps: slices of 8 examples
    ((128, 14, 14, 64, 64), 16),
    ((128, 14, 14, 64, 128), 1),    # wider layers: XLA's single call
    ((64, 32, 32, 64, 64), 1),      # a slice's input would exceed 1 MiB
    ((100, 28, 28, 16, 32), 1),     # 12 slices do not divide 100 examples
    ((8, 28, 28, 16, 32), 1),       # one slice is no slicing
    ((512, 28, 28, 16, 32), 32),    # at most 32 slices: larger batches get larger slices ...
    ((512, 28, 28, 32, 32), 1),     # ... unless a slice's input would then exceed 1 MiB
    ((128, 8, 8, 16, 32), 1),       # small maps (the 8×8 digits): the single call is faster
])
def test_slice_count_follows_the_measured_rule(layer, slices):
  assert conv.slice_count(*layer) == slices


def _lax_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _sliced_conv(x, kernel, strides, padding):
  return conv.sliced_conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


@pytest.mark.parametrize("kernel_size, strides, padding", [
    (3, (1, 1), "SAME"), (3, (2, 2), "SAME"), (1, (2, 2), "SAME"), (3, (1, 1), ((1, 0), (0, 1))),
    (3, (2, 1), "VALID")])
def test_value_and_gradients_equal_xla(kernel_size, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 15, 15, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 8, 12)) * 0.2, jnp.float32)
  weights = jnp.asarray(rng.normal(size=_lax_conv(x, kernel, strides, padding).shape), jnp.float32)
  loss = lambda fn: lambda x, k: jnp.sum(jnp.tanh(fn(x, k, strides, padding)) * weights)  # noqa: E731
  convs = lambda fn: str(jax.make_jaxpr(jax.grad(loss(fn), (0, 1)))(x, kernel)).count("conv_general_dilated[")  # noqa
  assert convs(_sliced_conv) > convs(_lax_conv)  # the kernel gradient is one call per slice of 8 examples
  chex.assert_trees_all_equal(_sliced_conv(x, kernel, strides, padding), _lax_conv(x, kernel, strides, padding))
  ours = jax.jit(jax.value_and_grad(loss(_sliced_conv), (0, 1)))(x, kernel)
  xla = jax.jit(jax.value_and_grad(loss(_lax_conv), (0, 1)))(x, kernel)
  chex.assert_trees_all_close(ours, xla, rtol=1e-5, atol=1e-4)  # kernel gradients reach ~30: float rounding
  # the kernel gradient alone, summed over 4 slices vs XLA's single call
  pads = conv.same_pads((15, 15), (kernel_size,) * 2, strides) if padding == "SAME" else None
  if pads is not None:
    g = jnp.asarray(rng.normal(size=_lax_conv(x, kernel, strides, padding).shape), jnp.float32)
    chex.assert_trees_all_close(conv.sliced_kernel_grad(x, g, kernel.shape, strides, pads, 4),
                                conv.xla_kernel_grad(x, g, kernel.shape, strides, pads), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("batch, kwargs", [(12, {}), (16, {"rhs_dilation": (2, 2)}), (16, {"feature_group_count": 2})])
def test_falls_back_to_lax_where_slicing_does_not_apply(batch, kwargs):
  """A batch that gives one slice, dilation or groups: exactly lax.conv_general_dilated, no custom gradient."""
  x = jnp.ones((batch, 15, 15, 8), jnp.float32)
  kernel = jnp.ones((3, 3, 8 // kwargs.get("feature_group_count", 1), 8), jnp.float32)
  fn = lambda f: lambda x, k: jnp.sum(f(x, k, (1, 1), "SAME", dimension_numbers=NHWC, **kwargs))  # noqa: E731
  ours = jax.make_jaxpr(jax.grad(fn(conv.sliced_conv_general_dilated), (0, 1)))(x, kernel)
  assert str(ours) == str(jax.make_jaxpr(jax.grad(fn(lax.conv_general_dilated), (0, 1)))(x, kernel))


@pytest.mark.parametrize("shapes, numbers", [
    (((16, 15, 8), (3, 8, 8)), ("NWC", "WIO", "NWC")),                            # 1-D
    (((16, 15, 15, 15, 8), (3, 3, 3, 8, 8)), ("NDHWC", "DHWIO", "NDHWC")),     # 3-D
    (((16, 8, 15, 15), (8, 8, 3, 3)), ("NCHW", "OIHW", "NCHW"))])            # another 2-D layout
def test_other_convolutions_are_lax_unchanged(shapes, numbers):
  x, kernel = (jnp.ones(shape, jnp.float32) for shape in shapes)
  spatial = len(shapes[0]) - 2
  fn = lambda f: lambda x, k: jnp.sum(f(x, k, (1,) * spatial, "SAME", dimension_numbers=numbers))  # noqa: E731
  ours = jax.make_jaxpr(jax.grad(fn(conv.sliced_conv_general_dilated), (0, 1)))(x, kernel)
  assert str(ours) == str(jax.make_jaxpr(jax.grad(fn(lax.conv_general_dilated), (0, 1)))(x, kernel))


def xla_hook(module):
  """The convolution XLA computes in a ``conv_module`` (under the oneDNN kernels' hook where they are in use)."""
  if module is nn.Conv:
    return lax.conv_general_dilated
  hook = module.keywords["conv_general_dilated"]
  return getattr(hook, "fallback", hook)


def conv_for(mesh, mode, model):
  """The convolution ``overfocus train`` builds ``model`` from: its platform preferences (models/spec.py)."""
  platform = models.platform_of(model)
  return platform_tuning.conv_module(mesh, mode, platform.cpu_convolution, platform.onednn)


def test_auto_tunes_one_cpu_device_only_and_off_never():
  one_cpu = parallel.make_mesh(CPU[:1])
  two_entries = jax.sharding.Mesh(np.array(CPU[:1] * 2), ("data",))  # takes the multi-device branch
  tuned = conv_for(one_cpu, "auto", "resnet")
  assert tuned.func is nn.Conv and list(tuned.keywords) == ["conv_general_dilated"]
  assert xla_hook(tuned) is conv.sliced_conv_general_dilated
  assert xla_hook(conv_for(one_cpu, "auto", "resnet18")) is conv.sliced_conv_general_dilated
  # measured slower sliced there: XLA's own convolution, under the oneDNN kernels where they are in use
  assert xla_hook(conv_for(one_cpu, "auto", "focus")) is lax.conv_general_dilated
  assert conv_for(one_cpu, "auto", "my_pkg.nets:TinyNet") is nn.Conv  # a plugin: no preferences
  onednn_models = [name for name, spec in models.REGISTRY.items() if spec.platform.onednn]
  assert onednn_models == ["resnet", "resnet18", "vgg16", "mnist_cnn", "attention", "corner"]
  for model in onednn_models:
    module = conv_for(one_cpu, "auto", model)
    assert (module is not nn.Conv and hasattr(module.keywords["conv_general_dilated"], "fallback")) == (
        onednn.available())
    # xla: the same tuning with XLA's own convolutions, never the kernels
    without = conv_for(one_cpu, "xla", model)
    assert without is nn.Conv or not hasattr(without.keywords["conv_general_dilated"], "fallback")
    assert xla_hook(without) is xla_hook(module)
  assert platform_tuning.compiler_options(one_cpu, "xla") == platform_tuning.compiler_options(one_cpu, "auto")
  for mesh, mode in ((one_cpu, "off"), (two_entries, "auto"), (two_entries, "off")):
    assert platform_tuning.conv_module(mesh, mode, "sliced", True) is nn.Conv
    assert platform_tuning.compiler_options(mesh, mode) is None
  with pytest.raises(ValueError, match="unknown platform tuning"):
    platform_tuning.applies(one_cpu, "fast")


def test_cpu_compiler_options_keep_the_step_the_same(tiny_model_setup):
  mesh = parallel.make_mesh(CPU[:1])
  options = platform_tuning.compiler_options(mesh, "auto")
  # Either the option this jaxlib knows, or none where it does not: never anything else.
  assert options in ({"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}, None)
  _, model, tx, schedule, state, batch = tiny_model_setup
  train_step = step_lib.make_train_step(model, tx, schedule=schedule)
  cpu = jax.sharding.SingleDeviceSharding(CPU[0])
  state, batch = jax.device_put((state, batch), cpu)
  tuned = platform_tuning.jit(train_step, mesh, "auto")(state, batch)
  plain = platform_tuning.jit(train_step, mesh, "off")(state, batch)
  chex.assert_trees_all_close(tuned, plain, rtol=1e-5, atol=1e-6)


def test_train_step_with_the_sliced_gradient_equals_xlas(tiny_model_setup):
  """Same parameters (so checkpoints move between the two), same step up to float rounding."""
  config, _, tx, schedule, _, _ = tiny_model_setup
  model = build_model(config, 10)
  sliced = build_model(config, 10, conv=platform_tuning.conv_module(parallel.make_mesh(CPU[:1]), "auto", "sliced"))
  state = state_lib.create_train_state(model, tx, seed=0, input_shape=(16, 16, 1))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(16, 16, 16, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  assert conv.slice_count(16, 16, 16, 8, 8) == 2  # the first block's convolutions do take the sliced path
  results = [jax.jit(step_lib.make_train_step(m, tx, schedule=schedule))(state, batch) for m in (model, sliced)]
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_bfloat16_partial_sums_keep_the_single_calls_precision():
  """32 bfloat16 slice gradients added in bfloat16 would err 5× more than XLA's single call (measured 1.2% vs
  0.25% here); added in float32 they stay close to it."""
  rng = np.random.default_rng(0)
  x, g = (jnp.asarray(rng.normal(size=(256, 15, 15, 8)), jnp.bfloat16) for _ in range(2))
  kernel_shape, strides, pads = (3, 3, 8, 8), (1, 1), conv.same_pads((15, 15), (3, 3), (1, 1))
  exact = conv.xla_kernel_grad(x.astype(jnp.float32), g.astype(jnp.float32), kernel_shape, strides, pads)
  error = lambda dw: float(jnp.max(jnp.abs(dw.astype(jnp.float32) - exact)) / jnp.max(jnp.abs(exact)))  # noqa
  sliced = conv.sliced_kernel_grad(x, g, kernel_shape, strides, pads, 32)
  assert sliced.dtype == jnp.bfloat16
  assert error(sliced) < 2 * error(conv.xla_kernel_grad(x, g, kernel_shape, strides, pads)) + 1e-3
