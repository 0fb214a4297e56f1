"""Grain input pipeline: shuffled, augmented, normalized batches with resumable state.

Training batches come from a `grain` index-based pipeline, so the iterator state is a tiny
JSON-able dict (`it.get_state()`) that a checkpoint can store and `it.set_state(...)` can restore
exactly. Augmentation runs per record on uint8 images (cheap, exact integer pixels); normalization
runs once per batch in float32. No TensorFlow anywhere.
"""

from collections.abc import Iterator, Sequence
import functools
import os

from absl import flags as absl_flags
import grain
import numpy as np

from overfocus_jax.data.augmentation import Policy, host_augment, make_policy
from overfocus_jax.data.balanced import BalancedRecords, Layout
from overfocus_jax.data.sources import ArraySource, ImageDataset, Source
from overfocus_jax.errors import SettingError

_PREFETCH_BATCHES = 8
_MAX_READ_THREADS = 4


def normalize(images_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Maps uint8 pixels to `(x / 255 - mean) / std` in float32 (per channel, any leading dims)."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (np.asarray(images_uint8, np.float32) / np.float32(255.0) - mean) / std


def make_train_iterator(
    dataset: ImageDataset, *, batch_size: int, seed: int, augment: bool,
    normalized: bool = True, rows: slice | None = None, workers: int = 0,
    balanced: Layout | None = None, augmentation: Policy | None = None) -> grain.DatasetIterator:
  """An endless, resumable stream of {'image': float32 (B,H,W,C), 'label': int32 (B,)} batches.

  With `normalized=False` the images stay uint8 (a quarter of the bytes to move) and the caller normalizes them
  where they are consumed (the train loop does, inside its compiled step).

  The order is reshuffled every epoch and, like the augmentation, depends only on `seed`, so the
  same seed reproduces the same stream and `get_state`/`set_state` resume it exactly.

  `rows` (a slice of range(batch_size)): only those rows of every batch, each read, augmented and batched
  exactly as in the whole stream — what one process of several feeds of each global batch.

  `workers` > 0 reads, augments and batches in that many grain worker processes (`mp_prefetch`: batch i comes from
  worker i mod N, so the stream is the same as with threads; its state then holds each worker's position, and
  resumes only with the same count), out of reach of this process's GIL; 0 uses threads of this process.

  `balanced` (a :class:`~overfocus_jax.data.balanced.Layout` of `batch_size`): environment-balanced batches, each
  environment in its own block of rows, each epoch's order drawn per environment (balanced.py) instead of one
  shuffle of the whole split.

  `augmentation` (with `augment`): the policy of augmentation.py; None: the default one for the dataset (a padded
  crop, a mirror for natural images).

  Raises:
    UserError: bad batch size or seed, or fewer training examples than one batch.
  """
  check_stream_arguments(dataset, batch_size=batch_size, seed=seed)
  shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
  if balanced is not None:
    if balanced.batch_size != batch_size:
      raise ValueError(f'the balanced layout is for batches of {balanced.batch_size}, not {batch_size}')
    records = grain.MapDataset.source(BalancedRecords(dataset.train, balanced, shuffle_seed))
  else:
    records = grain.MapDataset.source(dataset.train).shuffle(seed=shuffle_seed).repeat(None)
  if augment:  # before the rows are picked: each record's random draw depends on its place in the whole stream
    policy = augmentation or make_policy(dataset.image_shape, dataset.natural_images)
    records = records.random_map(functools.partial(_augment_record, policy=policy), seed=augment_seed)
  rows = slice(*(rows or slice(0, batch_size)).indices(batch_size)[:2])
  if (rows.start, rows.stop) != (0, batch_size):
    records = grain.MapDataset.source(_BatchRows(records, batch_size, rows))
  batches = records.batch(rows.stop - rows.start, drop_remainder=True).map(
      functools.partial(_model_batch, mean=dataset.mean, std=dataset.std) if normalized else _raw_batch)
  batches = batches.to_iter_dataset(_read_options())
  if workers:
    if not absl_flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library has none of its own to parse
      absl_flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                               per_worker_buffer_size=_PREFETCH_BATCHES))
  return iter(batches)


