r"""Pretrained weights from ``.safetensors`` files (``config.init_from``, ``config.init_from_layout``).

A file is read with the ``safetensors`` package's numpy API, never unpickled: a ``.pth``/``.pt``/``.bin``/``.ckpt``
file is refused with the one command that converts it (:data:`CONVERSION`). Its state dict is mapped onto the model's
fresh variables by the model module's own function, found by name:

    <model module>.from_<layout>(state: dict[str, np.ndarray], variables) -> variables     layout ∈ LAYOUTS

(e.g. ``resnet_tv.from_torchvision``), which raises ``ValueError`` (e.g. :class:`Mismatch`) naming the first tensor
that does not fit.

For PyTorch state dicts whose tensors follow our module tree (:func:`torch_names`), :func:`load_torch_state` does the
whole mapping given the module-name rule:

    conv kernel   (O, I, kh, kw) → (kh, kw, I, O)        Linear weight  (out, in) → (in, out)
    BN / LayerNorm weight, bias → scale, bias              BN running_mean, running_var → batch_stats mean, var
    num_batches_tracked: ignored

The classifier (``head``) keeps its fresh initialisation, with one line on stderr, when the file's class count
differs from the model's or the file has no classifier. :func:`torch_state` is the inverse.
"""

import pathlib
import sys
from typing import Any, Callable

import jax
import numpy as np
from flax import traverse_util

from overfocus_jax.errors import UserError

LAYOUTS = ("torchvision", "timm")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")
IGNORED = ("num_batches_tracked",)  # BN's step counter: no counterpart here
CONVERSION = ("python -c \"import torch, safetensors.torch as s; s.save_file({k: v.contiguous() for k, v in "
              "torch.load('W.pth', map_location='cpu', weights_only=True).items()}, 'W.safetensors')\"")
# (collection, our leaf name) → PyTorch's tensor name within the module.
TORCH_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
                ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


class Mismatch(ValueError):
  """A state dict that does not fit the model; the message names the first tensor that differs."""


def save_safetensors(model: Any, variables: dict, path: str | pathlib.Path, layout: str) -> dict[str, np.ndarray]:
  """Writes ``variables`` to ``path`` as a PyTorch state dict in ``layout``'s tensor names (the model's
  ``to_<layout>``), what ``config.init_from`` reads back; returns the state dict. (torchvision's
  ``num_batches_tracked`` counters are not written: nothing reads them.)

  Raises:
    UserError: the model has no mapping for ``layout``.
  """
  convert = getattr(model_module(model), f"to_{layout}", None)
  if not callable(convert):
    has = tuple(name for name in LAYOUTS if callable(getattr(model_module(model), f"to_{name}", None)))
    raise UserError(f"model {model.name!r} has no mapping to {layout}-layout weights",
                    f"use --layout {has[0]}" if has else "export a resnet18_tv, resnet50_tv, vgg16 or convnext run")
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top  # only when exporting
  options = getattr(model_module(model), "export_options", lambda model: {})(model)
  state = convert(jax.tree.map(np.asarray, variables), **options)
  safetensors_numpy.save_file(state, str(path))
  return state


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """The tensors of a ``.safetensors`` file as numpy arrays; a pickle, a missing or an unreadable file is a
  :class:`UserError`."""
  path = pathlib.Path(path).expanduser()
  if path.suffix.lower() in PICKLE_SUFFIXES:
    converted = path.with_suffix(".safetensors")
    command = CONVERSION.replace("W.pth", str(path)).replace("W.safetensors", str(converted))
    raise UserError(f"init_from {str(path)!r} is a pickle ({path.suffix}), and pickles are never unpickled here",
                    f"convert it once with PyTorch: {command}, then pass --config.init_from={converted}")
  if not path.is_file():
    raise UserError(f"init_from {str(path)!r} not found", "pass --config.init_from=PATH to a .safetensors file")
  from safetensors import SafetensorError, numpy as safetensors_numpy  # imported here: only init_from reads files
  try:
    return safetensors_numpy.load_file(path)  # bfloat16 too: JAX's ml_dtypes gives numpy the type
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise UserError(f"init_from {str(path)!r} is not a readable safetensors file ({str(e).splitlines()[0][:200]})",
                    f"pass a .safetensors file (from a .pth: {CONVERSION})") from None


def model_module(model: Any):
  """The Python module that defines ``model``'s Flax module (where its ``from_<layout>`` functions live)."""
  return sys.modules[type(model.module).__module__]


def layouts_of(model: Any) -> tuple[str, ...]:
  """The layouts ``model`` has a mapping for."""
  return tuple(layout for layout in LAYOUTS if callable(getattr(model_module(model), f"from_{layout}", None)))


def converter(model: Any, layout: str) -> Callable[[dict, dict], dict]:
  """``model``'s ``from_<layout>`` function, or a :class:`UserError` naming the layouts it has."""
  convert = getattr(model_module(model), f"from_{layout}", None)
  if not callable(convert):
    has = layouts_of(model)
    raise UserError(f"model {model.name!r} has no mapping for {layout}-layout weights",
                    f"use --config.init_from_layout={has[0]}" if has else "leave --config.init_from empty for this "
                    "model (it has no pretrained-weight mapping)")
  return convert


