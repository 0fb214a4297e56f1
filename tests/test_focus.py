"""Tests for overfocus_jax.models.patches and overfocus_jax.models.focus: bilinear patches (x is the column), their
gradients in the keypoints, Harris corners and NMS, the two focus models' split, shapes and training, and the
one-line errors of their config groups."""

import json
import unittest.mock
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.ndimage import map_coordinates

from overfocus_jax.errors import UserError
from overfocus_jax.models import build_model, focus
from overfocus_jax.models import check_fits_images as check_model_fits
from overfocus_jax.models.patches import extract_patches, normalized_to_pixel, pixel_to_normalized, sample_offsets
from overfocus_jax.train.step import cross_entropy

from conftest import (abstract_variables, assert_one_line_error, assert_split_is_exact, digits_config, fit_one_batch,
                      run_cli)

# A tiny patch classifier for 8×8 inputs: 2 keypoints, 4×4 patches, one conv layer of 4 channels, D = 8.
TINY_FOCUS = dict(focus__num_keypoints=2, focus__patch_size=4, focus__patch_scale=0.5, focus__keypoint_widths=(4,),
                  focus__patch_widths=(4,), focus__feature_width=8, focus__hidden=16, corner__nms_radius=1,
                  corner__border=1)
TINY_FOCUS_ARGS = tuple(f"--config.{k.replace('__', '.')}={v!r}".replace(" ", "") for k, v in TINY_FOCUS.items())


def make_config(model, **fields):
  return digits_config(model, **{**TINY_FOCUS, **fields})


def make_model(model, num_classes=10, **fields):
  return build_model(make_config(model, **fields), num_classes)


def pixel(x_norm, size):
  return float(normalized_to_pixel(jnp.asarray(x_norm), size))


# ----------------------------------------------------------------------------- patches


def ramp_image(height=5, width=7):
  """image[r, c] = 10·r + c: not symmetric, so an x/y swap shows."""
  rows, cols = np.mgrid[:height, :width]
  return jnp.asarray((10 * rows + cols)[None, :, :, None], jnp.float32)


def test_patch_centred_on_a_pixel_is_the_crop_around_it():
  # scale = P / side samples at the image's own resolution: the crop of rows 1..3 and columns 4..6.
  image = ramp_image(8, 8)
  patch = extract_patches(image, jnp.array([[[pixel_to_normalized(5, 8), pixel_to_normalized(2, 8)]]]), 3, 3 / 8)
  np.testing.assert_allclose(patch[0, 0], image[0, 1:4, 4:7], atol=1e-5)  # swapped x/y would give [4:7, 1:4]
  # A non-square image: the scale applies to each side, so rows are sampled every 5/7 of a pixel here.
  image = ramp_image(5, 7)
  patch = extract_patches(image, jnp.array([[[pixel_to_normalized(4, 7), pixel_to_normalized(1, 5)]]]), 3, 3 / 7)
  np.testing.assert_allclose(patch[0, 0, 1, :, 0], [13, 14, 15], atol=1e-5)  # the middle row is image row 1
  np.testing.assert_allclose(patch[0, 0, :, 1, 0], 14 + 10 * (5 / 7) * np.array([-1, 0, 1]), atol=1e-4)


def test_patch_shapes_and_zeros_outside_the_image():
  images = jnp.ones((2, 6, 9, 3))
  centers = jnp.array([[[0.0, 0.0], [5.0, 5.0], [-1.0, -1.0]], [[0.3, -0.2], [-5.0, 0.0], [1.0, 1.0]]])
  patches = extract_patches(images, centers, 4, 0.25)
  chex.assert_shape(patches, (2, 3, 4, 4, 3))
  np.testing.assert_allclose(patches[0, 0], 1.0, atol=1e-6)
  np.testing.assert_array_equal(patches[0, 1], 0.0)   # far outside: all zeros
  np.testing.assert_array_equal(patches[1, 1], 0.0)
  corner = np.asarray(patches[0, 2, ..., 0])           # centred on the top-left corner: a quarter is inside
  assert corner[0, 0] == 0 and corner[-1, -1] == pytest.approx(1.0) and 0 < corner.mean() < 0.5


