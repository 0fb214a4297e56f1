"""Datasets made of environments: DomainBed's ColoredMNIST and RotatedMNIST, from any MNIST-like base.

Follows facebookresearch/DomainBed, ``domainbed/datasets.py`` (``MultipleEnvironmentMNIST``, ``ColoredMNIST``,
``RotatedMNIST``) and ``domainbed/lib/misc.py`` (``split_dataset``, ``seed_hash``), as called by
``domainbed/scripts/train.py``. Specs (``load_dataset`` in sources.py dispatches them here):

* ``colored_mnist[:BASE]``, ``rotated_mnist[:BASE]``: ``BASE`` is any spec ``load_dataset`` reads whose images are
  28×28×1 with 10 classes (``mnist5k``, the default; ``idx:DIR``; ``tfds:mnist``; ``npz:FILE``), e.g.
  ``colored_mnist:tfds:mnist`` or ``rotated_mnist:idx:~/mnist`` for DomainBed's full 70,000 digits.

Construction, step by step as DomainBed:

1. The base's train and test images are concatenated (train first) and shuffled with one permutation; environment
   ``i`` of ``n`` takes the shuffled images ``[i::n]``.
2. ColoredMNIST, environments ``+90%``, ``+80%``, ``-90%`` (colour flip probability ``e`` = 0.1, 0.2, 0.9): the
   label is ``digit < 5`` (1 for digits 0–4), flipped with probability 0.25; the colour is ``label XOR
   Bernoulli(e)``; the image becomes two channels (HWC here: 28×28×2, DomainBed's 2×28×28), the digit in channel
   ``colour`` and the other channel zero. 2 classes. DomainBed's line that subsampled to 14×14
   (``images.reshape((-1, 28, 28))[:, ::2, ::2]``) is commented out in its code, and its ``input_shape`` is
   (2, 28, 28): the images stay 28×28 here too. (The IRM paper's own Colored MNIST, where that line comes from,
   subsamples to 14×14; DomainBed's does not.)
3. RotatedMNIST, environments ``0``, ``15``, ``30``, ``45``, ``60``, ``75`` (degrees): each image rotated
   counter-clockwise by its environment's angle about the image centre, same size, bicubic, zero fill — DomainBed
   calls torchvision's ``rotate(PIL image, angle, fill=(0,), resample=BICUBIC)``, which is PIL's
   ``Image.rotate(angle, BICUBIC, fillcolor=0)``; this module calls that PIL function itself, so the pixels are
   DomainBed's for the same digits. 28×28×1, 10 classes.
4. Each environment is split into an out-split of ``int(len(env) * 0.2)`` examples and an in-split of the rest,
   exactly as ``misc.split_dataset(env, int(len(env) * holdout_fraction), misc.seed_hash(trial_seed, env_i))``: a
   ``numpy.random.RandomState(seed_hash(trial_seed, i)).shuffle`` of the indices, the first ``n`` out, the rest in
   (numpy in DomainBed too, so these are DomainBed's indices). ``trial_seed`` is ``config.environments.trial_seed``
   (``load_dataset(spec, trial_seed=...)``; default 0, DomainBed's) and ``holdout_fraction`` = 0.2.

Randomness: DomainBed draws the permutation and the Bernoulli variables with torch's global generator (seeded by
its ``--seed``), which numpy cannot reproduce. Here they come from ``numpy.random.default_rng(DATA_SEED)``
(``DATA_SEED`` = 0), in DomainBed's order: the permutation, then per environment in order the label-noise draws
and the colour-flip draws, each a uniform ``random(n) < p`` as ``torch.rand(n) < p``. The same distributions, not
the same draws: the numbers match DomainBed's statistically, not bit for bit.

The result is an ``ImageDataset`` whose ``train`` is the in-splits of every environment (environment 0's first, each
in DomainBed's index order) and whose ``test`` is the out-splits, each source with ``domains`` (one environment index
per example, as ``imagefolder:DIR:domains``) and the dataset's ``domain_names`` (DomainBed's ``ENVIRONMENTS``).
:func:`environment_rows` and :func:`environment_arrays` give one environment's in/out split. Pixels are not
normalised (mean 0, std 1), so a model sees ``pixel / 255`` as DomainBed's ``ToTensor``; no flips.

What ``overfocus train`` does with them (:mod:`overfocus_jax.data.balanced`): it trains on the in-splits of the
training environments (every one not in ``config.environments.test_envs``), in environment-balanced batches by
default, reports the held-out environments' in-split accuracy as ``test_accuracy`` (with none held out: the pooled
out-splits), and logs every environment's ``env{i}_in_acc`` and ``env{i}_out_acc`` at each evaluation, DomainBed's
records; ``config.objective`` adds IRM's or V-REx's penalty.

Checksums (trial seed 0; :func:`fingerprint`: sha256 over ``train.images``, ``train.labels``, ``train.domains``, ``test.images``,
``test.labels``, ``test.domains``, in that order, labels and domains as little-endian int64), default base mnist5k:

* ``colored_mnist``: ``c24ec0e627797f87f80c02b9c6d75ecedee588d454be6ca719ebd86d9cf3428a``
  (4,001 train / 999 test; environments of 1,667 / 1,667 / 1,666 examples, in/out 1,334/333, 1,334/333, 1,333/333).
* ``rotated_mnist``: ``718ad3c85eb05878067703d78e2954c90e87c783ce56d784bd4ddf934e89e65c``
  (4,004 train / 996 test; environments of 834, 834, 833, 833, 833, 833 examples, out-splits of 166 each; computed
  with Pillow 13).

``python -c "from overfocus_jax.data import sources, environments as e; print(e.fingerprint(sources.load_dataset(
'colored_mnist')))"`` prints it for any spec.
"""

