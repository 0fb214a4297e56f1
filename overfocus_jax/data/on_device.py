r"""Data on the device: a dataset's uint8 images live in accelerator memory and each step's batch is built inside the
jitted step, so the host does no per-step work at all.

    perm_e  = permutation(fold_in(shuffle_key, e), N)                  epoch e's order (a function of e alone)
    rows(t) = perm_e[(t mod S)·B : (t mod S)·B + B],   e = ⌊t / S⌋       step t's examples, S = ⌊N / B⌋ steps an epoch
    x(t)    = (augment(images[rows(t)], fold_in(augment_key, t)) / 255 − μ) / σ

The position in the stream is the step ``t`` itself, so a run restored from the checkpoint of step t continues the
same stream exactly, with nothing more to save. The augmentation is the host pipeline's (:mod:`.augmentation`: by
default a translation of up to an eighth of the side with zero fill, and a coin-flip horizontal mirror for natural
images only; ``config.augmentation`` for torchvision's resized crop and colour jitter); its random numbers come from
the JAX PRNG instead of NumPy's, so the two paths draw different (equally distributed) streams from the same seed.

The arrays are replicated on every device of the mesh, so each device can gather its own rows of the (sharded)
batch, and today's datasets (MNIST, Fashion-MNIST, CIFAR-10: at most 180 MB) fit many times over.
``config.data_on_device=auto`` (:func:`resolve`) keeps the data on an accelerator when it :func:`fits` and is not
an image folder (decoded file by file). On CPUs, where the device's memory is the host's and one step goes per
dispatch (XLA:CPU loops are slow, :mod:`overfocus_jax.train.dispatch`), it keeps it on the device only for the
models that prefer it (``Platform.data_on_device`` in :mod:`overfocus_jax.models.spec`), where the in-step crop
costs less than grain's threads beside the step, and takes the host stream for the others. ``python
experiments/data_paths.py --config NAME --epochs 2 --seeds 0`` measures both streams on a config (figures in
``docs/results/data_streams.md``).
"""

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from overfocus_jax.data.augmentation import Policy, device_augment, make_policy
from overfocus_jax.data.balanced import Layout
from overfocus_jax.data.pipeline import check_stream_arguments, read_split, steps_per_epoch
from overfocus_jax.data.sources import ImageDataset, Source
from overfocus_jax.errors import SettingError

MODES = ("auto", "on", "off")
# auto keeps the data on the device when it takes at most this share of one device's memory (or, where the
# backend reports none, such as the CPU, at most HOST_BUDGET_BYTES).
DEVICE_MEMORY_SHARE = 0.25
HOST_BUDGET_BYTES = 4 << 30


@flax.struct.dataclass
class Split:
  """One split on the device: uint8 images (N, H, W, C) and int32 labels (N,), replicated over the mesh."""

  images: jax.Array
  labels: jax.Array


@dataclasses.dataclass(frozen=True)
class StreamSpec:
  """What the train stream needs besides the arrays: sizes, the seed's two keys and the augmentation."""

  batch_size: int
  steps_per_epoch: int
  seed: int
  augment: bool
  policy: Policy
  mean: tuple[float, ...]
  std: tuple[float, ...]


def split_bytes(source: Source, image_shape: Sequence[int]) -> int:
  """The bytes a split takes on the device: uint8 pixels plus int32 labels."""
  return len(source) * (int(np.prod(image_shape)) + 4)


def device_budget_bytes(device: jax.Device, share: float = DEVICE_MEMORY_SHARE) -> int:
  """How many bytes of ``device`` the data may take: ``share`` of its memory, or HOST_BUDGET_BYTES where the
  backend reports none (the CPU, whose "device memory" is the host's)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  limit = (stats or {}).get("bytes_limit")
  return int(limit * share) if limit else HOST_BUDGET_BYTES


def dataset_bytes(dataset: ImageDataset) -> int:
  return split_bytes(dataset.train, dataset.image_shape) + split_bytes(dataset.test, dataset.image_shape)


def fits(dataset: ImageDataset, device: jax.Device, share: float = DEVICE_MEMORY_SHARE) -> bool:
  """Whether both splits together fit ``share`` of ``device``'s memory (``auto``'s budget by default)."""
  return dataset_bytes(dataset) <= device_budget_bytes(device, share)


def decoded_on_read(dataset: ImageDataset) -> bool:
  """Whether the dataset's files are decoded as they are read (an image folder): the host stream decodes them in
  grain's threads or workers; copying them to the device would first decode every file in this process."""
  return any(getattr(split, "decoded_on_read", False) for split in (dataset.train, dataset.test))