def test_patches_equal_map_coordinates_order_one():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 6, 9, 2)), jnp.float32)
  centers = jnp.asarray(rng.uniform(-1.2, 1.2, size=(2, 3, 2)), jnp.float32)
  patches = extract_patches(images, centers, 5, 0.3)
  offsets = sample_offsets(5, 0.3)
  for b in range(2):
    for k in range(3):
      rows = normalized_to_pixel(centers[b, k, 1] + offsets, 6)
      cols = normalized_to_pixel(centers[b, k, 0] + offsets, 9)
      grid = jnp.meshgrid(rows, cols, indexing="ij")
      for c in range(2):
        expected = map_coordinates(images[b, ..., c], grid, order=1, mode="constant", cval=0.0)
        np.testing.assert_allclose(patches[b, k, ..., c], expected, atol=1e-5)


def central_differences(loss, x, eps=1e-6):
  """d loss / d x by central differences, one entry of x at a time (run in float64)."""
  numeric = np.zeros(x.shape)
  for index in np.ndindex(*x.shape):
    step = jnp.zeros_like(x).at[index].set(eps)
    numeric[index] = (loss(x + step) - loss(x - step)) / (2 * eps)
  return numeric


def test_patch_gradient_in_the_centres_matches_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(2, 7, 9, 2)))
    weights = jnp.asarray(rng.normal(size=(2, 3, 4, 4, 2)))
    centers = jnp.asarray(rng.uniform(-0.8, 0.8, size=(2, 3, 2)))
    loss = jax.jit(lambda c: jnp.sum(jnp.tanh(extract_patches(images, c, 4, 0.4)) * weights))
    grad = np.asarray(jax.grad(loss)(centers))
    numeric = central_differences(loss, centers)
    assert np.all(np.abs(grad) > 0)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)
    # At a whole pixel (where bilinear weights have a kink) the gradient is the one-sided difference, not garbage:
    # on image[r, c] = 10r + c, d(sum of a 1-sample patch)/dx = 1 pixel per 2/W of x.
    image = ramp_image().astype(jnp.float64)
    at_pixel = jnp.array([[[pixel_to_normalized(3, 7), pixel_to_normalized(2, 5)]]])
    grad = jax.grad(lambda c: extract_patches(image, c, 1, 0.1).sum())(at_pixel)
    np.testing.assert_allclose(grad[0, 0], [7 / 2, 10 * 5 / 2], rtol=1e-9)


