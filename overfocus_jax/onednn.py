r"""oneDNN convolutions on the CPU: the kernels PyTorch's CPU step uses, called from the jitted step through XLA's FFI.

For y = conv(x, W) with x in NHWC, W in HWIO, stride s and padding (float32 or bfloat16, no dilation, one group),
the three products of a training step are each one oneDNN primitive (``kernels/onednn_conv.cc``):

    y              = conv(x, W)                                              OnednnConvForward
    ∂L/∂x          = conv_transpose(∂L/∂y, W)                                OnednnConvBackwardData
    ∂L/∂W[i,j,c,o] = Σ_{b,h,w} x_pad[b, s·h + i, s·w + j, c] · ∂L/∂y[b,h,w,o]  OnednnConvBackwardWeights

:func:`conv` is a ``jax.custom_vjp`` over them, the same maths as ``lax.conv_general_dilated`` to float rounding.
Why: jaxlib 0.10's CPU backend runs convolutions with YNNPACK (one core) or Eigen, and none of its flags routes them
to oneDNN (``python -m benchmarks.library_flags``). ``platform_tuning`` hands the models these convolutions on a
one-device CPU mesh; ``python -m benchmarks.onednn_models`` measures each model's step with and without them
(figures in ``docs/guide/performance.md``).

How it is built: on first use, ``g++`` compiles the kernel file against the oneDNN headers and library of the
``onednn-devel-cpu-gomp`` / ``onednn-cpu-gomp`` wheels (dependencies on Linux x86-64) and jaxlib's FFI headers, into
``$OVERFOCUS_ONEDNN_CACHE`` (default ``$XDG_CACHE_HOME/overfocus_jax/onednn``, i.e. ``~/.cache/...``), keyed by the
source and the versions; later processes load it (compiled once, then loaded). Where that cannot happen — no
compiler, no oneDNN wheel, another OS or CPU, ``OVERFOCUS_ONEDNN=off`` — :func:`available` is False,
:func:`status` says why, and the models keep the XLA convolutions (``overfocus bench`` reports which ran).
Like every custom VJP it differentiates in reverse mode only (``grad``, ``vjp``), not forward mode (``jvp``).
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from overfocus_jax.files import user_cache_directory

ENV = "OVERFOCUS_ONEDNN"             # "off" turns the oneDNN convolutions off
CACHE_ENV = "OVERFOCUS_ONEDNN_CACHE"  # where the built library is kept
SOURCE = pathlib.Path(__file__).parent / "kernels" / "onednn_conv.cc"
TARGETS = ("OnednnConvForward", "OnednnConvBackwardData", "OnednnConvBackwardWeights")
DTYPE_SUFFIX = {jnp.dtype(jnp.float32): "", jnp.dtype(jnp.bfloat16): "Bf16"}  # the kernels' operand types
DISTRIBUTIONS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")

_status = {"reason": "not tried yet"}
NHWC = ("NHWC", "HWIO", "NHWC")


def cache_directory() -> pathlib.Path:
  setting = os.environ.get(CACHE_ENV, "").strip()
  return pathlib.Path(setting).expanduser() if setting else user_cache_directory() / "onednn"


def _installed_file(distribution: str, name: str) -> pathlib.Path:
  """Where a file of an installed wheel lies (the oneDNN wheels put theirs under the environment's lib/, include/)."""
  files = importlib.metadata.distribution(distribution).files or []
  for entry in files:
    if entry.name == name and "oneapi" not in entry.parts:
      return pathlib.Path(entry.locate()).resolve()
  raise FileNotFoundError(f"{name} is not in the {distribution} wheel")


def _build() -> pathlib.Path:
  """Compiles the kernel library once per source and versions; returns its path (raises with the reason)."""
  if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
    raise RuntimeError(f"the oneDNN wheels are for Linux x86-64, not {platform.system()} {platform.machine()}")
  compiler = shutil.which(os.environ.get("CXX", "g++"))
  if compiler is None:
    raise RuntimeError("no C++ compiler (g++, or $CXX) to build the oneDNN kernels")
  try:
    library = _installed_file(DISTRIBUTIONS[0], "libdnnl.so")
    header = _installed_file(DISTRIBUTIONS[1], "dnnl.hpp")
  except importlib.metadata.PackageNotFoundError as e:
    raise RuntimeError(f"the oneDNN wheels are not installed ({e}): pip install {' '.join(DISTRIBUTIONS)}") from e
  versions = [jax.__version__, importlib.metadata.version("jaxlib")] + [
      importlib.metadata.version(d) for d in DISTRIBUTIONS]
  key = hashlib.sha256(SOURCE.read_bytes() + "|".join(versions + [compiler]).encode()).hexdigest()[:16]
  target = cache_directory() / key / "libonednn_conv.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    built = pathlib.Path(scratch) / target.name
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{header.parent}",
               f"-I{jax.ffi.include_dir()}", str(SOURCE), f"-L{library.parent}", "-ldnnl",
               f"-Wl,-rpath,{library.parent}", "-o", str(built)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"{compiler} failed to build the oneDNN kernels: "
                         f"{(done.stderr.strip().splitlines() or ['exit %d' % done.returncode])[0]}")
    os.replace(built, target)  # atomic: two processes building at once both end with a whole file
  return target


