"""Tests for overfocus_jax/data/augmentation.py: torchvision's resized crop and colour jitter on both streams."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax import config as config_lib
from overfocus_jax.data import augmentation, on_device, pipeline
from overfocus_jax.data.sources import ArraySource, ImageDataset

from conftest import BASE_RUN_ARGS, assert_one_line_error, run_cli

RESIZED = augmentation.Policy(crop="resized", flip=True, color_jitter=0.4)


def torchvision_box(rng, height, width, scale, ratio):
  """torchvision 0.2x ``RandomResizedCrop.get_params``, transcribed with NumPy draws in our order."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect_ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("shape, scale, ratio", [((32, 32), (0.08, 1.0), (3 / 4, 4 / 3)),
                                                 ((20, 40), (0.5, 1.0), (0.2, 0.3)),    # falls back often
                                                 ((40, 20), (0.9, 1.0), (3.0, 4.0))])
def test_the_host_box_is_torchvisions(shape, scale, ratio):
  policy = augmentation.Policy(crop="resized", scale=scale, ratio=ratio)
  ours, theirs = np.random.default_rng(5), np.random.default_rng(5)
  for _ in range(200):
    assert augmentation.host_box(ours, *shape, policy) == torchvision_box(theirs, *shape, scale, ratio)


def test_device_boxes_fit_and_cover_the_scale_range():
  policy = augmentation.Policy(crop="resized", scale=(0.25, 0.5), ratio=(0.5, 2.0))
  boxes = np.asarray(augmentation.device_boxes(jax.random.PRNGKey(0), 4000, 16, 24, policy))
  top, left, h, w = boxes.T
  assert np.all((h > 0) & (w > 0) & (top >= 0) & (left >= 0) & (top + h <= 16) & (left + w <= 24))
  share = h * w / (16 * 24)
  assert 0.2 < share.min() < 0.3 and 0.45 < share.max() < 0.6  # rounding widens the range a little
  assert len({tuple(b) for b in boxes}) > 500
  never = augmentation.Policy(crop="resized", scale=(1.0, 1.0), ratio=(3.0, 3.0))  # no draw fits 16×24 at 3:1
  fallback = np.asarray(augmentation.device_boxes(jax.random.PRNGKey(1), 8, 16, 24, never))
  np.testing.assert_array_equal(fallback, np.tile(augmentation.central_box(16, 24, (3.0, 3.0)), (8, 1)))


def test_resized_crop_is_the_same_on_both_streams_and_exact_on_the_whole_image():
  image = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
  for box in [(0, 0, 12, 10), (2, 3, 5, 4), (0, 6, 12, 4), (11, 9, 1, 1)]:
    host = augmentation.resized_crop(image, box)
    device = augmentation.resized_crop(jnp.asarray(image), jnp.asarray(box), jnp)
    np.testing.assert_allclose(device, host, atol=1e-4)
  np.testing.assert_allclose(augmentation.resized_crop(image, (0, 0, 12, 10)), image)  # identity box
  one_pixel = augmentation.resized_crop(image, (11, 9, 1, 1))
  np.testing.assert_allclose(one_pixel, np.broadcast_to(image[11, 9], one_pixel.shape))
  # A 2× upscale of a box samples between its pixels: the first output row is the box's first row (clamped).
  half = augmentation.resized_crop(image, (0, 0, 6, 5))
  np.testing.assert_allclose(half[0, 0], image[0, 0])
  np.testing.assert_allclose(half[1, 2], (0.75 * image[0, 1] + 0.25 * image[1, 1]) * 0.75
                             + (0.75 * image[0, 0] + 0.25 * image[1, 0]) * 0.25, atol=1e-4)


