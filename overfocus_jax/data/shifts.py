"""Datasets with a planted shortcut, to measure overfocusing.

``mnist5k_shortcut[:P]``: the mnist5k digits (same fixed 4,000/1,000 split) with a bright 3×3 patch stamped in
the empty border. In a training image the patch sits, with probability ``P`` (default 0.95), at the position that
encodes the label (10 positions, one per class: five along the top edge, five along the bottom), otherwise at a
position drawn uniformly from all 10. In a test image the position is drawn uniformly, independent of the label:
a network that learned the patch instead of the digit fails there. The same test digits without any patch are
``mnist5k``'s test split (``overfocus eval --dataset mnist5k``).

``mnist5k_color[:P]``: a second kind of shortcut, a colour cue instead of a position. The same digits become RGB,
their strokes tinted with one of 10 saturated hues (hue ``i/10`` of the HSV wheel, ``i`` the colour id): in a
training image the label's colour with probability ``P`` (default 0.95), otherwise a colour drawn uniformly from
all 10; in a test image a uniform colour, independent of the label. The clean counterpart is ``mnist5k_rgb``: the
same digits white on black in three channels (no colour says anything about the class). White strokes never occur
in training (every hue has a channel at 0), so accuracy there also measures a colour the network never saw — as the
patch's clean test shows digits without the patch no training image lacked. Both are normalised with the clean
digits' statistics, whatever ``P``. :func:`tint` works on the images of any source.

``mnist5k_glyph[:P]``: a third kind, a local mark whose *shape* is the cue. A 4×4 binary glyph (one of 10 fixed
patterns, :func:`class_glyphs`, any two differing in at least 6 of their 16 pixels) is stamped at full intensity in
one of the image's four corners (empty in mnist5k), the corner drawn uniformly for every image, train and test alike,
so that the place says nothing (:func:`glyph_corners`): in a training image the glyph is the label's with
probability ``P``, otherwise one drawn uniformly; in a test image a uniform one. Unlike the patch (a position code,
which a network reads from *where* the activation is) and the colour (in every stroke pixel), the cue is a small
texture beside the digit: local, as overfocusing is, and never in the same place. Clean test: ``mnist5k``.
"""

import colorsys

import numpy as np

from overfocus_jax.errors import UserError

PATCH_SIZE = 3
PATCH_VALUE = 255
NUM_POSITIONS = 10
DEFAULT_CORRELATION = 0.95
_SHORTCUT_SEED = 1  # fixed: every run sees the same patched images


def patch_positions(height: int, width: int) -> np.ndarray:
  """(10, 2) top-left (row, col) corners: classes 0–4 along the top edge, 5–9 along the bottom edge."""
  cols = np.linspace(1, width - PATCH_SIZE - 1, 5).round().astype(int)
  top, bottom = 0, height - PATCH_SIZE
  return np.array([(top, c) for c in cols] + [(bottom, c) for c in cols])