def map_state(model: Any, state: dict[str, np.ndarray], variables: dict, layout: str, source: str) -> dict:
  """``state`` (read from ``source``, a path) on the model's fresh ``variables`` via its ``from_<layout>``; a tensor
  that does not fit is a one-line :class:`UserError` naming it."""
  try:
    return converter(model, layout)(state, variables)
  except ValueError as e:  # Mismatch, or another model's own ValueError for a tensor that does not fit
    raise UserError(f"init_from {source!r} does not fit model {model.name!r} ({layout} layout): {e}",
                    "pass weights of the same architecture, stem and input channels") from None


def load_pretrained(model: Any, variables: dict, path: str | pathlib.Path, layout: str) -> dict:
  """``path``'s weights in ``layout`` on the model's fresh ``variables`` (numpy); every problem is a one-line
  :class:`UserError`: a layout without a mapping, a pickle, a missing or unreadable file, the first tensor that does
  not fit."""
  converter(model, layout)
  return map_state(model, read_safetensors(path), variables, layout, str(path))


# ----------------------------------------------------------------------------- PyTorch-named state dicts


def to_torch_array(array: np.ndarray, leaf: str) -> np.ndarray:
  """Our leaf → PyTorch's layout: kernels (…spatial, in, out) → (out, in, …spatial); anything else as it is."""
  n = array.ndim
  return np.transpose(array, (n - 1, n - 2, *range(n - 2))) if leaf == "kernel" and n >= 2 else array


def from_torch_array(array: np.ndarray, leaf: str) -> np.ndarray:
  """The inverse of :func:`to_torch_array`: (out, in, …spatial) → (…spatial, in, out)."""
  n = array.ndim
  return np.transpose(array, (*range(2, n), 1, 0)) if leaf == "kernel" and n >= 2 else array


def torch_names(variables: dict, module_name: Callable[[tuple[str, ...]], str]) -> dict[str, tuple[str, ...]]:
  """PyTorch's tensor name → the flat key ``(collection, *module path, leaf)`` of our variables; ``module_name`` gives
  a module path's PyTorch name (e.g. ``resnet_tv.torchvision_module_name``)."""
  names = {}
  for key in traverse_util.flatten_dict(variables):
    collection, *path, leaf = key
    if (collection, leaf) not in TORCH_LEAVES:
      raise ValueError(f"no PyTorch name for the variable {'/'.join(key)}")
    names[f"{module_name(tuple(path))}.{TORCH_LEAVES[(collection, leaf)]}"] = key
  return names


def torch_state(variables: dict, module_name: Callable[[tuple[str, ...]], str]) -> dict[str, np.ndarray]:
  """``variables`` as a PyTorch state dict (contiguous numpy arrays, ready for ``safetensors.numpy.save_file``)."""
  flat = traverse_util.flatten_dict(variables)
  return {name: np.ascontiguousarray(to_torch_array(np.asarray(flat[key]), key[-1]))
          for name, key in torch_names(variables, module_name).items()}


def _shape(shape) -> str:
  return "(" + ", ".join(map(str, shape)) + ")"


def _head_is_fresh(state: dict, expected: dict[str, tuple], head: str) -> str | None:
  """Why the classifier (the tensors named ``head.*``) stays freshly initialised — the file has none, or one for
  another class count (only the leading dimension differs) — or None when it is loaded (or does not fit at all)."""
  names = [name for name in expected if name.startswith(head + ".")]
  if names and not any(name in state for name in names):
    return f"the file has no {head}"
  found = {name: state[name].shape for name in names if name in state}
  if len(found) == len(names) and any(found[n] != expected[n] for n in names) \
      and all(found[n][1:] == expected[n][1:] for n in names):
    return f"the file's {head} has {found[names[0]][0]} classes, the model {expected[names[0]][0]}"
  return None


def load_torch_state(state: dict[str, np.ndarray], variables: dict, module_name: Callable[[tuple[str, ...]], str],
                     head: str | None = None) -> dict:
  """A PyTorch state dict on ``variables`` (numpy, the dtypes of ``variables``), every tensor checked.

  ``head``: the classifier's PyTorch module name (e.g. ``fc``); it keeps the values in ``variables`` (one line on
  stderr) when the file has no classifier or one for another class count.

  Raises:
    Mismatch: the first expected tensor that is missing or has another shape, or a tensor the model has no place for.
  """
  flat = traverse_util.flatten_dict(variables)
  names = torch_names(variables, module_name)
  expected = {name: to_torch_array(np.asarray(flat[key]), key[-1]).shape for name, key in names.items()}
  fresh_reason = _head_is_fresh(state, expected, head) if head else None
  skipped = {name for name in names if fresh_reason and name.startswith(head + ".")}
  unexpected = [name for name in state if name not in names and name.rpartition(".")[2] not in IGNORED]
  loaded = dict(flat)
  for name, key in names.items():
    if name in skipped:
      continue
    if name not in state:
      hint = f"; the file's unmatched tensors begin {unexpected[:3]}" if unexpected else ""
      raise Mismatch(f"expected {name!r} of shape {_shape(expected[name])}, found no such tensor{hint}")
    if state[name].shape != expected[name]:
      raise Mismatch(f"expected {name!r} of shape {_shape(expected[name])}, found {_shape(state[name].shape)}")
    loaded[key] = from_torch_array(np.asarray(state[name]), key[-1]).astype(np.asarray(flat[key]).dtype)
  if unexpected:
    raise Mismatch(f"found {unexpected[0]!r} of shape {_shape(state[unexpected[0]].shape)}, which the model has no "
                   "place for")
  if fresh_reason:
    print(f"overfocus: init_from: {fresh_reason}: {head} is re-initialised", file=sys.stderr, flush=True)
  return {collection: {} for collection in variables} | traverse_util.unflatten_dict(loaded)
