"""Data on the device (overfocus_jax/data/on_device.py): the epoch orders, the augmentation (the host pipeline's,
drawn from the JAX PRNG), normalization, the batch of a step as a function of the step alone, and evaluation on a
device-resident split equal to the host's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax import models, parallel
from overfocus_jax.data import augmentation, on_device, pipeline
from overfocus_jax.data.sources import ArraySource, ImageDataset, load_dataset
from overfocus_jax.errors import UserError
from overfocus_jax.train import evaluation, experiment, streams

from conftest import DIGITS_TRAIN, tiny_config


@pytest.fixture(scope="module")
def digits():
  return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_split(digits):
  return on_device.put_split(digits.train, parallel.replicated(parallel.make_mesh()))


def spec_for(dataset, **fields):
  return on_device.stream_spec(dataset, **{"batch_size": 64, "seed": 0, "augment": True, **fields})


def test_every_epoch_visits_each_example_once_in_its_own_order(digits):
  spec = spec_for(digits)
  key = on_device.stream_keys(0)[0]
  orders = [on_device.epoch_order(key, jnp.int32(e), DIGITS_TRAIN) for e in range(2)]
  for order in orders:
    rows = np.concatenate([np.asarray(on_device.step_rows(order, jnp.int32(t), spec))
                           for t in range(spec.steps_per_epoch)])
    assert len(rows) == spec.steps_per_epoch * 64 and len(set(rows.tolist())) == len(rows)  # no repeats
  assert not np.array_equal(orders[0], orders[1])
  np.testing.assert_array_equal(orders[1], on_device.epoch_order(key, jnp.int32(1), DIGITS_TRAIN))  # deterministic
  assert not np.array_equal(orders[0], on_device.epoch_order(on_device.stream_keys(1)[0], jnp.int32(0),
                                                             DIGITS_TRAIN))  # the seed matters


def test_random_crop_is_a_zero_filled_shift_of_at_most_the_padding():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, size=(64, 8, 8, 2), dtype=np.uint8)  # no zero pixels: the fill shows
  cropped = np.asarray(augmentation.device_pad_crop(jnp.asarray(images), jax.random.PRNGKey(3), 2))
  shifts = set()
  for image, out in zip(images, cropped):
    matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if np.array_equal(out, shifted(image, dy, dx))]
    assert len(matches) == 1, "not a zero-filled shift"
    shifts.add(matches[0])
  assert len(shifts) > 10  # offsets are drawn per image


def shifted(image, dy, dx):
  """``out[y, x] = image[y + dy, x + dx]`` with zeros outside (augmentation.pad_crop's definition)."""
  out = np.zeros_like(image)
  h, w = image.shape[:2]
  for y in range(h):
    for x in range(w):
      if 0 <= y + dy < h and 0 <= x + dx < w:
        out[y, x] = image[y + dy, x + dx]
  return out


def test_flip_mirrors_about_half_and_only_natural_images_are_flipped():
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, size=(400, 4, 6, 3), dtype=np.uint8))
  flipped = np.asarray(augmentation.device_flip(images, jax.random.PRNGKey(0)))
  mirrored = np.all(flipped == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(flipped == np.asarray(images), axis=(1, 2, 3))
  assert np.all(mirrored | kept) and 150 < mirrored.sum() < 250
  digits_like = augmentation.device_augment(images, jax.random.PRNGKey(0), augmentation.Policy(padding=0, flip=False))
  np.testing.assert_array_equal(digits_like, images)  # padding 0 and no flip: the identity


def test_normalize_matches_the_host_pipeline():
  images = np.random.default_rng(2).integers(0, 256, size=(5, 4, 4, 3), dtype=np.uint8)
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
  np.testing.assert_allclose(on_device.normalize(jnp.asarray(images), mean, std),
                             pipeline.normalize(images, mean, std), rtol=1e-6, atol=1e-6)


def test_a_steps_batch_depends_on_the_step_alone():
  """What makes resuming exact: step t's batch from a stream that has run since step 0 equals the one from a fresh
  stream (a resumed run) that starts at step t, also across the epoch whose order the stream keeps."""
  exp = experiment.build_experiment(tiny_config())
  build = lambda stream, step: stream.feed(stream.chunk_data(step, 1), jnp.int32(step), 0)
  ran, fresh = streams.DeviceStream(exp), streams.DeviceStream(exp)
  steps = exp.steps_per_epoch
  for step in range(0, steps + 4, 3):  # through epoch 0 into epoch 1
    build(ran, step)
  for step in (steps + 3, 5, 2 * steps + 1):
    first, again = build(ran, step), build(fresh, step)
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["label"], again["label"])
  assert first["image"].dtype == jnp.float32 and first["label"].dtype == jnp.int32
  assert first["image"].shape == (64, 8, 8, 1)
  assert not np.array_equal(build(fresh, 5)["label"], build(fresh, 6)["label"])