import dataclasses
import hashlib

import numpy as np
from PIL import Image

from overfocus_jax.errors import UserError

COLORED = 'colored_mnist'
ROTATED = 'rotated_mnist'
KINDS = (COLORED, ROTATED)
DEFAULT_BASE = 'mnist5k'
BASE_SHAPE = (28, 28, 1)
BASE_CLASSES = 10
DATA_SEED = 0  # numpy's stand-in for DomainBed's torch seed: every run builds the same environments
TRIAL_SEED = 0  # DomainBed's --trial_seed default: seeds the in/out split of each environment
HOLDOUT_FRACTION = 0.2  # DomainBed's --holdout_fraction default
LABEL_NOISE = 0.25
COLOR_FLIPS = (0.1, 0.2, 0.9)
COLORED_NAMES = ('+90%', '+80%', '-90%')
ANGLES = (0, 15, 30, 45, 60, 75)
ROTATED_NAMES = tuple(str(a) for a in ANGLES)
SYNTAX = 'colored_mnist[:BASE] or rotated_mnist[:BASE], BASE an MNIST-like dataset such as mnist5k, idx:DIR, tfds:mnist'
COLORED_MNIST5K_SHA256 = 'c24ec0e627797f87f80c02b9c6d75ecedee588d454be6ca719ebd86d9cf3428a'
ROTATED_MNIST5K_SHA256 = '718ad3c85eb05878067703d78e2954c90e87c783ce56d784bd4ddf934e89e65c'


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's arrays: uint8 NHWC images, int64 labels, int64 environment index per example."""

  images: np.ndarray
  labels: np.ndarray
  domains: np.ndarray


@dataclasses.dataclass(frozen=True)
class Built:
  """A built environment dataset: in-splits pooled as ``train``, out-splits as ``test``."""

  train: Split
  test: Split
  image_shape: tuple[int, int, int]
  num_classes: int
  domain_names: tuple[str, ...]


def parse_spec(spec: str, kind: str, arg: str | None) -> str:
  """The base spec of ``kind[:BASE]`` (``arg`` is what follows the first colon, None without one)."""
  if arg is None:
    return DEFAULT_BASE
  base = arg.strip()
  if not base:
    raise UserError(f'dataset {spec!r} is missing its base after the colon', f'write it as {SYNTAX}')
  if base.partition(':')[0].strip() in KINDS:
    raise UserError(f'dataset {spec!r}: the base {base!r} is itself an environment dataset', f'write it as {SYNTAX}')
  return base


def check_base(spec: str, base) -> None:
  """Rejects a base (an ImageDataset) that is not MNIST-like: 28×28×1 images, 10 classes, no domains of its own."""
  fix = f'use an MNIST-like base (28x28x1 images, 10 classes): {SYNTAX}'
  if tuple(base.image_shape) != BASE_SHAPE:
    shape = 'x'.join(str(d) for d in base.image_shape)
    raise UserError(f'dataset {spec!r}: its base {base.name!r} has {shape} images, not MNIST\'s 28x28x1', fix)
  if base.num_classes != BASE_CLASSES:
    raise UserError(f'dataset {spec!r}: its base {base.name!r} has {base.num_classes} classes, not 10', fix)
  if base.domain_names:
    raise UserError(f'dataset {spec!r}: its base {base.name!r} already has domains', fix)