def test_per_patch_scales_equal_one_call_per_scale_and_get_exact_gradients():
  """A (B, K) scale array samples each patch at its own size; the samples are differentiable in the scales."""
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(2, 7, 9, 2)), jnp.float32)
  centers = jnp.asarray(rng.uniform(-0.6, 0.6, size=(2, 3, 2)), jnp.float32)
  scales = jnp.asarray([[0.2, 0.35, 0.5], [0.45, 0.3, 0.25]], jnp.float32)
  patches = extract_patches(images, centers, 4, scales)
  for b in range(2):
    for k in range(3):
      alone = extract_patches(images[b:b + 1], centers[b:b + 1, k:k + 1], 4, float(scales[b, k]))
      np.testing.assert_allclose(patches[b, k], alone[0, 0], atol=1e-6)
  np.testing.assert_allclose(extract_patches(images, centers, 4, jnp.full((2, 3), 0.3)),
                             extract_patches(images, centers, 4, 0.3), atol=1e-6)
  with jax.enable_x64(True):
    images, centers = images.astype(jnp.float64), centers.astype(jnp.float64)
    weights = jnp.asarray(rng.normal(size=(2, 3, 4, 4, 2)))
    loss = jax.jit(lambda s: jnp.sum(jnp.tanh(extract_patches(images, centers, 4, s)) * weights))
    scales = scales.astype(jnp.float64)
    grad = np.asarray(jax.grad(loss)(scales))
    assert np.all(np.abs(grad) > 0)
    np.testing.assert_allclose(grad, central_differences(loss, scales), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- Harris corners and NMS


def rectangle_image(height=20, width=24, top=4, bottom=15, left=4, right=19):
  """A bright rectangle on black, rows top..bottom and columns left..right inclusive (wider than tall)."""
  image = np.zeros((1, height, width, 1), np.float32)
  image[0, top:bottom + 1, left:right + 1] = 1.0
  return jnp.asarray(image)


def test_harris_finds_the_four_corners_of_a_rectangle():
  image = rectangle_image()
  points = focus.harris_keypoints(image, 4, harris_k=0.05, sigma=1.0, nms_radius=2, border=2)
  cols = normalized_to_pixel(points[0, :, 0], 24)
  rows = normalized_to_pixel(points[0, :, 1], 20)
  found = sorted(zip(np.asarray(rows).tolist(), np.asarray(cols).tolist()))
  expected = sorted([(4, 4), (4, 19), (15, 4), (15, 19)])
  for (row, col), (want_row, want_col) in zip(found, expected):
    assert abs(row - want_row) <= 1.5 and abs(col - want_col) <= 1.5, (found, expected)
  # An edge is not a corner, and a flat area gives nothing: R < 0 mid-edge, ≈ 0 inside.
  response = focus.harris_response(image[..., 0])
  assert response[0, 4, 11] < 0 and abs(response[0, 10, 11]) < 1e-9 and response[0, 4, 4] > 0


def test_non_max_suppression_keeps_isolated_local_maxima_even_on_plateaus():
  rng = np.random.default_rng(0)
  response = jnp.asarray(rng.normal(size=(2, 15, 17)), jnp.float32)
  response = response.at[1, 4:9, 4:9].set(5.0)  # a plateau of equal maxima
  for radius in (1, 2, 3):
    kept = np.asarray(focus.non_max_suppression(response, radius))
    for b in range(2):
      points = np.argwhere(kept[b] > 0)
      assert len(points) > 0
      gaps = np.abs(points[:, None, :] - points[None, :, :]).max(-1)
      assert gaps[~np.eye(len(points), dtype=bool)].min() > radius  # no two within the window
      for r, c in points:  # each kept value is its window's maximum, and the value is unchanged
        window = np.asarray(response[b, max(r - radius, 0):r + radius + 1, max(c - radius, 0):c + radius + 1])
        assert kept[b, r, c] == response[b, r, c] == window.max()
    # A plateau keeps only its first pixel in raster order: the others lose ties to a neighbour, in a chain.
    assert (kept[1, 4:9, 4:9] > 0).sum() == 1 and kept[1, 4, 4] == 5.0
  np.testing.assert_array_equal(focus.non_max_suppression(-jnp.abs(response), 1), 0.0)  # only positive responses


def test_top_k_corners_order_border_and_fallback():
  response = jnp.zeros((2, 6, 8)).at[0, 1, 6].set(3.0).at[0, 4, 2].set(2.0).at[0, 0, 0].set(9.0)
  points = focus.top_k_corners(response, 3, border=1)
  # Strongest first; (0, 0) is in the border; x is the column: column 6 → x = 13/8 − 1.
  np.testing.assert_allclose(points[0], [[13 / 8 - 1, 3 / 6 - 1], [5 / 8 - 1, 9 / 6 - 1], [0, 0]], atol=1e-6)
  np.testing.assert_array_equal(points[1], 0.0)  # nothing positive: the centre
  with_border = focus.top_k_corners(response, 1, border=0)
  np.testing.assert_allclose(with_border[0, 0], [1 / 8 - 1, 1 / 6 - 1], atol=1e-6)


# ----------------------------------------------------------------------------- the models


@pytest.mark.parametrize("name", ["focus", "corner"])
@pytest.mark.parametrize("input_shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_output_shapes(name, input_shape):
  model = make_model(name, num_classes=7, focus__num_keypoints=3)
  variables = jax.eval_shape(lambda key: model.init(key, input_shape), jax.random.PRNGKey(0))
  x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
  for train in (False, True):
    z, _ = jax.eval_shape(lambda v, x: model.encode(v, x, train=train), variables, x)
    logits, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=train), variables, x)
    chex.assert_shape(z, (2, 1, 3, 8))
    chex.assert_shape(logits, (2, 7))
    assert logits.dtype == jnp.float32
  points = jax.eval_shape(model.keypoints, variables, x)
  chex.assert_shape(points, (2, 3, 2))
  assert model.attention_maps(variables, x) is None