def test_without_augmentation_the_batch_is_the_normalized_rows(digits, digits_split):
  spec = spec_for(digits, augment=False)
  order = on_device.epoch_order(on_device.stream_keys(0)[0], jnp.int32(0), DIGITS_TRAIN)
  batch = on_device.train_batch(digits_split, jnp.int32(2), order, spec)
  rows = np.asarray(order[128:192])
  images, labels = pipeline.read_split(digits.train)
  np.testing.assert_array_equal(batch["label"], labels[rows])
  np.testing.assert_allclose(batch["image"], pipeline.normalize(images[rows], digits.mean, digits.std), atol=1e-6)


def test_the_device_stream_refuses_what_the_host_pipeline_refuses(digits):
  with pytest.raises(UserError, match="fewer than batch_size"):
    spec_for(digits, batch_size=DIGITS_TRAIN + 1)
  with pytest.raises(UserError, match="seed"):
    spec_for(digits, seed=-1)


def test_padded_eval_batches_cover_every_example_once():
  split = on_device.Split(images=jnp.arange(10, dtype=jnp.uint8).reshape(10, 1, 1, 1),
                          labels=jnp.arange(10, dtype=jnp.int32))
  batches, mask = on_device.padded_eval_batches(split, 4)
  assert batches.images.shape == (3, 4, 1, 1, 1) and mask.shape == (3, 4)
  np.testing.assert_array_equal(batches.labels.reshape(-1), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9])
  np.testing.assert_array_equal(mask.reshape(-1), [1] * 10 + [0, 0])


def test_resident_evaluation_equals_host_batches():
  config = tiny_config(eval_batch_size=48)  # 359 test digits: a padded last batch
  exp = experiment.build_experiment(config)
  host = evaluation.make_evaluator(exp, exp.dataset.test, resident=False)(exp.state)
  resident = evaluation.make_evaluator(exp, exp.dataset.test, resident=True)(exp.state)
  assert resident["n"] == host["n"] == len(exp.dataset.test)
  np.testing.assert_allclose(resident["accuracy"], host["accuracy"], atol=1e-9)
  np.testing.assert_allclose(resident["loss"], host["loss"], rtol=1e-5)


class Accelerator:
  """Stands for one GPU with 80 GB in ``on_device.resolve`` (its platform and memory are all it reads)."""

  platform = "gpu"

  def memory_stats(self):
    return {"bytes_limit": 80 * 2**30}


class AcceleratorMesh:
  local_devices = [Accelerator()]


def test_auto_keeps_data_on_an_accelerator_when_it_fits_and_on_a_cpu_for_the_listed_models(digits):
  mesh = parallel.make_mesh()
  assert not on_device.resolve("auto", digits, mesh)  # no model named: grain's threads beside the step on this CPU
  assert [name for name, spec in models.REGISTRY.items() if spec.platform.data_on_device] == ["resnet", "vgg16"]
  assert on_device.resolve("auto", digits, mesh, prefer_on_cpu=True)
  assert on_device.resolve("auto", digits, AcceleratorMesh()) and on_device.resolve("auto", digits, AcceleratorMesh(),
                                                                                    prefer_on_cpu=False)
  assert on_device.resolve("on", digits, mesh) and not on_device.resolve("off", digits, mesh)

  class Huge(ArraySource):
    def __len__(self):
      return 10**9  # a billion 8×8 images: 68 GB

  big = ImageDataset("huge", Huge(np.zeros((1, 8, 8, 1)), np.zeros(1)), digits.test, (8, 8, 1), 10, False,
                     digits.mean, digits.std)
  assert not on_device.resolve("auto", big, AcceleratorMesh())  # 68 GB: more than a quarter of 80 GB
  with pytest.raises(UserError, match=r"data_on_device=on: the dataset takes .* GiB, more than"):
    on_device.resolve("on", big, mesh)