def build(spec: str, kind: str, base, *, data_seed: int = DATA_SEED, trial_seed: int = TRIAL_SEED,
          holdout_fraction: float = HOLDOUT_FRACTION) -> Built:
  """DomainBed's ``kind`` ('colored_mnist' or 'rotated_mnist') from ``base`` (an MNIST-like ImageDataset).

  Raises:
    UserError: the base is not MNIST-like, or too small to give every environment an in and an out example.
  """
  check_base(spec, base)
  images, labels = base_arrays(base)
  names = COLORED_NAMES if kind == COLORED else ROTATED_NAMES
  check_size(spec, len(labels), len(names), holdout_fraction)
  rng = np.random.default_rng(data_seed)
  shuffled = shuffle_base(images, labels, rng)
  envs = [make_environment(kind, env_images, env_labels, i, rng)
          for i, (env_images, env_labels) in enumerate(split_environments(*shuffled, len(names)))]
  train, test = pool_splits(envs, trial_seed, holdout_fraction)
  return Built(train=train, test=test, image_shape=tuple(int(d) for d in train.images.shape[1:]),
               num_classes=2 if kind == COLORED else BASE_CLASSES, domain_names=names)


def base_arrays(base) -> tuple[np.ndarray, np.ndarray]:
  """The base's train then test examples (DomainBed's ``torch.cat((train, test))``) as uint8 NHWC and int64 arrays."""
  parts = [read_source(s) for s in (base.train, base.test) if len(s)]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_source(source) -> tuple[np.ndarray, np.ndarray]:
  """Every example of a source: sliced when it holds arrays, else read one by one (a TFDS split)."""
  if hasattr(source, 'images') and hasattr(source, 'labels'):
    return np.asarray(source.images, np.uint8), np.asarray(source.labels, np.int64)
  records = [source[i] for i in range(len(source))]
  return np.stack([np.asarray(r[0], np.uint8) for r in records]), np.array([r[1] for r in records], np.int64)


def check_size(spec: str, count: int, num_envs: int, holdout_fraction: float) -> None:
  """Every environment needs at least one in- and one out-example (its smallest holds ``count // num_envs``)."""
  smallest = count // num_envs
  if int(smallest * holdout_fraction) < 1 or smallest - int(smallest * holdout_fraction) < 1:
    need = num_envs * int(np.ceil(1 / holdout_fraction))
    raise UserError(f'dataset {spec!r}: its base has {count} images, too few for {num_envs} environments with '
                    f'a {holdout_fraction:.0%} out-split each', f'use a base with at least {need} images')