def test_jitter_matches_its_formulas_on_both_streams():
  image = np.random.default_rng(1).integers(0, 256, (6, 7, 3)).astype(np.float32)
  factors = np.array([1.3, 0.6, 1.5], np.float32)
  expected = np.clip(image * 1.3, 0, 255)
  mean = (expected @ np.array(augmentation.GREY_WEIGHTS, np.float32)).mean()
  expected = np.clip((expected - mean) * 0.6 + mean, 0, 255)
  grey = (expected @ np.array(augmentation.GREY_WEIGHTS, np.float32))[..., None]
  expected = np.clip((expected - grey) * 1.5 + grey, 0, 255)
  np.testing.assert_allclose(augmentation.jitter(image, factors), expected, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(augmentation.jitter(jnp.asarray(image), jnp.asarray(factors), jnp), expected,
                             rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(augmentation.jitter(image, np.ones(3, np.float32)), image, atol=1e-4)  # factor 1: none
  grey_image = image[..., :1]
  out = augmentation.jitter(grey_image, factors)  # one channel: no saturation, the rest as for RGB
  bright = np.clip(grey_image * 1.3, 0, 255)
  np.testing.assert_allclose(out, np.clip((bright - bright.mean()) * 0.6 + bright.mean(), 0, 255), rtol=1e-5,
                             atol=1e-3)


def stats(batch):
  """Per-image mean and standard deviation of the pixels."""
  batch = np.asarray(batch, np.float32)
  return batch.mean(axis=(1, 2, 3)), batch.std(axis=(1, 2, 3))


def test_both_streams_draw_the_same_distribution():
  """A smooth image (a ramp), 512 times through each stream: the same spread of brightness and contrast."""
  ramp = np.linspace(0, 255, 16 * 16 * 3).reshape(16, 16, 3).astype(np.uint8)
  images = np.broadcast_to(ramp, (512, 16, 16, 3))
  rng = np.random.default_rng(0)
  host = np.stack([augmentation.host_augment(image, rng, RESIZED) for image in images])
  device = np.asarray(augmentation.device_augment(jnp.asarray(images), jax.random.PRNGKey(0), RESIZED))
  assert host.dtype == device.dtype == np.uint8 and host.shape == device.shape == images.shape
  for got, want in zip(stats(device), stats(host)):
    assert abs(np.mean(got) - np.mean(want)) < 0.1 * np.std(want) + 2
    assert 0.7 < np.std(got) / np.std(want) < 1.4
  assert len({image.tobytes() for image in host}) == 512  # every image its own crop and factors


def test_the_default_policy_is_unchanged_on_the_device():
  """The padded crop and the mirror draw from the same keys as before colour jitter existed."""
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
  key = jax.random.PRNGKey(4)
  crop_key, flip_key = jax.random.split(key)
  expected = augmentation.device_flip(augmentation.device_pad_crop(images, crop_key, 1), flip_key)
  policy = augmentation.make_policy((8, 8, 3), natural_images=True)
  np.testing.assert_array_equal(augmentation.device_augment(images, key, policy), expected)


def natural_dataset():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (96, 12, 12, 3), dtype=np.uint8)
  labels = np.arange(96) % 4
  return ImageDataset(name="toy", train=ArraySource(images, labels), test=ArraySource(images[:16], labels[:16]),
                      image_shape=(12, 12, 3), num_classes=4, natural_images=True, mean=(0.5,) * 3, std=(0.25,) * 3)


def test_the_streams_use_the_config_policy():
  dataset = natural_dataset()
  config = config_lib.build_config(None, [("augmentation.crop", "resized"), ("augmentation.color_jitter", "0.4")])
  policy = augmentation.make_policy(dataset.image_shape, dataset.natural_images, config.augmentation)
  assert policy == augmentation.Policy(crop="resized", padding=1, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), flip=True,
                                       color_jitter=0.4)
  plain = next(pipeline.make_train_iterator(dataset, batch_size=32, seed=0, augment=True, normalized=False))
  resized = next(pipeline.make_train_iterator(dataset, batch_size=32, seed=0, augment=True, normalized=False,
                                              augmentation=policy))
  np.testing.assert_array_equal(plain["label"], resized["label"])  # the same rows, differently augmented
  assert not np.array_equal(plain["image"], resized["image"])
  spec = on_device.stream_spec(dataset, batch_size=32, seed=0, augment=True, augmentation=policy)
  assert spec.policy == policy


def test_a_run_with_resized_crops_and_colour_jitter(tmp_path, capsys):
  code, out, err = run_cli(capsys, "train", "--workdir", tmp_path / "run", *BASE_RUN_ARGS, "--config.num_epochs=1",
                           "--config.augmentation.crop=resized", "--config.augmentation.color_jitter=0.4",
                           "--config.augmentation.scale=(0.5,1.0)")
  assert code == 0, err


@pytest.mark.parametrize("flag, fragment", [
    ("--config.augmentation.crop=random", "unknown augmentation.crop 'random'"),
    ("--config.augmentation.scale=(0.5,0.1)", "augmentation.scale=(0.5, 0.1) must be a range"),
    ("--config.augmentation.ratio=(0,1.0)", "augmentation.ratio=(0, 1.0) must be a range"),
    ("--config.augmentation.color_jitter=1.5", "color_jitter=1.5 must be a number in [0, 1]"),
])
def test_bad_augmentation_settings_are_one_line(tmp_path, capsys, flag, fragment):
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "run", *BASE_RUN_ARGS, flag)
  assert_one_line_error(code, err, fragment)
  assert not (tmp_path / "run").exists()
