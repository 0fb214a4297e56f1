"""Tests for overfocus_jax.data.pipeline: batches, determinism, resumption, augmentation, eval."""

import json

import numpy as np
import pytest

from overfocus_jax.data import augmentation, pipeline
from overfocus_jax.data.pipeline import eval_batches, make_train_iterator, normalize
from overfocus_jax.data.sources import ArraySource, ImageDataset, load_dataset
from overfocus_jax.errors import UserError


@pytest.fixture(scope='module')
def mnist():
  return load_dataset('mnist5k')


def indexed_dataset(count=40, *, natural_images=False, shape=(8, 8, 1)):
  """Random, asymmetric images whose label is their index, so every batch row is traceable."""
  rng = np.random.default_rng(123)
  images = rng.integers(1, 256, (count,) + shape, dtype=np.uint8)
  channels = shape[-1]
  return ImageDataset(
      name='indexed', train=ArraySource(images, np.arange(count)),
      test=ArraySource(images[:7], np.arange(7)),
      image_shape=shape, num_classes=count, natural_images=natural_images,
      mean=(0.5,) * channels, std=(0.25,) * channels)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


# ----------------------------------------------------------------------------- train iterator


@pytest.mark.parametrize('augment', [False, True])
def test_train_batch_shapes_and_dtypes(mnist, augment):
  batch = next(make_train_iterator(mnist, batch_size=32, seed=0, augment=augment))
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (32, 28, 28, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32


def test_unaugmented_batches_are_normalized(mnist):
  batch = next(make_train_iterator(mnist, batch_size=1000, seed=0, augment=False))
  assert abs(batch['image'].mean()) < 0.05
  assert abs(batch['image'].std() - 1) < 0.05


def test_same_seed_same_batches_different_seed_different(mnist):
  first = take(make_train_iterator(mnist, batch_size=16, seed=7, augment=True), 3)
  again = take(make_train_iterator(mnist, batch_size=16, seed=7, augment=True), 3)
  assert_same_batches(first, again)
  other = take(make_train_iterator(mnist, batch_size=16, seed=8, augment=True), 3)
  assert not np.array_equal(first[0]['label'], other[0]['label'])


def test_resume_from_state_gives_identical_batches(mnist):
  iterator = make_train_iterator(mnist, batch_size=16, seed=3, augment=True)
  take(iterator, 5)
  state = json.loads(json.dumps(iterator.get_state()))  # must survive a JSON checkpoint
  expected = take(iterator, 3)
  resumed = make_train_iterator(mnist, batch_size=16, seed=3, augment=True)
  resumed.set_state(state)
  assert_same_batches(expected, take(resumed, 3))


def test_worker_processes_give_the_same_stream_and_resume_it():
  """Two grain worker processes (batch i from worker i mod 2) stream the batches threads give, across an epoch end;
  their state resumes them, and is refused by a pipeline with another worker count."""
  dataset = indexed_dataset()
  make = lambda workers: make_train_iterator(dataset, batch_size=8, seed=3, augment=True, normalized=False,
                                             workers=workers)
  threads, workers = make(0), make(2)
  try:
    expected = take(threads, 9)  # 5 batches an epoch
    assert_same_batches(expected[:6], take(workers, 6))
    state = json.loads(json.dumps(workers.get_state()))
  finally:
    workers.close()
  resumed = make(2)
  try:
    resumed.set_state(state)
    assert_same_batches(expected[6:], take(resumed, 3))
  finally:
    resumed.close()
  with pytest.raises(KeyError):
    make(0).set_state(state)


def test_every_epoch_covers_all_examples_in_a_new_order():
  dataset = indexed_dataset(40)
  batches = take(make_train_iterator(dataset, batch_size=10, seed=0, augment=False), 8)
  epochs = [np.concatenate([b['label'] for b in batches[i:i + 4]]) for i in (0, 4)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(40))
  assert not np.array_equal(epochs[0], epochs[1])


def test_unaugmented_batches_are_exact_normalized_originals():
  dataset = indexed_dataset(40)
  for batch in take(make_train_iterator(dataset, batch_size=8, seed=1, augment=False), 6):
    originals = dataset.train.images[batch['label']]
    np.testing.assert_array_equal(batch['image'], normalize(originals, dataset.mean, dataset.std))


def padded_crop(image, top, left, padding):
  """Reference crop: zero-pad by `padding`, then take the window at (top, left)."""
  height, width = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  return padded[top:top + height, left:left + width]


def _matches(augmented, original, padding, flips):
  """'plain'/'flipped' if `augmented` is a padded crop of `original` (or its mirror), else False."""
  candidates = {'plain': original, 'flipped': original[:, ::-1]} if flips else {'plain': original}
  for kind, candidate in candidates.items():
    for top in range(2 * padding + 1):
      for left in range(2 * padding + 1):
        if np.array_equal(padded_crop(candidate, top, left, padding), augmented):
          return kind
  return False


@pytest.mark.parametrize('natural', [False, True])
def test_augmentation_is_a_shift_and_flips_only_natural_images(natural):
  dataset = indexed_dataset(40, natural_images=natural)
  stream = make_train_iterator(dataset, batch_size=20, seed=5, augment=True)
  outcomes = []
  for batch in take(stream, 4):
    pixels = np.rint(batch['image'] * 0.25 * 255 + 0.5 * 255).astype(np.uint8)
    for image, label in zip(pixels, batch['label']):
      outcomes.append(_matches(image, dataset.train.images[label], padding=1, flips=natural))
  assert all(outcomes)
  assert ('flipped' in outcomes) == natural


# ----------------------------------------------------------------------------- augment unit tests


@pytest.mark.parametrize('height, padding', [(32, 4), (28, 3), (8, 1), (4, 1)])
def test_crop_padding(height, padding):
  assert augmentation.crop_padding((height, height, 3)) == padding


def test_augment_without_flip_never_mirrors():
  image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
  rng = np.random.default_rng(0)
  for _ in range(50):
    np.testing.assert_array_equal(augmentation.host_augment(image, rng, augmentation.Policy(padding=0, flip=False)), image)


def test_augment_with_flip_mirrors_some_of_the_time():
  image = np.arange(16, dtype=np.uint8).reshape(4, 4, 1)
  rng = np.random.default_rng(0)
  outputs = [augmentation.host_augment(image, rng, augmentation.Policy(padding=0, flip=True)) for _ in range(50)]
  flipped = [np.array_equal(out, image[:, ::-1]) for out in outputs]
  assert 10 < sum(flipped) < 40


class FixedRng:
  """Stands in for np.random.Generator with a chosen crop offset."""

  def __init__(self, top, left):
    self.offset = np.array([top, left])

  def integers(self, *args, **kwargs):
    del args, kwargs
    return self.offset


@pytest.mark.parametrize('padding', [1, 3, 9])
def test_random_crop_matches_pad_then_crop(padding):
  image = np.random.default_rng(0).integers(0, 256, (6, 5, 2), dtype=np.uint8)
  for top in range(2 * padding + 1):
    for left in range(2 * padding + 1):
      np.testing.assert_array_equal(augmentation.pad_crop(image, FixedRng(top, left), padding),
                                    padded_crop(image, top, left, padding))


def test_normalize():
  images = np.array([[[[0, 255]]]], np.uint8)
  out = normalize(images, mean=(0.5, 0.0), std=(0.5, 2.0))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], [-1.0, 0.5])