@pytest.fixture(scope="module")
def focus_model():
  model = make_model("focus", focus__num_keypoints=4)
  variables = jax.jit(lambda key: model.init(key, (8, 8, 1)))(jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 1))
  return model, variables, x


def test_focus_split_equals_apply_and_each_half_keeps_its_batch_stats(focus_model):
  state, z, encode_state, classify_state = assert_split_is_exact(*focus_model)
  assert set(encode_state["batch_stats"]) == {"encoder"} and classify_state == {"batch_stats": {}}
  assert set(state["batch_stats"]) == {"encoder"}  # the head has no batch norm
  assert np.all(np.asarray(z) >= 0)  # post-ReLU features: a dropped patch reads as "nothing there"


def test_focus_keypoints_start_spread_on_a_grid_inside_the_image(focus_model):
  model, variables, x = focus_model
  points = np.asarray(model.keypoints(variables, x))
  chex.assert_shape(points, (6, 4, 2))
  np.testing.assert_allclose(points, np.broadcast_to(points[:1], points.shape), atol=1e-6)  # zero kernel at init
  np.testing.assert_allclose(points[0], focus.grid_points(4), atol=1e-5)  # (x, y), row by row
  assert np.all(np.abs(points) <= 1 - 0.5)  # within ±(1 − scale): every patch stays inside the image
  assert len({tuple(p) for p in points[0].round(3)}) == 4


def test_grid_points_and_scale_gradient():
  assert focus.grid_points(1).tolist() == [[0.0, 0.0]]
  np.testing.assert_allclose(focus.grid_points(6, spread=1.0), [[-2 / 3, -0.5], [0, -0.5], [2 / 3, -0.5],
                                                                 [-2 / 3, 0.5], [0, 0.5], [2 / 3, 0.5]], atol=1e-6)
  x = jnp.array([0.3, -2.0])
  assert np.array_equal(focus.scale_gradient(x, 0.01), x)
  np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(focus.scale_gradient(v, 0.01) ** 2))(x), 0.02 * x)


def test_loss_gradient_in_the_keypoints_matches_finite_differences():
  """Through the patches, the shared patch encoder and the head, in float64."""
  with jax.enable_x64(True):
    module = focus.FocusNet(num_classes=5, num_keypoints=3, patch_size=4, patch_scale=0.4, keypoint_widths=(4,),
                            patch_widths=(4,), feature_width=6, hidden=8, dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 10, 1), jnp.float64)
    variables = jax.jit(lambda key: module.init(key, x, train=False))(jax.random.PRNGKey(1))  # jit: eager is slower
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), variables)
    labels = jnp.array([1, 3])

    @jax.jit
    def loss(points):
      logits = module.apply(variables, x, points, method=lambda m, x, p: m.head(m.encoder.patches(x, p, False), False))
      return jnp.mean(cross_entropy(logits, labels))

    points = jax.random.uniform(jax.random.PRNGKey(2), (2, 3, 2), jnp.float64, -0.5, 0.5)
    grad = np.asarray(jax.grad(loss)(points))
    numeric = central_differences(loss, points)
    assert np.abs(grad).max() > 1e-3
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-8)
    # The learned keypoints do get this gradient (scaled by keypoint_grad_scale); Harris keypoints get none.
    full = lambda params: jnp.mean(cross_entropy(module.apply({**variables, "params": params}, x), labels))
    keypoint_grads = jax.jit(jax.grad(full))(variables["params"])["encoder"]["locate"]["points"]
    assert np.abs(keypoint_grads["bias"]).max() > 0


