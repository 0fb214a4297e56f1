"""Orbax checkpoints in ``WORKDIR/checkpoints``: the whole :class:`TrainState` (params, optimizer state, batch
statistics, step, PRNG key, regularizer state) and the data stream's position (grain's iterator state, or
``{"on_device": true}`` for data on the device, whose position is the step), saved together per step.

A checkpoint that belongs to another model is reported as a :class:`UserError` and left untouched on disk. One
that cannot be read raises :class:`DamagedCheckpoint`; :func:`overfocus_jax.train.workdir.restore_or_init` then
moves it aside (:func:`move_aside`, into ``WORKDIR/checkpoints.damaged/``, never deleted) and resumes from the newest
checkpoint that restores. A save that fails (a full disk, a read-only workdir) raises
:class:`~overfocus_jax.errors.WriteError` naming the last complete checkpoint; orbax writes each checkpoint into a
temporary folder and renames it when complete, so the complete ones are never touched.
"""

import dataclasses
import datetime
import errno
import os
import pathlib
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from overfocus_jax.errors import UserError, WriteError

STATE, DATA = "state", "data"
# The regularizers' step counters (state["count"]): a checkpoint written before they kept one restores with the
# counter set to the train step, which is what it counts in a run of the CLI.
COUNT = "count"
# Checkpoints written before regularizers owned their state (0.2.x) kept SGDrop's EMA teacher in a TrainState field
# "extra"; those without a teacher stored nothing there and restore unchanged.
LEGACY_REGULARIZER_FIELD = "extra"
DAMAGED_DIRECTORY = "checkpoints.damaged"  # beside checkpoints/: where a checkpoint that cannot be read is moved


class DamagedCheckpoint(UserError):
  """A checkpoint whose files cannot be read: ``step`` and its ``path``."""

  def __init__(self, step: int, path: pathlib.Path):
    self.step, self.path = step, path
    super().__init__(f"checkpoint {step} in {path.parent} cannot be read (its files are damaged or incomplete)",
                     "move it away to resume from an earlier one, or start afresh in a new --workdir")


# The errors of a failed write, as the OS names them; orbax and TensorStore report them inside their own messages
# ("... No space left on device [os_error_code='28']").
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT)