class _BatchRows:
  """The records at ``rows`` of every batch of ``batch_size`` of ``records``, in order (a random-access source)."""

  def __init__(self, records, batch_size: int, rows: slice):
    self.records, self.batch_size, self.rows = records, batch_size, rows
    self.per_batch = rows.stop - rows.start
    if self.per_batch < 1:
      raise ValueError(f'rows {rows} of a batch of {batch_size} select nothing')

  def __len__(self) -> int:
    return len(self.records) // self.batch_size * self.per_batch

  def __getitem__(self, index: int):
    batch, row = divmod(index, self.per_batch)
    return self.records[batch * self.batch_size + self.rows.start + row]


def eval_batches(
    source: Source, *, batch_size: int, mean: Sequence[float], std: Sequence[float]
) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, in fixed-size batches with a validity mask.

  The last batch is padded by repeating the final example and its 'mask' is 0 on those rows, so
  callers compile one batch shape (divisible by the device count) and weight metrics by 'mask'.

  Raises:
    UserError: batch_size is not positive (raised on call, not on first iteration).
  """
  _check_batch_size(batch_size, 'eval_batch_size')
  return _eval_batches(source, batch_size, mean, std)


def check_stream_arguments(dataset: ImageDataset, *, batch_size: int, seed: int) -> None:
  """Raises UserError for a bad batch size or seed, or fewer training examples than one batch."""
  _check_seed(seed)
  _check_train_size(dataset, batch_size)


def steps_per_epoch(dataset: ImageDataset, batch_size: int) -> int:
  """Full training batches per pass over the train split (at least one)."""
  return max(1, len(dataset.train) // batch_size)


def _eval_batches(source, batch_size, mean, std) -> Iterator[dict[str, np.ndarray]]:
  count = len(source)
  for start in range(0, count, batch_size):
    indices = np.minimum(np.arange(start, start + batch_size), count - 1)
    images, labels = _read_records(source, indices)
    batch = _model_batch((images, labels), mean=mean, std=std)
    batch['mask'] = (np.arange(start, start + batch_size) < count).astype(np.float32)
    yield batch


def read_split(source: Source) -> tuple[np.ndarray, np.ndarray]:
  """Every example of `source` as (uint8 images (N,H,W,C), labels (N,))."""
  return _read_records(source, np.arange(len(source)))


def _read_records(source, indices) -> tuple[np.ndarray, np.ndarray]:
  """Gathers records into arrays, slicing directly when the source is already in memory."""
  if isinstance(source, ArraySource):
    return source.images[indices], source.labels[indices]
  records = [source[int(i)] for i in indices]
  return np.stack([r[0] for r in records]), np.array([r[1] for r in records])


def _model_batch(batch, *, mean, std) -> dict[str, np.ndarray]:
  """Stacked (uint8 images, labels) -> the dict the models and train step consume."""
  images, labels = batch
  return {'image': normalize(images, mean, std), 'label': np.asarray(labels, np.int32)}


def _raw_batch(batch) -> dict[str, np.ndarray]:
  """Stacked (uint8 images, labels) -> the model batch with the images still uint8."""
  images, labels = batch
  return {'image': np.asarray(images, np.uint8), 'label': np.asarray(labels, np.int32)}


def _augment_record(record, rng: np.random.Generator, *, policy: Policy):
  """grain's per-record random transform: the image augmented by ``policy``, the label as it was."""
  image, label = record
  return host_augment(image, rng, policy), label


def _read_options() -> grain.ReadOptions:
  """A few prefetching threads and a short buffer: batches are large, cores are few."""
  threads = max(1, min(_MAX_READ_THREADS, os.cpu_count() or 1))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=_PREFETCH_BATCHES)


def _check_batch_size(batch_size: int, setting: str = 'batch_size') -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise SettingError(setting, f'{setting}={batch_size!r} is not a positive integer', 'a positive integer')


def _check_seed(seed: int) -> None:
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise SettingError('seed', f'seed={seed!r} is not a non-negative integer', 'an integer >= 0')


def _check_train_size(dataset: ImageDataset, batch_size: int) -> None:
  """Training with drop_remainder needs at least one full batch."""
  _check_batch_size(batch_size)
  count = len(dataset.train)
  if count < batch_size:
    raise SettingError(
        'batch_size', f"training split of '{dataset.name}' has {count} examples, fewer than "
        f'batch_size={batch_size}', f'at most {count}, or provide more training examples')