def test_keypoint_gradient_is_scaled_in_training_only():
  """keypoint_grad_scale slows the keypoint CNN's training; attribution methods (inference) see exact gradients."""
  make = lambda scale: focus.FocusNet(num_classes=5, num_keypoints=2, patch_size=4, patch_scale=0.4,
                                      keypoint_widths=(4,), patch_widths=(4,), feature_width=6, hidden=8,
                                      keypoint_grad_scale=scale)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 10, 1))
  variables = make(1.0).init(jax.random.PRNGKey(1), x, train=False)
  # The keypoint layer starts with a zero kernel (keypoints on a grid); give it weights so x moves the keypoints.
  kernel = variables["params"]["encoder"]["locate"]["points"]["kernel"]
  variables = jax.tree_util.tree_map_with_path(
      lambda path, a: jax.random.normal(jax.random.PRNGKey(2), a.shape) * 0.1 if a is kernel else a, variables)

  def logits(scale, train, images):
    if train:
      return make(scale).apply(variables, images, train=True, mutable=["batch_stats"])[0]
    return make(scale).apply(variables, images, train=False)

  def input_gradient(scale, train):
    return jax.jit(jax.grad(lambda images: jnp.sum(logits(scale, train, images)[:, 1])))(x)

  np.testing.assert_allclose(input_gradient(0.01, False), input_gradient(1.0, False), rtol=1e-5, atol=1e-7)
  assert not np.allclose(input_gradient(0.01, True), input_gradient(1.0, True), rtol=1e-3)


def test_corner_keypoints_follow_the_image_and_get_no_gradient():
  model = make_model("corner", focus__num_keypoints=4, focus__patch_size=6, focus__patch_scale=0.25,
                     corner__nms_radius=2, corner__border=2)
  image = rectangle_image()
  variables = jax.jit(lambda key: model.init(key, image.shape[1:]))(jax.random.PRNGKey(0))
  points = np.asarray(model.keypoints(variables, image))
  cols, rows = normalized_to_pixel(points[0, :, 0], 24), normalized_to_pixel(points[0, :, 1], 20)
  assert set(np.round(np.asarray(cols)).astype(int)) <= {3, 4, 5, 18, 19, 20}  # x is the column
  assert set(np.round(np.asarray(rows)).astype(int)) <= {3, 4, 5, 14, 15, 16}
  assert "locate" not in variables["params"]["encoder"]
  np.testing.assert_array_equal(jax.grad(lambda x: model.keypoints(variables, x).sum())(image), 0.0)
  logits_grad = jax.grad(lambda x: model.apply(variables, x)[0].sum())(image)
  assert np.abs(logits_grad).max() > 0  # the image still gets gradients through the sampled pixels
  z, _ = model.encode(variables, image)
  chex.assert_trees_all_equal(model.classify(variables, z)[0], model.apply(variables, image)[0])


def test_zoom_starts_as_the_fixed_size_model_and_keeps_its_patches_inside():
  """The zoom variant adds one layer (scales) and starts where the fixed model starts: same keypoints, scales and
  logits; with trained-looking weights its scales stay in the range and every patch inside the image."""
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 8, 8, 1))
  fixed, zooming = make_model("focus"), make_model("focus", focus__zoom=True, focus__zoom_range=(0.25, 0.9))
  fixed_vars = jax.jit(lambda key: fixed.init(key, (8, 8, 1)))(jax.random.PRNGKey(0))
  zoom_vars = jax.jit(lambda key: zooming.init(key, (8, 8, 1)))(jax.random.PRNGKey(0))
  locate = zoom_vars["params"]["encoder"]["locate"]
  assert set(locate) - set(fixed_vars["params"]["encoder"]["locate"]) == {"scales"}
  np.testing.assert_allclose(zooming.patch_scales(zoom_vars, x), 0.5, atol=1e-6)  # patch_scale: where it starts
  np.testing.assert_allclose(fixed.patch_scales(fixed_vars, x), 0.5)
  np.testing.assert_allclose(zooming.keypoints(zoom_vars, x), fixed.keypoints(fixed_vars, x), atol=1e-6)
  np.testing.assert_allclose(zooming.apply(zoom_vars, x)[0], fixed.apply(fixed_vars, x)[0], atol=1e-5)
  assert focus.zoom_logit(0.5, (0.25, 0.75)) == 0.0

  noisy = jax.tree.map(lambda a: 30.0 * jax.random.normal(jax.random.PRNGKey(3), a.shape), locate)
  variables = {**zoom_vars, "params": {**zoom_vars["params"], "encoder": {**zoom_vars["params"]["encoder"],
                                                                          "locate": noisy}}}
  scales, points = np.asarray(zooming.patch_scales(variables, x)), np.asarray(zooming.keypoints(variables, x))
  assert scales.min() >= 0.25 and scales.max() <= 0.9 and scales.std() > 0.05  # they vary per image and keypoint
  assert np.all(np.abs(points) <= (1 - scales)[..., None] + 1e-6)  # centre ± scale stays within [-1, 1]


