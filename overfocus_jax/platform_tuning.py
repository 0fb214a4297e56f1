r"""Platform tuning: what makes the train step faster on one platform without changing its maths — one module,
one switch (``config.platform_tuning``: ``auto`` | ``xla`` | ``off``).

``auto`` applies, on a one-device CPU mesh only, the four changes below; ``xla`` the first three (XLA's own
convolutions, which reproduce to the last digit the results recorded with them); ``off`` (and every other mesh:
GPUs, TPUs, several devices) compiles plain XLA. All keep the results equal to float rounding. Each change was found
by profiling (``python -m benchmarks.profile_cpu``); what each gains is measured by the commands named with it, and
the figures are in ``docs/guide/performance.md`` and ``docs/results/performance.md``.

1. **Compiler option.** jaxlib 0.10's CPU backend sends convolutions to YNNPACK, which runs them on one core;
   Eigen's convolutions use every core. :data:`CPU_COMPILER_OPTIONS` keeps YNNPACK for reductions only; jaxlibs that
   do not know the option compile without it. Not on several CPU devices: there Eigen's convolutions share the
   intra-op thread pool with device threads that block in the all-reduce rendezvous, and under load a device can
   miss XLA's collective deadline.

2. **Sliced weight gradients.** For y = conv(x, W) with an NHWC input, an HWIO kernel, stride s and padding, the
   kernel gradient is a sum over the batch:

       ∂L/∂W[i, j, c, o] = Σ_b Σ_{h,w} x_pad[b, s·h + i, s·w + j, c] · g[b, h, w, o],        g = ∂L/∂y
                         = Σ_k  ∂L/∂W computed on the k-th slice of the batch alone

   XLA's transpose rule computes it as one convolution whose window is the whole feature map and whose
   contraction runs over the batch. With jaxlib 0.10's CPU (Eigen) convolutions that one call is slow when the
   layer is narrow and its maps are large, and summing over slices of :data:`EXAMPLES_PER_SLICE` examples is
   faster there; for the stem, for wide layers and on small maps it is not (``docs/results/performance.md``,
   "Weight gradients summed over batch slices"). :func:`sliced_conv_general_dilated` keeps XLA's forward pass and input gradient and only
   reorders that sum, in the layers where :func:`slice_count` says it pays; :func:`conv_module` hands the models an
   ``nn.Conv`` that uses it. It is a custom VJP: reverse-mode autodiff only (``grad``, ``vjp``), no forward mode
   (``jvp``, ``jacfwd``) through a model built with it. On a GPU the weight gradient is one cuDNN call, and slices
   would only add launches.

3. **Depthwise convolutions as shifted sums** (ConvNeXt's 7×7, one group per channel). XLA:CPU runs a
   convolution with ``feature_group_count = C`` slowly. Written out, the same sums are elementwise work that XLA
   fuses:

       y[b, h, w, c]  = Σ_{i,j} x_pad[b, h + i, w + j, c] · K[i, j, c]
       ∂L/∂x          = the same sum over g padded by (k − 1 − low, k − 1 − high), K flipped
       ∂L/∂K[i, j, c] = Σ_{b,h,w} x_pad[b, h + i, w + j, c] · g[b, h, w, c]      (one reduction per offset,
                                                                                  channels major)

   each accumulated in float32. :func:`shifted_depthwise_conv_general_dilated` takes that path for stride-1 NHWC
   depthwise convolutions and is ``lax.conv_general_dilated`` otherwise. ``overfocus bench --config
   experiments/configs/convnext.py`` at ``--config.platform_tuning=auto`` and ``off`` measures what it gains on
   ConvNeXt-atto's train step. A custom VJP too: reverse mode only.

4. **oneDNN convolutions** (:mod:`overfocus_jax.onednn`): for the models that prefer them (``Platform.onednn``),
   every float32 or bfloat16 NHWC convolution — forward, input gradient and weight gradient — is one call of
   oneDNN's kernel (the library PyTorch's CPU step uses) through XLA's FFI, with points 2 and 3 as the fallback for
   everything else (mixed or other dtypes, dilation, groups). ``python -m benchmarks.onednn_models [--dtype
   bfloat16]`` measures each shipped model's step with and without them. Where the kernels cannot be built (no C++
   compiler or oneDNN wheel, another OS or CPU, ``OVERFOCUS_ONEDNN=off``), and at ``platform_tuning=xla``, the
   models keep points 1–3; ``overfocus bench`` reports which ran (``cpu_convolutions``). A custom VJP: reverse mode
   only.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from overfocus_jax import onednn
from overfocus_jax.onednn import NHWC, explicit_pads, is_plain_nhwc  # noqa: F401  (the layout tests, shared)

MODES = ("auto", "xla", "off")  # xla: auto without the oneDNN kernels (point 4), XLA's convolutions only
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def applies(mesh, mode: str) -> bool:
  """Whether ``mode`` tunes this mesh: ``auto`` or ``xla`` on a one-device CPU mesh."""
  if mode not in MODES:
    raise ValueError(f"unknown platform tuning {mode=}; use one of {MODES}")
  return mode != "off" and mesh.devices.size == 1 and mesh.devices.flat[0].platform == "cpu"


@functools.cache
def _cpu_options_supported() -> bool:
  """The option is experimental: probe it once, and compile without it where this jaxlib does not know it."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS)(jnp.ones((1,), jnp.float32))
    return True
  except Exception:  # pylint: disable=broad-except  # an unknown option fails compilation (INVALID_ARGUMENT)
    return False