@functools.cache
def available() -> bool:
  """Whether the oneDNN convolutions are built, loaded and registered with XLA:CPU in this process."""
  if os.environ.get(ENV, "").strip().lower() == "off":
    _status["reason"] = f"off (${ENV}=off)"
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
    for name in TARGETS:
      for suffix in DTYPE_SUFFIX.values():
        jax.ffi.register_ffi_target(name + suffix, jax.ffi.pycapsule(getattr(library, name + suffix)), platform="cpu")
  except (RuntimeError, OSError, AttributeError) as e:
    _status["reason"] = str(e)
    return False
  _status["reason"] = "onednn"
  return True


def status() -> str:
  """``"onednn"`` when the kernels are in use, else why not."""
  available()
  return _status["reason"]


def _attributes(strides, pads) -> dict:
  (top, bottom), (left, right) = pads
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]), pad_top=np.int64(top),
              pad_bottom=np.int64(bottom), pad_left=np.int64(left), pad_right=np.int64(right))


def output_shape(x_shape, kernel_shape, strides, pads) -> tuple:
  """NHWC shape of conv(x, W): OH = ⌊(H + pad_top + pad_bottom − KH) / s⌋ + 1, the same for the width."""
  n, height, width, _ = x_shape
  kh, kw, _, out = kernel_shape
  return (n, (height + sum(pads[0]) - kh) // strides[0] + 1, (width + sum(pads[1]) - kw) // strides[1] + 1, out)


def _call(target, shape, *operands, strides, pads):
  # vmap runs the kernel once per mapped slice ("sequential"): correct for any batching, and the package's own
  # code never vmaps through a convolution.
  dtype = operands[0].dtype
  return jax.ffi.ffi_call(target + DTYPE_SUFFIX[jnp.dtype(dtype)], jax.ShapeDtypeStruct(shape, dtype),
                          vmap_method="sequential")(*operands, **_attributes(strides, pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, kernel, strides: tuple, pads: tuple):
  """conv(x, W) through oneDNN: x NHWC, W HWIO, both float32 or both bfloat16 (accumulated in float32, rounded
  once), ``strides`` (s_h, s_w), ``pads`` ((top, bottom), (left, right)); call only when :func:`available`."""
  return _call(TARGETS[0], output_shape(x.shape, kernel.shape, strides, pads), x, kernel, strides=strides, pads=pads)


def _conv_fwd(x, kernel, strides, pads):
  return conv(x, kernel, strides, pads), (x, kernel)


def _conv_bwd(strides, pads, residuals, g):
  x, kernel = residuals
  dx = _call(TARGETS[1], x.shape, g, kernel, strides=strides, pads=pads)
  dkernel = _call(TARGETS[2], kernel.shape, x, g, strides=strides, pads=pads)
  return dx, dkernel


conv.defvjp(_conv_fwd, _conv_bwd)


def is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                  batch_group_count) -> bool:
  """Whether a ``conv_general_dilated`` call is a 2-D NHWC/HWIO convolution without dilation or groups."""
  undilated = all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
  layout = lhs.ndim == rhs.ndim == 4 and dimension_numbers is not None and (
      tuple(dimension_numbers) == NHWC
      or dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
  return undilated and layout and feature_group_count == 1 and batch_group_count == 1


def explicit_pads(lhs, rhs, strides, padding):
  """``padding`` ("SAME", "VALID", ... or pairs) of an NHWC/HWIO convolution as (low, high) integer pairs."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def takes(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
          precision, preferred_element_type, out_sharding) -> bool:
  """Whether a ``conv_general_dilated`` call is one the kernels compute: 2-D NHWC/HWIO, both operands float32 or
  both bfloat16, no dilation, groups, precision, output type or sharding asked for."""
  return (is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                        batch_group_count)
          and lhs.dtype == rhs.dtype and jnp.dtype(lhs.dtype) in DTYPE_SUFFIX
          and precision is None and preferred_element_type is None and out_sharding is None)


def make_conv_general_dilated(fallback=lax.conv_general_dilated):
  """A ``lax.conv_general_dilated`` (flax's ``nn.Conv(conv_general_dilated=...)`` hook) that sends the calls
  :func:`takes` to oneDNN and every other one to ``fallback``."""

  def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                           dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                           preferred_element_type=None, out_sharding=None):
    if not takes(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
                 precision, preferred_element_type, out_sharding):
      return fallback(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                      feature_group_count, batch_group_count, precision, preferred_element_type,
                      out_sharding=out_sharding)
    strides = tuple(int(s) for s in window_strides)
    return conv(lhs, rhs, strides, explicit_pads(lhs, rhs, strides, padding))

  conv_general_dilated.fallback = fallback  # what the other calls get (tests and benchmarks read it)
  return conv_general_dilated