def stamp_patches(images: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
  """Copies ``images`` (N, H, W, C) uint8 with a bright square at ``patch_positions()[position_ids]``."""
  out = np.array(images, copy=True)
  corners = patch_positions(*images.shape[1:3])[position_ids]
  for image, (row, col) in zip(out, corners):
    image[row:row + PATCH_SIZE, col:col + PATCH_SIZE, :] = PATCH_VALUE
  return out


def shortcut_position_ids(labels: np.ndarray, correlation: float, rng: np.random.Generator) -> np.ndarray:
  """The label's position with probability ``correlation``, else a uniform one of the 10."""
  random_ids = rng.integers(0, NUM_POSITIONS, size=len(labels))
  follows_label = rng.random(len(labels)) < correlation
  return np.where(follows_label, labels % NUM_POSITIONS, random_ids)


def parse_correlation(spec: str, argument: str) -> float:
  if not argument:
    return DEFAULT_CORRELATION
  try:
    value = float(argument)
  except ValueError:
    value = -1.0
  if not 0 <= value <= 1:
    kind = spec.partition(":")[0]
    raise UserError(f"dataset {spec!r}: the shortcut correlation must be a number in [0, 1]",
                    f"write it as {kind}:0.95")
  return value


def shortcut_position_plan(train_labels: np.ndarray, num_test: int, correlation: float):
  """``(train_ids, test_ids)``: where the patch goes in each image, from the fixed seed (the same every call)."""
  rng = np.random.default_rng(_SHORTCUT_SEED)
  train_ids = shortcut_position_ids(train_labels, correlation, rng)
  test_ids = rng.integers(0, NUM_POSITIONS, size=num_test)
  return train_ids, test_ids


def stamp_shortcut(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                   correlation: float) -> tuple[np.ndarray, np.ndarray]:
  """``(train_images, test_images)`` with the patch planted as described in the module docstring (copies)."""
  train_ids, test_ids = shortcut_position_plan(train_labels, len(test_images), correlation)
  return stamp_patches(train_images, train_ids), stamp_patches(test_images, test_ids)


def class_colors() -> np.ndarray:
  """(10, 3) float RGB in [0, 1]: hue i/10 at full saturation and value, one per colour id."""
  return np.array([colorsys.hsv_to_rgb(i / NUM_POSITIONS, 1.0, 1.0) for i in range(NUM_POSITIONS)])


def grey_rgb(images: np.ndarray) -> np.ndarray:
  """(N, H, W, C) uint8 → (N, H, W, 3) uint8: the mean over channels in each of R, G, B (white strokes)."""
  grey = np.mean(np.asarray(images, np.float64), axis=-1, keepdims=True)
  return np.repeat(np.round(grey), 3, axis=-1).astype(np.uint8)


def tint(images: np.ndarray, color_ids: np.ndarray) -> np.ndarray:
  """(N, H, W, C) uint8 → (N, H, W, 3) uint8: each image's intensity times its colour, ``class_colors()[id]``."""
  grey = np.mean(np.asarray(images, np.float64), axis=-1, keepdims=True)
  return np.round(grey * class_colors()[color_ids][:, None, None, :]).astype(np.uint8)


def tint_shortcut(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                  correlation: float) -> tuple[np.ndarray, np.ndarray]:
  """``(train_images, test_images)`` in RGB with the colour cue of the module docstring (same seeded plan as the
  patch: colour id ``i`` plays the role of position ``i``)."""
  train_ids, test_ids = shortcut_position_plan(train_labels, len(test_images), correlation)
  return tint(train_images, train_ids), tint(test_images, test_ids)


GLYPH_SIZE = 4
GLYPH_MIN_DISTANCE = 6  # pixels in which any two class glyphs differ


def class_glyphs() -> np.ndarray:
  """(10, 4, 4) bool: one pattern per glyph id, half of its pixels on, any two at Hamming distance ≥ 6, drawn once
  from the fixed seed (the same on every call)."""
  rng = np.random.default_rng(_SHORTCUT_SEED)
  glyphs = []
  while len(glyphs) < NUM_POSITIONS:
    candidate = rng.permutation(GLYPH_SIZE * GLYPH_SIZE) < GLYPH_SIZE * GLYPH_SIZE // 2
    if all(np.sum(candidate != other) >= GLYPH_MIN_DISTANCE for other in glyphs):
      glyphs.append(candidate)
  return np.stack(glyphs).reshape(NUM_POSITIONS, GLYPH_SIZE, GLYPH_SIZE)


def glyph_corners(height: int, width: int, count: int, rng: np.random.Generator) -> np.ndarray:
  """(count, 2) top-left (row, col) corners of a glyph in one of the image's four corners, drawn uniformly.

  Corners, not anywhere along the border ring: there ERM ignores the glyph, and there is no shortcut to measure
  (``docs/guide/data.md``, "The shortcut datasets")."""
  corner = rng.integers(0, 4, size=count)
  rows = np.where(corner < 2, 0, height - GLYPH_SIZE)
  cols = np.where(corner % 2 == 0, 0, width - GLYPH_SIZE)
  return np.stack([rows, cols], axis=1)


def stamp_glyphs(images: np.ndarray, glyph_ids: np.ndarray, corners: np.ndarray) -> np.ndarray:
  """Copies ``images`` (N, H, W, C) uint8 with glyph ``glyph_ids[i]`` at ``corners[i]``: its on pixels at
  ``PATCH_VALUE``, its off pixels left as they were."""
  out = np.array(images, copy=True)
  glyphs = class_glyphs()
  for image, glyph_id, (row, col) in zip(out, glyph_ids, corners):
    window = image[row:row + GLYPH_SIZE, col:col + GLYPH_SIZE, :]
    window[glyphs[glyph_id]] = PATCH_VALUE
  return out


def glyph_shortcut(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                   correlation: float) -> tuple[np.ndarray, np.ndarray]:
  """``(train_images, test_images)`` with the glyph cue of the module docstring (copies): which glyph follows the
  patch's seeded plan (glyph ``i`` plays the role of position ``i``); where, a second seeded draw, label-blind."""
  train_ids, test_ids = shortcut_position_plan(train_labels, len(test_images), correlation)
  rng = np.random.default_rng(_SHORTCUT_SEED + 1)
  height, width = train_images.shape[1:3]
  train_corners = glyph_corners(height, width, len(train_images), rng)
  test_corners = glyph_corners(height, width, len(test_images), rng)
  return stamp_glyphs(train_images, train_ids, train_corners), stamp_glyphs(test_images, test_ids, test_corners)