def test_zoom_learns_the_patch_scales():
  """Without weight decay, only the loss's gradient can move the scale layer's bias."""
  config = make_config("focus", focus__zoom=True, focus__zoom_range=(0.25, 0.9), schedule="constant",
                       warmup_epochs=0, learning_rate=0.1, weight_decay=0.0, focus__keypoint_grad_scale=1.0)
  losses, state = fit_one_batch(config, steps=25)
  assert losses[-1] < 0.7 * losses[0], losses
  bias = state.params["encoder"]["locate"]["scales"]["bias"]
  assert np.abs(np.asarray(bias) - focus.zoom_logit(0.5, (0.25, 0.9))).max() > 1e-3  # the scales moved


def test_zoom_reads_each_patch_at_its_own_scale():
  """With trained-looking weights, the encoder's features are the patch encoder's on patches sampled at the
  learned scales (not at patch_scale), and moving one scale alone changes the logits."""
  model = make_model("focus", focus__zoom=True, focus__zoom_range=(0.25, 0.9))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
  variables = jax.jit(lambda key: model.init(key, (8, 8, 1)))(jax.random.PRNGKey(0))
  locate = jax.tree.map(lambda a: 30.0 * jax.random.normal(jax.random.PRNGKey(3), a.shape),
                        variables["params"]["encoder"]["locate"])
  variables = {**variables, "params": {**variables["params"], "encoder": {**variables["params"]["encoder"],
                                                                          "locate": locate}}}
  points, scales = model.keypoints(variables, x), model.patch_scales(variables, x)
  assert np.abs(np.asarray(scales) - 0.5).max() > 0.05
  read = lambda m, x, p, s: m.encoder.patches(x, p, False, s)
  np.testing.assert_allclose(model.encode(variables, x)[0],
                             model.module.apply(variables, x, points, scales, method=read), atol=1e-5)
  assert not np.allclose(model.encode(variables, x)[0],
                         model.module.apply(variables, x, points, None, method=read), atol=1e-3)
  # From the initial weights (every scale at patch_scale), one patch's scale bias alone moves the logits.
  initial = jax.jit(lambda key: model.init(key, (8, 8, 1)))(jax.random.PRNGKey(0))
  moved = jax.tree.map(lambda a: a, initial)
  moved["params"]["encoder"]["locate"]["scales"]["bias"] = initial["params"]["encoder"]["locate"]["scales"][
      "bias"].at[0].add(1.0)
  scales = np.asarray(model.patch_scales(moved, x))
  assert scales[0, 0] > 0.6 and scales[0, 1] == pytest.approx(0.5, abs=1e-6)
  assert not np.allclose(model.apply(moved, x)[0], model.apply(initial, x)[0], atol=1e-4)


@pytest.mark.parametrize("name", ["focus", "corner"])
def test_train_steps_lower_the_loss(name):
  losses, state = fit_one_batch(make_config(name, schedule="constant", warmup_epochs=0, learning_rate=0.1), steps=25)
  assert losses[-1] < 0.7 * losses[0], losses
  chex.assert_tree_all_finite(state)