def compiler_options(mesh, mode: str) -> dict | None:
  """Per-``jax.jit`` XLA options for the mesh (``None``: XLA's defaults)."""
  if applies(mesh, mode) and _cpu_options_supported():
    return dict(CPU_COMPILER_OPTIONS)
  return None


def jit(fun, mesh, mode: str, **jit_kwargs):
  """``jax.jit(fun, **jit_kwargs)`` with :func:`compiler_options` for the mesh."""
  return jax.jit(fun, compiler_options=compiler_options(mesh, mode), **jit_kwargs)


def conv_module(mesh, mode: str, cpu_convolution: str = "xla", onednn_convolutions: bool = False):
  """The ``nn.Conv`` a model builds its convolutions from on this mesh (a flax ``ModuleDef``), from the model's
  platform preferences (:class:`overfocus_jax.models.spec.Platform`): ``cpu_convolution`` ``xla``, ``sliced``
  (point 2) or ``depthwise`` (point 3), and ``onednn_convolutions`` (point 4, under ``mode="auto"``)."""
  if not applies(mesh, mode):
    return nn.Conv
  hook = lax.conv_general_dilated
  if cpu_convolution == "sliced":
    hook = sliced_conv_general_dilated
  elif cpu_convolution == "depthwise":
    hook = shifted_depthwise_conv_general_dilated
  if mode == "auto" and onednn_convolutions:
    if onednn.available():  # builds the kernels on first use
      hook = onednn.make_conv_general_dilated(fallback=hook)
  return nn.Conv if hook is lax.conv_general_dilated else functools.partial(nn.Conv, conv_general_dilated=hook)

# The rule below was read off benchmarks/weight_grad_slices.py (at commit 173b1d8; its table is in
# docs/results/performance.md) on a 2-core CPU with 1-2 MiB of L2 cache per core.
EXAMPLES_PER_SLICE = 8        # the best slice size there (16 is close)
MAX_SLICES = 32               # larger batches get larger slices, not more calls
MIN_IN_FEATURES = 8           # a stem's weight gradient (1 or 3 input channels) is too small to gain
MAX_CHANNEL_PRODUCT = 64 * 64  # wider layers lose: their single call is already efficient
MAX_SLICE_INPUT = 256 * 1024  # floats of input per slice (1 MiB): larger slices lose the cache's benefit
MIN_MAP_SIZE = 14 * 14        # on smaller maps (the 8×8 digits) the single call is faster


def slice_count(batch: int, height: int, width: int, in_features: int, out_features: int) -> int:
  """How many batch slices a layer's weight gradient is summed over (1: XLA's own single call).

  ``batch, height, width, in_features`` describe the layer's input, ``out_features`` its output channels.
  """
  slices = min(batch // EXAMPLES_PER_SLICE, MAX_SLICES)
  if (slices < 2 or batch % slices or in_features < MIN_IN_FEATURES or height * width < MIN_MAP_SIZE
      or in_features * out_features > MAX_CHANNEL_PRODUCT
      or (batch // slices) * height * width * in_features > MAX_SLICE_INPUT):
    return 1
  return slices


def same_pads(spatial, kernel, strides):
  """XLA's "SAME" padding as explicit (low, high) pairs."""
  return tuple(lax.padtype_to_pads(tuple(spatial), tuple(kernel), tuple(strides), "SAME"))


def _conv(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=NHWC)


def xla_kernel_grad(x, g, kernel_shape, strides, pads):
  """XLA's own ∂L/∂W of conv(x, ·) at output cotangent g (the kernel's value does not enter it)."""
  kernel = jnp.zeros(kernel_shape, x.dtype)
  return jax.vjp(lambda k: _conv(x, k, strides, pads), kernel)[1](g)[0]


def sliced_kernel_grad(x, g, kernel_shape, strides, pads, slices: int):
  """∂L/∂W as the sum of XLA's ∂L/∂W over ``slices`` equal slices of the batch (must divide it)."""
  if slices == 1:
    return xla_kernel_grad(x, g, kernel_shape, strides, pads)
  size = x.shape[0] // slices
  # Independent calls, unrolled: XLA's runtime can run several of them at once on several cores.
  parts = [xla_kernel_grad(x[k * size:(k + 1) * size], g[k * size:(k + 1) * size], kernel_shape, strides, pads)
           for k in range(slices)]
  # Partial sums in float32 at least: adding 16-32 bfloat16 parts would lose precision a single call keeps.
  total = functools.reduce(jnp.add, [p.astype(jnp.promote_types(p.dtype, jnp.float32)) for p in parts])
  return total.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _sliced_conv(x, kernel, strides, pads, slices):
  return _conv(x, kernel, strides, pads)


def _sliced_conv_fwd(x, kernel, strides, pads, slices):
  return _conv(x, kernel, strides, pads), (x, kernel)


def _sliced_conv_bwd(strides, pads, slices, residuals, g):
  x, kernel = residuals
  dx = jax.vjp(lambda x: _conv(x, kernel, strides, pads), x)[1](g)[0]  # XLA's own input gradient
  return dx, sliced_kernel_grad(x, g, kernel.shape, strides, pads, slices)


_sliced_conv.defvjp(_sliced_conv_fwd, _sliced_conv_bwd)


def sliced_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, out_sharding=None):
  """``lax.conv_general_dilated`` (flax's ``nn.Conv(conv_general_dilated=...)`` hook) with a sliced weight gradient.

  2-D NHWC/HWIO convolutions whose :func:`slice_count` is above 1 take the sliced path; anything else (1-D or 3-D,
  dilation, groups, other layouts, precisions or output shardings) is ``lax.conv_general_dilated`` unchanged.
  Like every ``jax.custom_vjp``, the sliced path supports reverse-mode differentiation (``grad``, ``vjp``, and
  forward-over-reverse Hessians) but not forward mode (``jvp``, ``jacfwd``, ``linearize``).
  """
  plain = is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                        batch_group_count)
  slices = slice_count(*lhs.shape, rhs.shape[3]) if plain else 1
  if not (plain and slices > 1 and precision is None and preferred_element_type is None and out_sharding is None):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type, out_sharding=out_sharding)
  strides = tuple(int(s) for s in window_strides)
  return _sliced_conv(lhs, rhs, strides, explicit_pads(lhs, rhs, strides, padding), slices)