def resolve(mode: str, dataset: ImageDataset, mesh: jax.sharding.Mesh, prefer_on_cpu: bool = False) -> bool:
  """``config.data_on_device`` → whether this run keeps its data on the device (this process's first device
  decides; every device holds the whole dataset). ``prefer_on_cpu``: the model's preference, which ``auto`` follows
  on a CPU."""
  if mode not in MODES:
    raise SettingError("data_on_device", f"data_on_device={mode!r} is not one of {', '.join(MODES)}",
                       "auto, on or off")
  device = mesh.local_devices[0]
  if mode == "auto":  # see the module docstring for why CPUs take the host stream for most models
    on_cpu = device.platform == "cpu"
    return (not on_cpu or prefer_on_cpu) and fits(dataset, device) and not decoded_on_read(dataset)
  if mode == "on" and not fits(dataset, device, share=1.0):
    raise SettingError("data_on_device", f"data_on_device=on: the dataset takes {dataset_bytes(dataset) / 2**30:.1f} "
                       f"GiB, more than the {device_budget_bytes(device, 1.0) / 2**30:.1f} GiB of one device",
                       "auto or off (the grain pipeline on the host)")
  return mode == "on"


def put_split(source: Source, sharding: jax.sharding.Sharding) -> Split:
  """Copies every example of ``source`` to the devices, laid out as ``sharding`` (replicated, for the loop), once."""
  images, labels = read_split(source)
  split = Split(images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int32))
  if jax.process_count() == 1:
    return jax.device_put(split, sharding)
  # Several processes: each holds the whole split and copies what its own devices hold.
  return jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index]), split)


def stream_spec(dataset: ImageDataset, *, batch_size: int, seed: int, augment: bool,
                layout: Layout | None = None, augmentation: Policy | None = None) -> StreamSpec:
  """The stream of ``make_train_iterator``'s arguments, for the device (``layout``: environment-balanced batches,
  whose epochs are :func:`overfocus_jax.data.balanced.device_epoch_order`).

  Raises:
    UserError: bad batch size or seed, or fewer training examples than one batch (as the host pipeline).
  """
  check_stream_arguments(dataset, batch_size=batch_size, seed=seed)
  steps = layout.steps_per_epoch if layout is not None else steps_per_epoch(dataset, batch_size)
  return StreamSpec(batch_size=batch_size, steps_per_epoch=steps, seed=seed,
                    augment=augment, policy=augmentation or make_policy(dataset.image_shape, dataset.natural_images),
                    mean=tuple(dataset.mean), std=tuple(dataset.std))


def stream_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """The shuffle and augmentation keys of a seed (independent of the model's keys, which split PRNGKey(seed))."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), 0x0DA7A)
  return jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)


def epoch_order(shuffle_key: jax.Array, epoch: jax.Array, count: int) -> jax.Array:
  """Epoch ``epoch``'s permutation of the ``count`` training examples."""
  return jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), count)


def step_rows(order: jax.Array, step: jax.Array, spec: StreamSpec) -> jax.Array:
  """The indices of step ``step``'s examples in its epoch's ``order``."""
  start = (step % spec.steps_per_epoch) * spec.batch_size
  return jax.lax.dynamic_slice_in_dim(order, start, spec.batch_size)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 pixels → ``(x / 255 − mean) / std`` in float32, per channel (as ``pipeline.normalize``)."""
  mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / jnp.float32(255.0) - mean) / std


def train_batch(split: Split, step: jax.Array, order: jax.Array, spec: StreamSpec) -> dict:
  """Step ``step``'s batch, ``{'image': float32 (B, H, W, C), 'label': int32 (B,)}``, from the device split.

  ``order`` is ``epoch_order`` of the step's epoch (computed once per chunk of steps by the caller).
  """
  rows = step_rows(order, step, spec)
  images, labels = split.images[rows], split.labels[rows]
  if spec.augment:
    images = device_augment(images, jax.random.fold_in(stream_keys(spec.seed)[1], step), spec.policy)
  return {"image": normalize(images, spec.mean, spec.std), "label": labels}


@functools.partial(jax.jit, static_argnums=1)
def padded_eval_batches(split: Split, batch_size: int) -> tuple[Split, jax.Array]:
  """The split cut into ⌈N / batch_size⌉ batches (a leading axis), the last padded with its final example, and
  the (batches, batch_size) validity mask: one shape, so evaluation is one compiled pass."""
  count = split.labels.shape[0]
  batches = -(-count // batch_size)
  index = jnp.minimum(jnp.arange(batches * batch_size), count - 1).reshape(batches, batch_size)
  mask = (jnp.arange(batches * batch_size) < count).astype(jnp.float32).reshape(batches, batch_size)
  return Split(images=split.images[index], labels=split.labels[index]), mask