@pytest.mark.parametrize("side, scale, samples", [(28, 0.43, 12), (8, 0.43, 3), (8, 0.05, 1), (224, 0.1, 22)])
def test_the_auto_patch_size_samples_the_image_at_its_own_resolution(side, scale, samples):
  """patch_size=auto (the default): as many samples per side as the patch spans pixels; the encoder's first layer
  sees patches of that size."""
  assert focus.auto_patch_size(scale, side, side) == samples
  if side > 28:
    return
  model = make_model("focus", focus__patch_size="auto", focus__patch_scale=scale)
  found = []
  original = focus.extract_patches

  def spy(images, centers, patch_size, scale):
    found.append(patch_size)
    return original(images, centers, patch_size, scale)

  with unittest.mock.patch.object(focus, "extract_patches", spy):
    abstract_variables(model, (side, side, 1))
  assert found and set(found) == {samples}


# ----------------------------------------------------------------------------- bad input


def test_check_model_fits():
  check_model_fits(make_config("focus"), (8, 8, 1))
  check_model_fits(make_config("resnet"), (1, 1, 1))
  with pytest.raises(UserError, match=r"patch_size=12 is larger than the 8x8 images.*at most 8"):
    check_model_fits(make_config("focus", focus__patch_size=12), (8, 8, 1))
  with pytest.raises(UserError, match=r"corner.border=4 leaves no pixel.*below 4"):
    check_model_fits(make_config("corner", corner__border=4), (8, 8, 1))
  check_model_fits(make_config("corner", corner__border=3), (8, 8, 1))
  with pytest.raises(UserError, match=r"num_keypoints=65 asks for more corners.*at most 64"):
    check_model_fits(make_config("corner", focus__num_keypoints=65), (8, 8, 1))
  check_model_fits(make_config("focus", focus__num_keypoints=65), (8, 8, 1))  # learned keypoints may coincide


BAD_FIELDS = [
    (["--config.focus.num_keypoints=0"], ["config.focus.num_keypoints=0", "at least 1"]),
    (["--config.focus.patch_size=0"], ["config.focus.patch_size=0", "at least 1 pixel"]),
    (["--config.focus.patch_scale=0.0"], ["config.focus.patch_scale=0.0", "(0, 1]"]),
    (["--config.focus.patch_scale=1.5"], ["config.focus.patch_scale=1.5"]),
    (["--config.focus.patch_widths=()"], ["config.focus.patch_widths", "positive integers"]),
    (["--config.focus.feature_width=0"], ["config.focus.feature_width=0"]),
    (["--config.focus.keypoint_grad_scale=-1.0"], ["config.focus.keypoint_grad_scale=-1.0", ">= 0"]),
    (["--config.corner.harris_k=0.3"], ["config.corner.harris_k=0.3", "(0, 0.25)"]),
    (["--config.corner.sigma=0.0"], ["config.corner.sigma=0.0"]),
    (["--config.corner.nms_radius=-1"], ["config.corner.nms_radius=-1"]),
    (["--config.corner.nms_radius=50"], ["config.corner.nms_radius=50", "at most 8"]),
    (["--config.corner.sigma=20.0"], ["config.corner.sigma=20.0", "(0, 8]"]),
    (["--config.focus.zoom=True", "--config.focus.zoom_range=(0.5,0.8)"],
     ["config.focus.zoom_range=(0.5, 0.8)", "0 < s_min < patch_scale=0.43 < s_max <= 1"]),
    (["--config.focus.zoom=True", "--config.focus.zoom_range=(0.2,1.5)"], ["config.focus.zoom_range=(0.2, 1.5)"]),
]


@pytest.mark.parametrize("name", ["focus", "corner"])
@pytest.mark.parametrize("overrides, fragments", BAD_FIELDS, ids=[b[0][0] for b in BAD_FIELDS])
def test_bad_focus_config_is_one_line(tmp_path, capsys, name, overrides, fragments):
  workdir = tmp_path / "wd"
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, f"--config.model={name}", "--config.dataset=digits",
                           *overrides)
  assert_one_line_error(code, err, *fragments)
  assert not workdir.exists()