def shuffle_base(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
  """(images, labels) in the order of one seeded permutation (DomainBed's ``torch.randperm``)."""
  permutation = rng.permutation(len(labels))
  return images[permutation], labels[permutation]


def split_environments(images: np.ndarray, labels: np.ndarray, num_envs: int):
  """Environment ``i`` takes examples ``[i::num_envs]``: a list of (images, labels)."""
  return [(images[i::num_envs], labels[i::num_envs]) for i in range(num_envs)]


def make_environment(kind: str, images: np.ndarray, labels: np.ndarray, index: int, rng: np.random.Generator):
  """(images, labels) of environment ``index`` of ``kind`` (draws from ``rng`` for ColoredMNIST only)."""
  if kind == COLORED:
    return color_environment(images, labels, COLOR_FLIPS[index], rng)
  return rotate_images(images, ANGLES[index]), labels


def bernoulli(p: float, size: int, rng: np.random.Generator) -> np.ndarray:
  """``size`` draws of Bernoulli(p) as 0/1 int64 (DomainBed's ``torch.rand(size) < p``)."""
  return (rng.random(size) < p).astype(np.int64)


def color_environment(images: np.ndarray, digits: np.ndarray, flip: float, rng: np.random.Generator):
  """ColoredMNIST's ``color_dataset``: binary noisy labels and two-channel images coloured by label XOR Bernoulli."""
  labels = (digits < 5).astype(np.int64) ^ bernoulli(LABEL_NOISE, len(digits), rng)
  colors = labels ^ bernoulli(flip, len(digits), rng)
  return colorize(images, colors), labels


def colorize(images: np.ndarray, colors: np.ndarray) -> np.ndarray:
  """(N, H, W, 1) uint8 → (N, H, W, 2): the digit in channel ``colors[i]``, the other channel zero."""
  out = np.zeros(images.shape[:3] + (2,), np.uint8)
  rows = np.arange(len(images))
  out[rows, :, :, colors] = images[..., 0]
  return out


def rotate_images(images: np.ndarray, angle: float) -> np.ndarray:
  """(N, H, W, 1) uint8 rotated ``angle`` degrees counter-clockwise about the centre: PIL's bicubic rotation with
  zero fill, what DomainBed's torchvision ``rotate(img, angle, fill=(0,), resample=BICUBIC)`` runs."""
  out = np.empty_like(images)
  for i, image in enumerate(images):
    rotated = Image.fromarray(np.ascontiguousarray(image[..., 0]), mode='L').rotate(
        angle, resample=Image.Resampling.BICUBIC, fillcolor=0)
    out[i, ..., 0] = np.asarray(rotated)
  return out


def seed_hash(*args) -> int:
  """DomainBed's ``misc.seed_hash``: an int seed from the md5 of ``str(args)``."""
  return int(hashlib.md5(str(args).encode('utf-8')).hexdigest(), 16) % (2**31)


def split_keys(count: int, env_index: int, trial_seed: int = TRIAL_SEED,
               holdout_fraction: float = HOLDOUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
  """(in_keys, out_keys) of an environment of ``count`` examples, as DomainBed's ``misc.split_dataset``."""
  keys = list(range(count))
  np.random.RandomState(seed_hash(trial_seed, env_index)).shuffle(keys)
  num_out = int(count * holdout_fraction)
  return np.array(keys[num_out:], np.int64), np.array(keys[:num_out], np.int64)


def pool_splits(envs, trial_seed: int, holdout_fraction: float) -> tuple[Split, Split]:
  """(train, test): every environment's in-split, then every out-split, concatenated in environment order."""
  ins, outs = [], []
  for index, (images, labels) in enumerate(envs):
    in_keys, out_keys = split_keys(len(labels), index, trial_seed, holdout_fraction)
    ins.append((images[in_keys], labels[in_keys], np.full(len(in_keys), index, np.int64)))
    outs.append((images[out_keys], labels[out_keys], np.full(len(out_keys), index, np.int64)))
  return _concat(ins), _concat(outs)


def _concat(parts) -> Split:
  return Split(*(np.concatenate([p[k] for p in parts]) for k in range(3)))


def environment_rows(dataset, index: int) -> tuple[np.ndarray, np.ndarray]:
  """(in_rows, out_rows): the rows of environment ``index`` in ``dataset.train`` and ``dataset.test``.

  Works for any dataset whose sources have ``domains`` (these specs and ``imagefolder:DIR:domains``).

  Raises:
    UserError: the dataset has no environments, or ``index`` is not one of them.
  """
  names = tuple(getattr(dataset, 'domain_names', ()))
  if not names:
    raise UserError(f'dataset {dataset.name!r} has no environments',
                    f'use {SYNTAX}, or imagefolder:DIR:domains')
  if not 0 <= index < len(names):
    listed = ', '.join(f'{i} ({n})' for i, n in enumerate(names))
    raise UserError(f'dataset {dataset.name!r} has no environment {index}', f'use one of {listed}')
  return tuple(np.flatnonzero(np.asarray(s.domains) == index) for s in (dataset.train, dataset.test))


def environment_arrays(dataset, index: int):
  """((in_images, in_labels), (out_images, out_labels)) of environment ``index``, for in-memory sources."""
  rows = environment_rows(dataset, index)
  return tuple((s.images[r], s.labels[r]) for s, r in zip((dataset.train, dataset.test), rows))


def fingerprint(dataset) -> str:
  """sha256 (hex) of the built arrays: train images, labels, domains, then test's (see the module docstring)."""
  digest = hashlib.sha256()
  for source in (dataset.train, dataset.test):
    digest.update(np.ascontiguousarray(source.images, np.uint8).tobytes())
    for ints in (source.labels, source.domains):
      digest.update(np.ascontiguousarray(ints, '<i8').tobytes())
  return digest.hexdigest()
