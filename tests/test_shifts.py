"""The shortcut datasets (patch, colour, glyph): where the cue goes, how often it follows the label, and that the plan
reproduces it."""

import numpy as np
import pytest

from overfocus_jax.data import shifts
from overfocus_jax.data.sources import load_dataset
from overfocus_jax.errors import UserError


def test_patch_positions_are_ten_distinct_border_squares():
  positions = shifts.patch_positions(28, 28)
  assert positions.shape == (10, 2) and len({tuple(p) for p in positions}) == 10
  rows = positions[:, 0]
  assert set(rows[:5]) == {0} and set(rows[5:]) == {28 - shifts.PATCH_SIZE}
  assert np.all(positions[:, 1] >= 0) and np.all(positions[:, 1] + shifts.PATCH_SIZE <= 28)
  # No two patches overlap along a row.
  cols = np.sort(positions[:5, 1])
  assert np.all(np.diff(cols) >= shifts.PATCH_SIZE)


def test_stamp_patches_sets_exactly_the_square():
  images = np.zeros((2, 28, 28, 1), np.uint8)
  out = shifts.stamp_patches(images, np.asarray([0, 7]))
  assert images.sum() == 0  # the input is copied, not changed
  for image, (row, col) in zip(out, shifts.patch_positions(28, 28)[[0, 7]]):
    assert np.all(image[row:row + 3, col:col + 3] == shifts.PATCH_VALUE)
    assert image.sum() == 9 * shifts.PATCH_VALUE


def test_shortcut_dataset_follows_its_plan():
  clean = load_dataset("mnist5k")
  shortcut = load_dataset("mnist5k_shortcut")
  train_ids, test_ids = shifts.shortcut_position_plan(clean.train.labels, len(clean.test), 0.95)
  np.testing.assert_array_equal(shortcut.train.images, shifts.stamp_patches(clean.train.images, train_ids))
  np.testing.assert_array_equal(shortcut.test.images, shifts.stamp_patches(clean.test.images, test_ids))
  follows = np.mean(train_ids == clean.train.labels % 10)
  assert 0.94 < follows < 0.97  # 95% by construction, plus the 1-in-10 random draws that land on the label
  assert abs(np.mean(test_ids == clean.test.labels % 10) - 0.1) < 0.03  # independent of the label in test


@pytest.mark.parametrize("spec", ["mnist5k_shortcut:1.5", "mnist5k_shortcut:abc"])
def test_bad_correlation_is_a_user_error(spec):
  with pytest.raises(UserError, match="correlation must be a number in"):
    load_dataset(spec)


def test_tint_colours_the_strokes_and_keeps_the_intensity():
  images = np.zeros((2, 4, 4, 1), np.uint8)
  images[:, 1, 2, 0] = 200
  out = shifts.tint(images, np.asarray([0, 5]))
  assert out.shape == (2, 4, 4, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, 1, 2], [200, 0, 0])    # hue 0: red
  np.testing.assert_array_equal(out[1, 1, 2], [0, 200, 200])  # hue 0.5: cyan
  assert out.sum(axis=-1)[images[..., 0] == 0].max() == 0       # the background stays black
  assert len({tuple(c) for c in np.round(shifts.class_colors(), 3)}) == 10


def test_color_shortcut_dataset_follows_its_plan_and_rgb_is_its_clean_counterpart():
  clean = load_dataset("mnist5k")
  color = load_dataset("mnist5k_color")
  rgb = load_dataset("mnist5k_rgb")
  assert color.image_shape == rgb.image_shape == (28, 28, 3)
  train_ids, test_ids = shifts.shortcut_position_plan(clean.train.labels, len(clean.test), 0.95)
  np.testing.assert_array_equal(color.train.images, shifts.tint(clean.train.images, train_ids))
  np.testing.assert_array_equal(color.test.images, shifts.tint(clean.test.images, test_ids))
  np.testing.assert_array_equal(rgb.test.images, np.repeat(clean.test.images, 3, axis=-1))
  np.testing.assert_array_equal(color.test.labels, clean.test.labels)
  assert 0.94 < np.mean(train_ids == clean.train.labels % 10) < 0.97