def test_zoom_needs_learned_keypoints(tmp_path, capsys):
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", "--config.model=corner",
                         "--config.dataset=digits", "--config.focus.zoom=True")
  assert_one_line_error(code, err, "config.focus.zoom=True needs learned keypoints", "config.model='corner'",
                        "--config.model=focus")
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("name", ["focus", "corner"])
def test_patch_larger_than_the_images_is_one_line(tmp_path, capsys, name):
  """Needs the data: 12-pixel patches do not fit scikit-learn's 8×8 digits (the default, auto, takes 3)."""
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", f"--config.model={name}",
                         "--config.dataset=digits", "--config.focus.patch_size=12", "--no-progress")
  assert_one_line_error(code, err, "config.focus.patch_size=12", "8x8", "at most 8")


def test_corner_trains_one_epoch_through_the_cli(tmp_path, capsys):
  code, out, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", "--config.model=corner",
                           "--config.dataset=digits", *TINY_FOCUS_ARGS, "--config.num_epochs=1",
                           "--config.batch_size=64", "--no-progress")
  assert code == 0, err
  assert '"model": "corner"' in out
  # `overfocus explain` draws the corners; the latent is per patch, so only input-space methods apply.
  code, out, err = run_cli(capsys, "explain", "--workdir", tmp_path / "wd", "--n", "2", "--images", "8",
                           "--ig-steps", "2", "--no-progress")
  assert code == 0, err
  summary = json.loads(out.strip().splitlines()[-1])
  assert set(summary["methods"]) == {"input_gradient", "smoothgrad", "integrated_gradients"}
  assert (tmp_path / "wd" / "explain" / "keypoints.png").stat().st_size > 5000
  assert summary["patch_scales"]["mean"] == summary["patch_scales"]["max"] == [0.5, 0.5]  # fixed: patch_scale
  corners = summary["keypoints"]  # Harris corners follow the image and never learn
  assert len(corners["mean_px"]) == 2 and corners["moved_px"] == [0.0, 0.0] and max(corners["spread_px"]) > 0.5
  code, _, err = run_cli(capsys, "explain", "--workdir", tmp_path / "wd", "--methods", "grad_cam")
  assert_one_line_error(code, err, "needs a feature map aligned with the image")


@pytest.mark.parametrize("regularizer, granularity", [("sgdrop", "spatial"), ("rsc", "element")])
def test_regularizers_train_the_focus_model(tmp_path, capsys, regularizer, granularity):
  code, out, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", "--config.model=focus",
                           "--config.dataset=digits", *TINY_FOCUS_ARGS, "--config.num_epochs=1",
                           "--config.batch_size=64", f"--config.regularizer.name={regularizer}",
                           f"--config.regularizer.sgdrop.granularity={granularity}", "--no-progress")
  assert code == 0, err
  record = json.loads((tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()[-1])
  assert record[f"train_{regularizer}_dropped_fraction"] > 0


@pytest.mark.parametrize("grad_scale", [1.0, 0.0])
def test_explain_reports_how_far_the_learned_keypoints_moved(tmp_path, capsys, grad_scale):
  """moved_px: the mean distance from the same model's keypoints at initialisation (near 0 when the keypoint CNN
  gets no gradient: only weight decay moves its bias); spread_px: how much each keypoint varies over the images (0
  for a keypoint CNN whose zero-initialised kernel never learned)."""
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "wd", "--config.model=focus",
                         "--config.dataset=digits", *TINY_FOCUS_ARGS, "--config.num_epochs=1",
                         "--config.batch_size=64", f"--config.focus.keypoint_grad_scale={grad_scale}", "--no-progress")
  assert code == 0, err
  code, out, err = run_cli(capsys, "explain", "--workdir", tmp_path / "wd", "--n", "2", "--images", "16",
                           "--methods", "input_gradient", "--no-progress")
  assert code == 0, err
  points = json.loads(out.strip().splitlines()[-1])["keypoints"]
  assert len(points["mean_px"]) == len(points["spread_px"]) == len(points["moved_px"]) == 2
  if grad_scale == 0:
    assert max(points["moved_px"]) < 0.05 and max(points["spread_px"]) < 1e-3
  else:
    assert min(points["moved_px"]) > 0 and min(points["spread_px"]) > 0