# ----------------------------------------------------------------------------- depthwise convolutions (point 3)


def _shifted_sum(x_pad, kernel, out_hw):
  """Σ_ij x_pad[:, i:i+H, j:j+W, :] · kernel[i, j, 0, :] over the (kh, kw, 1, C) kernel, accumulated in float32."""
  height, width = out_hw
  acc = jnp.zeros((x_pad.shape[0], height, width, x_pad.shape[3]), jnp.promote_types(x_pad.dtype, jnp.float32))
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      acc = acc + (x_pad[:, i:i + height, j:j + width, :] * kernel[i, j, 0]).astype(acc.dtype)
  return acc


def _pad_hw(x, pads):
  return jnp.pad(x, ((0, 0), *pads, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise(x, kernel, pads):
  out_hw = tuple(side + lo + hi - k + 1 for side, (lo, hi), k in zip(x.shape[1:3], pads, kernel.shape[:2]))
  return _shifted_sum(_pad_hw(x, pads), kernel, out_hw).astype(x.dtype)


def _depthwise_fwd(x, kernel, pads):
  return _depthwise(x, kernel, pads), (x, kernel)


def _depthwise_bwd(pads, residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  back = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), pads))
  dx = _shifted_sum(_pad_hw(g, back), kernel[::-1, ::-1], x.shape[1:3]).astype(x.dtype)
  # Channels major, so that each offset's sum over (batch, rows, columns) reduces minor axes (XLA:CPU reduces those
  # faster than major ones); one loop step per offset keeps the compiled program small.
  x_t, g_t = jnp.transpose(_pad_hw(x, pads), (3, 0, 1, 2)), jnp.transpose(g, (3, 0, 1, 2))
  acc = jnp.promote_types(x.dtype, jnp.float32)

  def offset(t, dk):
    window = lax.dynamic_slice(x_t, (0, 0, t // kw, t % kw), (*x_t.shape[:2], *g.shape[1:3]))
    return dk.at[t].set(jnp.sum((window * g_t).astype(acc), axis=(1, 2, 3)))

  dk = lax.fori_loop(0, kh * kw, offset, jnp.zeros((kh * kw, x.shape[3]), acc))
  return dx, dk.reshape(kh, kw, 1, -1).astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def is_depthwise_nhwc(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                      batch_group_count) -> bool:
  """Whether a ``conv_general_dilated`` call is a stride-1, undilated 2-D NHWC/HWIO convolution with one group per
  input channel and one output channel per group (a (kh, kw, 1, C) kernel)."""
  layout = is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, 1, batch_group_count)
  return (layout and feature_group_count == lhs.shape[3] == rhs.shape[3] and rhs.shape[2] == 1
          and all(int(s) == 1 for s in window_strides))


def shifted_depthwise_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                                           dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                                           precision=None, preferred_element_type=None, out_sharding=None):
  """``lax.conv_general_dilated`` (flax's ``nn.Conv(conv_general_dilated=...)`` hook) with depthwise convolutions
  (:func:`is_depthwise_nhwc`) as shifted sums (point 3 of the module docstring); any other call unchanged."""
  if not (is_depthwise_nhwc(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                            feature_group_count, batch_group_count)
          and precision is None and preferred_element_type is None and out_sharding is None):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, batch_group_count, precision,
                                    preferred_element_type, out_sharding=out_sharding)
  return _depthwise(lhs, rhs, explicit_pads(lhs, rhs, (1, 1), padding))