@pytest.mark.parametrize("spec", ["mnist5k_color:2", "mnist5k_color:x"])
def test_bad_colour_correlation_is_a_user_error(spec):
  with pytest.raises(UserError, match=r"correlation must be a number in \[0, 1\]; write it as mnist5k_color:0.95"):
    load_dataset(spec)


def test_class_glyphs_are_ten_fixed_distinct_half_on_patterns():
  glyphs = shifts.class_glyphs()
  assert glyphs.shape == (10, 4, 4) and glyphs.dtype == bool
  assert np.all(glyphs.sum(axis=(1, 2)) == 8)
  distances = [np.sum(glyphs[i] != glyphs[j]) for i in range(10) for j in range(i + 1, 10)]
  assert min(distances) >= shifts.GLYPH_MIN_DISTANCE
  np.testing.assert_array_equal(glyphs, shifts.class_glyphs())  # the same every call


def test_glyph_corners_are_the_four_corners_each_a_quarter_of_the_time():
  corners = shifts.glyph_corners(28, 28, 4000, np.random.default_rng(0))
  places, counts = np.unique(corners, axis=0, return_counts=True)
  np.testing.assert_array_equal(places, [[0, 0], [0, 24], [24, 0], [24, 24]])
  assert np.all(np.abs(counts / 4000 - 0.25) < 0.03)


def test_stamp_glyphs_sets_exactly_the_glyphs_pixels():
  images = np.zeros((2, 28, 28, 1), np.uint8)
  corners = np.array([[0, 5], [24, 24]])
  out = shifts.stamp_glyphs(images, np.asarray([3, 8]), corners)
  assert images.sum() == 0  # the input is copied, not changed
  for image, glyph_id, (row, col) in zip(out, (3, 8), corners):
    window = image[row:row + 4, col:col + 4, 0]
    np.testing.assert_array_equal(window == shifts.PATCH_VALUE, shifts.class_glyphs()[glyph_id])
    assert image.sum() == 8 * shifts.PATCH_VALUE


def test_glyph_shortcut_dataset_follows_its_plan_and_its_place_is_label_blind():
  clean = load_dataset("mnist5k")
  glyph = load_dataset("mnist5k_glyph")
  assert glyph.image_shape == clean.image_shape and glyph.mean == clean.mean
  train_ids, test_ids = shifts.shortcut_position_plan(clean.train.labels, len(clean.test), 0.95)
  np.testing.assert_array_equal(glyph.train.labels, clean.train.labels)
  # Every image is marked, in the border ring only.
  changed = glyph.train.images[..., 0] != clean.train.images[..., 0]
  assert changed.any(axis=(1, 2)).mean() > 0.99  # (a glyph on a stroke that reaches the corner may change nothing)
  in_corners = np.zeros((28, 28), bool)
  for rows in (slice(0, 4), slice(24, 28)):
    for cols in (slice(0, 4), slice(24, 28)):
      in_corners[rows, cols] = True
  assert not changed[:, ~in_corners].any()
  rebuilt_train, rebuilt_test = shifts.glyph_shortcut(clean.train.images, clean.train.labels, clean.test.images, 0.95)
  np.testing.assert_array_equal(glyph.train.images, rebuilt_train)
  np.testing.assert_array_equal(glyph.test.images, rebuilt_test)
  assert 0.94 < np.mean(train_ids == clean.train.labels % 10) < 0.97
  # The corner is drawn apart from the label: every class has its glyph at the top about half of the time.
  at_top = changed[:, :4].any(axis=(1, 2))
  by_class = [at_top[clean.train.labels == c].mean() for c in range(10)]
  assert np.all(np.abs(np.asarray(by_class) - 0.5) < 0.1), by_class


@pytest.mark.parametrize("spec", ["mnist5k_glyph:2", "mnist5k_glyph:x"])
def test_bad_glyph_correlation_is_a_user_error(spec):
  with pytest.raises(UserError, match=r"correlation must be a number in \[0, 1\]; write it as mnist5k_glyph:0.95"):
    load_dataset(spec)