def write_failure(error: BaseException) -> str | None:
  """What the OS said about a failed write inside ``error`` (e.g. "No space left on device"), or None if it is not
  one."""
  if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
    return error.strerror or os.strerror(error.errno)
  text = str(error)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code and int(code.group(1)) in WRITE_ERRNOS:
    return os.strerror(int(code.group(1)))
  for errnum in WRITE_ERRNOS:
    if os.strerror(errnum) in text:
      return os.strerror(errnum)
  return None


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` with two items: ``state`` (a pytree) and ``data`` (JSON)."""

  def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 3, read_only: bool = False):
    self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
    # Handlers named up front so item_metadata() can read shapes before any restore is tried.
    handlers = {STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()}
    # A read-only manager makes orbax warn three times that it will not save: expected here, so kept quiet.
    verbosity = absl_logging.get_verbosity()
    if read_only:
      absl_logging.set_verbosity(absl_logging.ERROR)
    try:
      options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                             enable_async_checkpointing=not read_only)
      self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    finally:
      absl_logging.set_verbosity(verbosity)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (after any save in flight has finished)."""
    self.manager.wait_until_finished()
    return self.manager.latest_step()

  def complete_steps(self) -> list[int]:
    """The steps of the complete checkpoints on disk, newest first (orbax renames a checkpoint's folder to its step
    when it is complete)."""
    if not self.directory.is_dir():
      return []
    return sorted((int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)

  def _write_error(self, error: BaseException, what: str) -> WriteError:
    reason = write_failure(error) or f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    try:  # a save still in flight may complete: the message names the last complete checkpoint
      self.manager.wait_until_finished()
    except Exception:  # noqa: BLE001 — it failed too: the one before it stays the last complete
      pass
    steps = self.complete_steps()
    last = f"the last complete checkpoint is step {steps[0]}" if steps else "no checkpoint is complete yet"
    return WriteError(f"{what} in {self.directory} failed ({reason}); {last}",
                      "free space there (or lower --config.keep_checkpoints, or pass a --workdir that is writable), "
                      "then rerun the same command: it resumes from the last complete checkpoint")

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts saving ``step``: returns once the arrays are copied off the devices (so the next step may overwrite
    them; orbax copies every array before returning unless ``save_device_host_concurrent_bytes`` is set, which this
    class must therefore not set — tests/test_dispatch.py checks it) and writes the files in the background. A save waits for the one before it; :meth:`wait` and
    :meth:`close` wait for the last. Until then the previous checkpoint is the latest complete one."""
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(data_state)))
    except Exception as e:  # noqa: BLE001 — orbax raises many types; a failed earlier save surfaces here too
      raise self._write_error(e, "saving a checkpoint") from None

  def wait(self) -> None:
    """Blocks until every save started so far is on disk."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_error(e, "saving a checkpoint") from None

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores ``(state, data_state)`` shaped and sharded like ``abstract_state`` (latest step by default)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f"no checkpoint in {self.directory}", "train first: overfocus train --workdir DIR")
    counters = self._check_compatible(abstract_state, step)
    legacy = self._is_legacy(step)
    target = _legacy_layout(abstract_state) if legacy else abstract_state
    if not counters and not legacy:
      target = dataclasses.replace(target, regularizer_state=_without_counts(target.regularizer_state))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                    data=ocp.args.JsonRestore()))
    except Exception:  # orbax/tensorstore raise many types for unreadable files: all mean "damaged"
      raise DamagedCheckpoint(step, self.directory / str(step)) from None
    if not all(_finite(leaf) for leaf in jax.tree.leaves(restored[STATE])):
      raise DamagedCheckpoint(step, self.directory / str(step))  # it read back, but not as numbers a run saves
    state = restored[STATE]
    if legacy:  # an empty "extra" held nothing: the regularizer starts from its (equally empty) initial state
      fields = {k: v for k, v in state.items() if k != LEGACY_REGULARIZER_FIELD}
      state = dataclasses.replace(abstract_state, **fields)
    if not counters:
      state = state.replace(regularizer_state=_with_counts(abstract_state.regularizer_state,
                                                           state.regularizer_state, state.step))
    return state, restored[DATA]

  def _is_legacy(self, step: int) -> bool:
    """Whether the checkpoint stores the train state in the layout from before regularizers owned their state."""
    try:
      metadata = self.manager.item_metadata(step)[STATE]
    except Exception:  # unreadable metadata: the restore itself reports the corruption
      return False
    return hasattr(metadata, "keys") and LEGACY_REGULARIZER_FIELD in metadata.keys()

  def _check_compatible(self, abstract_state: Any, step: int) -> bool:
    """Compares saved array shapes with the model's before restoring, for a clear message. Returns whether the
    checkpoint holds the regularizer's step counters (False: written before regularizers kept them)."""
    try:
      metadata = self.manager.item_metadata(step)[STATE]
    except Exception:  # unreadable metadata: restore() reports the corruption
      return True
    if metadata is None:
      return True
    saved = _shapes(metadata)
    if any(key == LEGACY_REGULARIZER_FIELD or key.startswith(LEGACY_REGULARIZER_FIELD + "/") for key in saved):
      raise UserError(f"checkpoint {self.directory / str(step)} was written before regularizers kept their own "
                      "state (its SGDrop EMA teacher is stored in the old layout, which this version does not read)",
                      "retrain in a new --workdir, or resume it with overfocus-jax 0.1.0 (commit a7a5f3f)")
    expected = _shapes(abstract_state)
    counters = [key for key in expected if key.startswith("regularizer_state/") and key.rsplit("/", 1)[-1] == COUNT]
    if counters and saved and not any(key in saved for key in counters):
      expected = {k: v for k, v in expected.items() if k not in counters}
      if saved == expected:
        return False
    if saved and saved != expected:
      missing = sorted(set(expected) ^ set(saved))
      differing = [k for k in expected if k in saved and saved[k] != expected[k]]
      detail = f"e.g. {missing[0]}" if missing else f"{differing[0]} is {saved[differing[0]]}, the model needs " \
          f"{expected[differing[0]]}"
      raise UserError(f"checkpoint {self.directory / str(step)} does not match this model/config ({detail})",
                      "use the config the run was started with, or a new --workdir")
    return True

  def move_aside(self, step: int) -> pathlib.Path:
    """Moves checkpoint ``step`` into ``WORKDIR/checkpoints.damaged/`` (never deletes it) and returns where."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = self.directory.parent / DAMAGED_DIRECTORY / f"{step}-{stamp}"
    target.parent.mkdir(exist_ok=True)
    os.replace(self.directory / str(step), target)
    self.manager.reload()  # its list of steps
    return target

  def close(self) -> None:
    """Finishes any save in flight, then releases the manager."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._write_error(e, "saving a checkpoint") from None
    finally:
      self.manager.close()


def has_checkpoint(workdir: str | pathlib.Path) -> bool:
  """Whether ``workdir`` holds a complete checkpoint; creates nothing."""
  if not (pathlib.Path(workdir).resolve() / "checkpoints").is_dir():
    return False
  checkpointer = Checkpointer(workdir, read_only=True)
  try:
    return checkpointer.latest_step() is not None
  finally:
    checkpointer.close()


def _shapes(tree: Any) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  # simple keys: a saved dataclass comes back as a dict, so ".params" and "['params']" must compare equal
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(leaf, "shape", np.shape(leaf)))
          for path, leaf in leaves}


def _finite(leaf) -> bool:
  """Whether a restored leaf holds finite numbers (this process's copy of it: the state is replicated)."""
  values = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
  return not np.issubdtype(values.dtype, np.floating) or bool(np.all(np.isfinite(values)))


def _without_counts(node: Any) -> Any:
  """A regularizer state with its step counters left out (the layout before regularizers kept them)."""
  if isinstance(node, dict):
    return {k: _without_counts(v) for k, v in node.items() if k != COUNT}
  if isinstance(node, tuple):
    return tuple(_without_counts(v) for v in node)
  return node


def _with_counts(template: Any, restored: Any, step: jax.Array) -> Any:
  """``restored`` (without counters) with every counter of ``template`` set to ``step``."""
  if isinstance(template, dict):
    return {k: step.astype(v.dtype) if k == COUNT else _with_counts(v, restored[k], step) for k, v in template.items()}
  if isinstance(template, tuple):
    return tuple(_with_counts(t, r, step) for t, r in zip(template, restored))
  return restored


def _legacy_layout(abstract_state: Any) -> dict:
  """The restore target for a checkpoint from before regularizers owned their state (see ``restore``)."""
  if not dataclasses.is_dataclass(abstract_state) or not any(
      f.name == "regularizer_state" for f in dataclasses.fields(abstract_state)):
    raise UserError("this checkpoint stores a train state in an old layout, and the state to restore is not one",
                    "restore it into a TrainState")
  fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)
            if f.name != "regularizer_state"}
  return {**fields, LEGACY_REGULARIZER_FIELD: {}}


def abstract_like(tree: Any, sharding=None) -> Any:
  """``ShapeDtypeStruct``s (with ``sharding``) for every array in ``tree``: the target of a restore."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)