# ----------------------------------------------------------------------------- errors


def test_too_few_training_examples():
  with pytest.raises(UserError, match="training split of 'indexed' has 40 examples, fewer than "
                     'batch_size=64; set batch_size to at most 40') as caught:
    make_train_iterator(indexed_dataset(40), batch_size=64, seed=0, augment=False)
  # the library names the setting; the CLI words it as the flag that sets it
  assert caught.value.setting == "batch_size"
  assert "set --config.batch_size to at most 40" in str(caught.value.as_flag())


@pytest.mark.parametrize('batch_size, seed', [(0, 0), (8, -1)])
def test_bad_batch_size_or_seed(batch_size, seed):
  with pytest.raises(UserError):
    make_train_iterator(indexed_dataset(40), batch_size=batch_size, seed=seed, augment=False)


# ----------------------------------------------------------------------------- eval


def test_eval_batches_cover_every_example_once(mnist):
  batches = list(eval_batches(mnist.test, batch_size=96, mean=mnist.mean, std=mnist.std))
  assert len(batches) == 11  # ceil(1000 / 96)
  for batch in batches:
    assert batch['image'].shape == (96, 28, 28, 1) and batch['mask'].dtype == np.float32
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == len(mnist.test)
  labels = np.concatenate([b['label'] for b in batches])[mask == 1]
  np.testing.assert_array_equal(labels, mnist.test.labels)
  images = np.concatenate([b['image'] for b in batches])[mask == 1]
  np.testing.assert_array_equal(images, normalize(mnist.test.images, mnist.mean, mnist.std))


def test_eval_padding_repeats_the_last_example():
  dataset = indexed_dataset()
  last = list(eval_batches(dataset.test, batch_size=4, mean=dataset.mean, std=dataset.std))[-1]
  np.testing.assert_array_equal(last['mask'], [1, 1, 1, 0])
  np.testing.assert_array_equal(last['label'], [4, 5, 6, 6])


def test_eval_batches_on_a_generic_source():
  source = [(np.full((2, 2, 1), i, np.uint8), i) for i in range(5)]
  batches = list(eval_batches(source, batch_size=2, mean=(0.0,), std=(1.0,)))
  assert [b['mask'].tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
  assert batches[-1]['label'].tolist() == [4, 4]
  assert batches[-1]['image'].shape == (2, 2, 2, 1)


def test_eval_batches_rejects_bad_batch_size_on_call():
  with pytest.raises(UserError, match='batch_size=0'):
    eval_batches([], batch_size=0, mean=(0.0,), std=(1.0,))


def test_steps_per_epoch(mnist):
  assert pipeline.steps_per_epoch(mnist, 128) == 31
  assert pipeline.steps_per_epoch(mnist, 10_000) == 1
