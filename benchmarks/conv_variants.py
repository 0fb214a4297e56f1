"""Drop-in replacements for ``lax.conv_general_dilated`` that compute the *same* convolution and the same
gradients, with another formulation of the weight gradient (the part XLA CPU is slow at).

    conv = conv_with_dw("chunks4")
    y = conv(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))   # as lax's
    nn.Conv(features, (3, 3), conv_general_dilated=conv)                              # as flax's hook

The forward pass and the input gradient are XLA's own; only dL/dkernel changes, as a sum of the same products in
another order (so it agrees to float rounding). Formulations of the weight gradient:

  xla        XLA's own transpose rule: one convolution with the whole H×W map as its window (the baseline).
  chunksK    XLA's rule applied to K slices of the batch, summed: K independent, smaller convolutions that the
             thunk runtime can run concurrently.
  shift      one matmul per kernel tap: dW[i, j] = X[:, i::s, j::s]ᵀ · G over the (padded) input, contracting
             batch × H × W (kh·kw dots, no transposes of the activations).
  im2col     the kh·kw shifted copies of the input concatenated on the channel axis, then one matmul.

``impl`` may also split the forward convolution and the input gradient over batch slices (``fwdK``, ``dxK``:
K independent convolutions whose results are concatenated — exactly the same numbers, since every example is
convolved on its own); combine with ``+``, e.g. ``"fwd2+dx2+chunks16"``.

Supports what the package's models use: NHWC inputs, HWIO kernels, any stride, "SAME"/"VALID"/explicit padding,
no dilation, one feature group. Anything else falls back to ``lax.conv_general_dilated`` unchanged.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from overfocus_jax.models import conv

NHWC = conv.NHWC


def _forward(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=NHWC)


def _dw_xla(x, g, kernel_shape, strides, pads):
  return conv.xla_kernel_grad(x, g, kernel_shape, strides, pads)


def _dw_chunks(x, g, kernel_shape, strides, pads, chunks):
  """The package's sliced weight gradient (overfocus_jax/models/conv.py) with a fixed slice count."""
  if x.shape[0] % chunks:
    return _dw_xla(x, g, kernel_shape, strides, pads)
  return conv.sliced_kernel_grad(x, g, kernel_shape, strides, pads, chunks)


def _taps(x, g, kernel_shape, strides, pads):
  """The input window seen by each kernel tap (i, j): (B, Ho, Wo, C) slices of the padded input."""
  kh, kw = kernel_shape[:2]
  (sh, sw), ho, wo = strides, g.shape[1], g.shape[2]
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  return [[lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, xp.shape[3]),
                     (1, sh, sw, 1)) for j in range(kw)] for i in range(kh)]


def _dw_shift(x, g, kernel_shape, strides, pads):
  o = g.shape[-1]
  g2 = g.reshape(-1, o)
  taps = _taps(x, g, kernel_shape, strides, pads)
  contract = (((0,), (0,)), ((), ()))
  rows = [jnp.stack([lax.dot_general(t.reshape(-1, t.shape[-1]), g2, contract) for t in row]) for row in taps]
  return jnp.stack(rows).astype(x.dtype)


def _dw_im2col(x, g, kernel_shape, strides, pads):
  kh, kw, c, o = kernel_shape
  taps = [t for row in _taps(x, g, kernel_shape, strides, pads) for t in row]
  patches = jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * c)
  dw = lax.dot_general(patches, g.reshape(-1, o), (((0,), (0,)), ((), ())))
  return dw.reshape(kh, kw, c, o).astype(x.dtype)


def _batch_split(fn, k, *arrays):
  """fn applied to k slices of the batch, concatenated back (per-example ops only)."""
  b = arrays[0].shape[0]
  if k <= 1 or b % k:
    return fn(*arrays)
  n = b // k
  return jnp.concatenate([fn(*(a[i * n:(i + 1) * n] for a in arrays)) for i in range(k)], axis=0)


def _parse(impl: str):
  """'fwd2+dx2+chunks16' → (2, 2, 'chunks16')."""
  fwd_k, dx_k, dw = 1, 1, "xla"
  for part in impl.split("+"):
    if part.startswith("fwd"):
      fwd_k = int(part[3:])
    elif part.startswith("dx"):
      dx_k = int(part[2:])
    else:
      dw = part
  return fwd_k, dx_k, dw


def _dw_function(impl: str):
  if impl == "xla":
    return _dw_xla
  if impl.startswith("chunks"):
    return functools.partial(_dw_chunks, chunks=int(impl[len("chunks"):]))
  if impl == "shift":
    return _dw_shift
  if impl == "im2col":
    return _dw_im2col
  raise ValueError(f"unknown weight-gradient formulation {impl!r}")


@functools.lru_cache(maxsize=None)
def _custom_conv(impl: str):
  fwd_k, dx_k, dw = _parse(impl)
  dw_fn = _dw_function(dw)

  def forward(x, kernel, strides, pads):
    return _batch_split(lambda x: _forward(x, kernel, strides, pads), fwd_k, x)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def conv(x, kernel, strides, pads):
    return forward(x, kernel, strides, pads)

  def fwd(x, kernel, strides, pads):
    return forward(x, kernel, strides, pads), (x, kernel)

  def input_grad(x, g, kernel, strides, pads):
    return jax.vjp(lambda x: _forward(x, kernel, strides, pads), x)[1](g)[0]

  def bwd(strides, pads, residuals, g):
    x, kernel = residuals
    dx = _batch_split(lambda x, g: input_grad(x, g, kernel, strides, pads), dx_k, x, g)
    return dx, dw_fn(x, g, kernel.shape, strides, pads)

  conv.defvjp(fwd, bwd)
  return conv


def conv_with_dw(impl: str):
  """A ``lax.conv_general_dilated``-compatible function whose kernel gradient uses formulation ``impl``."""

  def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                           dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                           preferred_element_type=None):
    if not (conv.is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                               batch_group_count) and preferred_element_type is None):
      return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, batch_group_count, precision,
                                      preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    pads = conv.explicit_pads(lhs, rhs, strides, padding)
    return _custom_conv(impl)(lhs, rhs, strides, pads)

  return conv_general_dilated
