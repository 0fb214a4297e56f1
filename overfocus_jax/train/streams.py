"""Where the train loop's batches come from: the dataset in device memory, or the grain pipeline on the host.

``config.data_on_device`` picks (``auto``: on when the data fits, :func:`overfocus_jax.data.on_device.fits`):

- :class:`DeviceStream`: uint8 images and labels copied to the devices once; each step's shuffle, crop, flip and
  normalization run inside the compiled chunk. Its position is the train step, so its checkpointed state is only
  a marker (``{"on_device": true}``).
- :class:`HostStream`: the grain pipeline (:func:`overfocus_jax.data.pipeline.make_train_iterator`, uint8 batches)
  stacked K at a time and sent to the devices while the previous chunk runs; normalized on the device. On several
  processes each reads only its own rows of every batch. Its checkpointed state is grain's iterator state, as
  before chunks existed (every process is at the same position).

``chunk_data(first_step, num_steps)`` is what one compiled chunk (:mod:`.dispatch`) reads; ``abstract_data(K)`` its
shapes, to compile ahead of time.

A run resumes on the stream its checkpoint was written with: ``auto`` follows the checkpoint, and an explicit
``on``/``off`` that disagrees with it is an error (the two streams draw different orders from one seed).
"""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from overfocus_jax import parallel
from overfocus_jax.models import platform_of
from overfocus_jax.data import augmentation, balanced, on_device, pipeline
from overfocus_jax.errors import UserError
from overfocus_jax.train.dispatch import Feed, device_feed, host_feed
from overfocus_jax.train.experiment import Experiment

DEVICE_MARKER = "on_device"


def saved_on_device(data_state: dict | None) -> bool | None:
  """Which stream a checkpoint's data state comes from (None: no checkpoint)."""
  if data_state is None:
    return None
  return bool(data_state.get(DEVICE_MARKER, False))


def choose_on_device(exp: Experiment, data_state: dict | None) -> bool:
  """The stream of this run: the config's choice, or the checkpoint's for ``auto``; a mismatch is an error."""
  mode = exp.config.data_on_device
  saved = saved_on_device(data_state)
  if saved is not None and mode == "auto":
    return saved
  chosen = on_device.resolve(mode, exp.dataset, exp.mesh, platform_of(exp.config.model).data_on_device)
  if saved is not None and saved != chosen:
    written = "on" if saved else "off"
    raise UserError(f"the checkpoint was written with data_on_device={written} and this run asks for {mode}",
                    f"resume with --config.data_on_device={written} (or auto), or train in a new --workdir")
  return chosen


def augmentation_policy(exp: Experiment) -> augmentation.Policy:
  """``config.augmentation`` for the experiment's images (the mirror for natural images only)."""
  return augmentation.make_policy(exp.dataset.image_shape, exp.dataset.natural_images, exp.config.augmentation)


class DeviceStream:
  """The training split in device memory; every batch is built inside the compiled chunk."""

  resident = True

  def __init__(self, exp: Experiment):
    config = exp.config
    self.sharding = parallel.replicated(exp.mesh)
    self.split = on_device.put_split(exp.dataset.train, self.sharding)
    self.spec = on_device.stream_spec(exp.dataset, batch_size=config.batch_size, seed=config.seed,
                                      augment=config.augment, layout=exp.layout,
                                      augmentation=augmentation_policy(exp))
    self.feed: Feed = device_feed(self.spec)
    shuffle_key, count, layout = on_device.stream_keys(config.seed)[0], len(exp.dataset.train), exp.layout
    order = ((lambda epoch: balanced.device_epoch_order(layout, shuffle_key, epoch)) if layout is not None else
             (lambda epoch: on_device.epoch_order(shuffle_key, epoch, count)))
    self._order = jax.jit(order, out_shardings=self.sharding)
    self._epoch, self._epoch_order = None, None

  def restore(self, data_state: dict | None) -> None:
    """Nothing to restore: the stream's position is the train step."""

  def chunk_data(self, first_step: int, num_steps: int) -> dict:
    """The split and the order of the chunk's epoch (computed once per epoch, on the device)."""
    epoch = first_step // self.spec.steps_per_epoch
    if epoch != self._epoch:
      self._epoch, self._epoch_order = epoch, self._order(np.int32(epoch))
    return {"split": self.split, "order": self._epoch_order}

  def abstract_data(self, num_steps: int):
    data = {"split": self.split, "order": jax.eval_shape(self._order, np.int32(0))}  # shapes only: nothing runs
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.sharding), data)

  def state(self) -> dict:
    return {DEVICE_MARKER: True}

  def close(self) -> None:
    """Nothing runs beside the devices."""


class HostStream:
  """K uint8 batches of the grain pipeline per chunk, stacked on a leading axis and sharded on the batch axis."""

  resident = False

  def __init__(self, exp: Experiment):
    config, dataset = exp.config, exp.dataset
    # Each process reads, augments and sends only the rows of every global batch that its devices hold.
    rows = parallel.process_rows(config.batch_size, exp.mesh)
    self.iterator = pipeline.make_train_iterator(dataset, batch_size=config.batch_size, seed=config.seed,
                                                 augment=config.augment, normalized=False, rows=rows,
                                                 workers=config.data_workers, balanced=exp.layout,
                                                 augmentation=augmentation_policy(exp))
    self.batch_size = config.batch_size
    self.local_batch_size = rows.stop - rows.start
    self.image_shape = tuple(dataset.image_shape)
    self.feed: Feed = host_feed(dataset.mean, dataset.std)
    self.sharding = NamedSharding(exp.mesh, P(None, parallel.DATA_AXIS))

  def restore(self, data_state: dict | None) -> None:
    if data_state is None:
      return
    try:
      self.iterator.set_state(data_state)
    except (KeyError, TypeError, ValueError) as e:
      raise UserError(f"the checkpoint's data-stream position {data_state!r} is not one the grain pipeline can "
                      f"resume ({type(e).__name__}: {e})", "resume with the --config.data_workers the run was "
                      "started with (the position of N workers is N positions), restore the checkpoint from a "
                      "backup, or train in a new --workdir") from None

  def chunk_data(self, first_step: int, num_steps: int) -> dict:
    """This process's rows of the next ``num_steps`` batches (the stream's position is its own, whatever
    ``first_step`` says), assembled into global arrays."""
    images = np.empty((num_steps, self.local_batch_size, *self.image_shape), np.uint8)
    labels = np.empty((num_steps, self.local_batch_size), np.int32)
    for i in range(num_steps):
      batch = next(self.iterator)
      images[i], labels[i] = batch["image"], batch["label"]
    make = lambda a: jax.make_array_from_process_local_data(self.sharding, a)
    return {"image": make(images), "label": make(labels)}

  def abstract_data(self, num_steps: int):
    shape = (num_steps, self.batch_size)
    return {"image": jax.ShapeDtypeStruct(shape + self.image_shape, np.uint8, sharding=self.sharding),
            "label": jax.ShapeDtypeStruct(shape, np.int32, sharding=self.sharding)}

  def state(self) -> dict:
    return self.iterator.get_state()

  def close(self) -> None:
    """Stops grain's worker processes and threads."""
    self.iterator.close()


def make_stream(exp: Experiment, data_state: dict | None):
  """The run's stream, positioned where ``data_state`` (a checkpoint's, or None for a fresh run) left it."""
  stream = DeviceStream(exp) if choose_on_device(exp, data_state) else HostStream(exp)
  stream.restore(data_state)
  return stream
