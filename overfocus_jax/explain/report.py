"""``overfocus explain``: attribution maps, overfocus metrics and figures for a trained run.

For the first ``images`` test images (the same ones every time) and each attribution method, it measures

- ``attribution_ratio``, ``entropy`` (normalised to [0, 1]), ``gini``: the mean over images of the concentration
  metrics of :mod:`overfocus_jax.explain.metrics`, on the map at the method's own resolution (the latent map
  ``(h, w, C)`` element by element for ``latent``, ``(h, w)`` for Grad-CAM, pixels for the input-space methods);
- ``coverage``: the fraction of those units covered on some image (threshold 0.1 of each map's maximum);
- ``deletion_auc``, ``insertion_auc``: the deletion/insertion curves (the explained class's probability) of the
  map upsampled to pixels, with removed pixels set to the dataset mean (0 after normalisation);

and draws, for the first ``n`` of them, the maps over the images (``attributions.png``), attention maps and
keypoints (each patch at its size) when the model has them, the per-epoch attribution ratio and generalization gap
from ``metrics.jsonl`` (``training_curves.png``) and the per-channel feature usage (``feature_usage.png``); those
two also show a second run when ``compare`` is given (the maps and ``explain.json``'s metrics are the main run's).
Everything explains the ``target`` class: the true one, or the predicted one (deletion/insertion then follow its
probability). For the focus models ``explain.json`` also holds ``patch_scales``: each keypoint's patch scale over
the measured images (mean, std, min, max), which the zoom variant learns; and ``keypoints``: per keypoint, its mean
position (``mean_px``, (column, row) pixels), ``spread_px`` — how far it moves with the image,
``sqrt(mean_i |p_ik − mean_i p_ik|²)`` over the measured images — and ``moved_px`` — how far training took it, the
mean over images of ``|p_ik − p⁰_ik|``, with ``p⁰`` the same model's keypoint at initialisation (its seed) on the
same image (0 for the Harris corners, which do not learn).
"""

import contextlib
import dataclasses
import json
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from overfocus_jax.challenge.attribution import TARGETS, target_classes
from overfocus_jax.data import pipeline
from overfocus_jax.errors import UserError
from overfocus_jax.explain import attributions, figures, latent, layers, metrics
from overfocus_jax.models import NNXModel, patches, reconstruction
from overfocus_jax.train import evaluation, reconstruction_step
from overfocus_jax.train import state as state_lib
from overfocus_jax.train import workdir as workdir_lib
from overfocus_jax.train.lock import WorkdirLock

METHODS = ("latent", "grad_cam", "input_gradient", "smoothgrad", "integrated_gradients")
# Methods that read a feature map aligned with the image; the focus models' latent is one vector per patch.
FEATURE_MAP_METHODS = ("latent", "grad_cam")
DEFAULT_LAYER = "encoder"
IG_BASELINES = ("mean", "black")
CHUNK = 64  # images per compiled batch
DELETION_STEPS = 16
COVERAGE_THRESHOLD = 0.1


@dataclasses.dataclass(frozen=True)
class Options:
  n: int = 8                      # images drawn
  images: int = 128               # images measured (at least n)
  methods: Sequence[str] | None = None  # None: every method the model supports
  layer: str = DEFAULT_LAYER      # Grad-CAM layer: a module path, or "encoder": the latent map z of any model
  target: str = "true"            # attribute the true or the predicted class
  smoothgrad_samples: int = 16
  ig_steps: int = 32
  ig_baseline: str = "mean"       # mean: every pixel at the dataset mean (0 after normalisation) | black: 0
  seed: int = 0


def _has_feature_map(model) -> bool:
  return model.supports_split("latent") and not model.has("keypoints")


def resolve_methods(requested: Sequence[str] | None, model) -> tuple[str, ...]:
  """The methods to run: all that fit the model by default; an unknown or unfit one is a :class:`UserError`."""
  fit = tuple(m for m in METHODS if m not in FEATURE_MAP_METHODS or _has_feature_map(model))
  if requested is None:
    return fit
  for method in requested:
    if method not in METHODS:
      raise UserError(f"unknown attribution method {method!r}", f"use one or more of {', '.join(METHODS)} "
                      "(--methods a,b)")
    if method not in fit:
      raise UserError(f"method {method!r} needs a feature map aligned with the image, and the {model.name} model "
                      "has none", f"use {', '.join(fit)}")
  return tuple(dict.fromkeys(requested))


def check_options(options: Options) -> None:
  if options.n < 1:
    raise UserError(f"--n={options.n} must be at least 1", "pass --n 8")
  if options.images < 1:
    raise UserError(f"--images={options.images} must be at least 1", "pass --images 256")
  if options.target not in TARGETS:
    raise UserError(f"unknown --target {options.target!r}", f"use one of {', '.join(TARGETS)}")
  if options.ig_steps < 1:
    raise UserError(f"--ig-steps={options.ig_steps} must be at least 1", "pass --ig-steps 32")
  if options.ig_baseline not in IG_BASELINES:
    raise UserError(f"unknown --ig-baseline {options.ig_baseline!r}", f"use one of {', '.join(IG_BASELINES)}")


def feature_layers(model, variables, input_shape) -> dict:
  """The layers Grad-CAM can take: a Linen model's (the library's or yours) or an NNX model's module paths."""
  if isinstance(model, NNXModel):
    return layers.nnx_feature_layers(model.bind(variables), input_shape)
  return layers.linen_feature_layers(model, variables, input_shape)


def probe(model, variables, layer: str):
  return layers.nnx_probe(model.bind(variables), layer) if isinstance(model, NNXModel) else \
      layers.linen_probe(model, variables, layer)


def check_layer(layer: str, model, variables, input_shape) -> None:
  if layer == DEFAULT_LAYER:  # the latent map: every model with an encode/classify split has it
    return
  available = feature_layers(model, variables, input_shape)
  if layer not in available:
    names = ", ".join(available) or "none"
    raise UserError(f"layer {layer!r} is not a feature map of the {model.name} model",
                    f"pass --layer with one of: {names}")


def ig_baseline(options: Options, dataset) -> np.ndarray | None:
  """The integrated-gradients baseline in the model's (normalised) input space; None means zeros."""
  if options.ig_baseline == "black":
    return ((0.0 - np.asarray(dataset.mean)) / np.asarray(dataset.std)).astype(np.float32)  # per channel
  return None


def _method_fn(method: str, model, options: Options, baseline: np.ndarray | None = None):
  """``(variables, x, labels, key) -> (native map, pixel map (B, H, W))``, both non-negative."""

  def fn(variables, x, labels, key):
    logits_fn = lambda inputs: model.apply(variables, inputs, train=False)[0]
    height, width = x.shape[1:3]
    if method == "latent":
      _, native = latent.latent_attribution(*model.inference_fns(variables), x, labels, options.target)
      return native, attributions.upsample_to(native.sum(-1), height, width)
    if method == "grad_cam":
      if options.layer == DEFAULT_LAYER:  # Grad-CAM on z through the model's own split
        native = attributions.grad_cam(*model.inference_fns(variables), x, labels, options.target)
      else:
        native = layers.layer_grad_cam(probe(model, variables, options.layer), x, labels, options.target)
      return native, attributions.upsample_to(native, height, width)
    if method == "input_gradient":
      grad = attributions.input_gradient(logits_fn, x, labels, options.target)
    elif method == "smoothgrad":
      grad = attributions.smoothgrad(logits_fn, x, labels, key, samples=options.smoothgrad_samples,
                                     target=options.target)
    else:
      grad = attributions.integrated_gradients(logits_fn, x, labels, baseline=baseline, steps=options.ig_steps,
                                               target=options.target)
    native = attributions.to_heatmap(grad)
    return native, native

  return jax.jit(fn)


def _metric_sums_fn(model, target: str):
  """``(variables, x, labels, mask, native, pixel) -> (sums, covered units)``, sums weighted by ``mask``.

  Deletion and insertion follow the probability of the class the maps explain (true or predicted)."""

  def fn(variables, x, labels, mask, native, pixel):
    prob_fn = lambda inputs: jax.nn.softmax(model.apply(variables, inputs, train=False)[0])
    classes = target_classes(prob_fn(x), labels, target)
    deletion, insertion = metrics.deletion_insertion_curves(prob_fn, x, pixel, classes, steps=DELETION_STEPS)
    per_image = {"attribution_ratio": metrics.attribution_ratio(native), "entropy": metrics.normalised_entropy(native),
                 "gini": metrics.gini(native), "deletion_auc": metrics.auc(deletion),
                 "insertion_auc": metrics.auc(insertion)}
    sums = {k: jnp.sum(v * mask) for k, v in per_image.items()}
    return sums, metrics.covered_units(native, COVERAGE_THRESHOLD, mask)

  return jax.jit(fn)


def _batches(source, count: int, dataset):
  """The first ``count`` examples in fixed-size batches; rows past ``count`` are masked out."""
  size = min(CHUNK, count)
  seen = 0
  for batch in pipeline.eval_batches(source, batch_size=size, mean=dataset.mean, std=dataset.std):
    if seen >= count:
      return
    batch["mask"] = batch["mask"] * (seen + np.arange(size) < count)
    seen += size
    yield batch


def _display(images: np.ndarray) -> np.ndarray:
  """Images scaled to [0, 1] per image for drawing (datasets differ in range: digits run 0–16)."""
  axes = tuple(range(1, images.ndim))
  low, high = images.min(axis=axes, keepdims=True), images.max(axis=axes, keepdims=True)
  return (images - low) / np.where(high > low, high - low, 1.0)


def measure_methods(run, source, methods, options: Options, progress: bool | None = None):
  """``(per-method metrics, first-n pixel maps per method, first-n batch, accuracy, images measured)``."""
  model, variables, dataset = run.exp.model, run.state.variables, run.exp.dataset
  count = min(max(options.images, options.n), len(source))
  sums_fn = _metric_sums_fn(model, options.target)
  batches = list(_batches(source, count, dataset))
  key = jax.random.PRNGKey(options.seed)
  results, shown = {}, {}
  bar = tqdm.tqdm(total=len(methods) * len(batches), desc="explain", unit="batch", leave=False,
                  disable=(not progress) if progress is not None else None)
  with bar:
    for method in methods:
      fn = _method_fn(method, model, options, ig_baseline(options, dataset))
      totals, covered, pixels, drawn, native_shape = None, None, [], 0, None
      for batch in batches:
        native, pixel = fn(variables, batch["image"], batch["label"], key)
        sums, units = sums_fn(variables, batch["image"], batch["label"], batch["mask"], native, pixel)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        covered = units if covered is None else covered | units
        if drawn < options.n:  # only the drawn images' maps come back to the host
          pixels.append(np.asarray(pixel))
          drawn += len(pixels[-1])
        native_shape = native.shape[1:]
        bar.update(1)
      totals = jax.device_get(totals)
      results[method] = {k: float(v) / count for k, v in totals.items()}
      results[method]["coverage"] = float(np.mean(np.asarray(covered)))
      results[method]["resolution"] = list(native_shape)
      shown[method] = np.concatenate(pixels)[:options.n]
  first = {k: np.concatenate([b[k] for b in batches])[:options.n] for k in ("image", "label")}
  accuracy = _accuracy(model, variables, batches)
  return results, shown, first, accuracy, count


def _accuracy(model, variables, batches) -> float:
  predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False)[0], axis=-1))
  correct = sum(float(np.sum((np.asarray(predict(variables, b["image"])) == b["label"]) * b["mask"]))
                for b in batches)
  return correct / sum(float(np.sum(b["mask"])) for b in batches)


def feature_usage(run, source, count: int, target: str = "true") -> dict:
  """Per-channel activation and latent attribution over the first ``count`` images (see ``latent.py``)."""
  model, dataset = run.exp.model, run.exp.dataset
  fn = jax.jit(lambda v, x, y, m: latent.channel_sums(*model.inference_fns(v), x, y, m, target))
  totals = None
  for batch in _batches(source, count, dataset):
    sums = fn(run.state.variables, batch["image"], batch["label"], batch["mask"])
    totals = sums if totals is None else {k: (v if k == "positions" else totals[k] + v) for k, v in sums.items()}
  return latent.usage_from_sums(jax.device_get(totals))


def patch_scale_summary(run, source, count: int) -> dict | None:
  """Each keypoint's patch scale (its half side in [-1, 1] units) over the first ``count`` images: mean, standard
  deviation, min and max per keypoint; None for a model without keypoints. A zooming focus model learns them; the
  others report their fixed ``patch_scale``."""
  model, dataset = run.exp.model, run.exp.dataset
  if not model.has("patch_scales"):
    return None
  scales_fn = jax.jit(lambda v, x: model.patch_scales(v, x))
  rows = [np.asarray(scales_fn(run.state.variables, b["image"]))[np.asarray(b["mask"]) > 0]
          for b in _batches(source, count, dataset)]
  scales = np.concatenate(rows)
  return {stat: [round(float(v), 4) for v in fn(scales, axis=0)]
          for stat, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max))}


def keypoints_in_pixels(points, height: int, width: int) -> np.ndarray:
  """Keypoints (..., 2) = (x, y) in [-1, 1] as (column, row) pixels of (height, width) images, in float64."""
  points = np.asarray(points, np.float64)
  return np.stack([patches.normalized_to_pixel(points[..., 0], width),     # x: the column
                   patches.normalized_to_pixel(points[..., 1], height)], -1)  # y: the row


def model_inputs(run, images):
  """What the run's model reads of normalized ``images``: the images themselves, or a reconstruction's pixels in
  [0, 1] (:func:`overfocus_jax.train.reconstruction_step.pixels`)."""
  if run.exp.task == "reconstruct":
    return reconstruction_step.pixels(jnp.asarray(images), run.exp.dataset.mean, run.exp.dataset.std)
  return images


def keypoint_summary(run, source, count: int) -> dict | None:
  """Where the keypoints sit, how much they follow the image and how far training moved them (module docstring),
  over the first ``count`` images; None for a model without keypoints."""
  model, dataset = run.exp.model, run.exp.dataset
  if not model.has("keypoints"):
    return None
  height, width = dataset.image_shape[:2]
  initial = state_lib.initial_variables(model, run.config.seed, dataset.image_shape)
  points_fn = jax.jit(lambda v, x: model.keypoints(v, x))

  trained, start = [], []
  for batch in _batches(source, count, dataset):
    kept = np.asarray(batch["mask"]) > 0
    inputs = model_inputs(run, batch["image"])
    trained.append(keypoints_in_pixels(points_fn(run.state.variables, inputs), height, width)[kept])
    start.append(keypoints_in_pixels(points_fn(initial, inputs), height, width)[kept])
  trained, start = np.concatenate(trained), np.concatenate(start)  # (N, K, 2)
  mean = trained.mean(axis=0)
  spread = np.sqrt(np.mean(np.sum((trained - mean) ** 2, axis=-1), axis=0))
  moved = np.mean(np.linalg.norm(trained - start, axis=-1), axis=0)
  return {"mean_px": [[round(float(c), 2) for c in point] for point in mean],
          "spread_px": [round(float(v), 3) for v in spread], "moved_px": [round(float(v), 3) for v in moved]}


def _label(run) -> str:
  reg = run.config.regularizer.name
  return f"{run.workdir.name} ({run.config.model}, {reg})"


def _predictions(model, variables, images) -> np.ndarray:
  return np.asarray(jnp.argmax(model.apply(variables, jnp.asarray(images), train=False)[0], axis=-1))


def _model_figures(run, first, out: pathlib.Path, predictions) -> dict:
  """Attention maps and keypoints, when the model has them."""
  model, variables = run.exp.model, run.state.variables
  images = _display(first["image"])
  height, width = images.shape[1:3]
  written = {}
  attention = model.attention_maps(variables, jnp.asarray(first["image"]))
  if attention is not None:
    maps = {f"attention {i + 1} ({a.shape[1]}×{a.shape[2]})": np.asarray(attributions.upsample_to(a, height, width))
            for i, a in enumerate(attention)}
    written["attention"] = figures.map_overlays(out / "attention.png", images, maps, first["label"], predictions,
                                                title=f"attention maps — {_label(run)}")
  keypoints = model.keypoints(variables, jnp.asarray(first["image"]))
  if keypoints is not None:
    keypoints = np.asarray(keypoints)
    pixels = keypoints_in_pixels(keypoints, height, width)
    # Each patch spans its centre ± its scale in [-1, 1] units on each axis: scale·W by scale·H pixels.
    scales = np.asarray(model.patch_scales(variables, jnp.asarray(first["image"])))
    patch_px = np.stack([scales * width, scales * height], -1)
    written["keypoints"] = figures.keypoint_overlays(out / "keypoints.png", images, pixels, patch_px,
                                                     first["label"], predictions,
                                                     title=f"keypoints and patches — {_label(run)}")
  return written


def explain(workdir, *, dataset: str | None = None, out=None, compare=None, options: Options = Options(),
            progress: bool | None = None) -> dict:
  """Runs everything in the module docstring; returns (and writes to ``OUT/explain.json``) the summary."""
  check_options(options)
  run = workdir_lib.load_trained(workdir)
  source, name = evaluation.evaluation_split(run.exp, dataset)
  if run.exp.task == "reconstruct":
    if compare or options.methods:
      raise UserError(f"run {str(run.workdir)!r} reconstructs its input: it has no classes to attribute",
                      "drop --methods and --compare")
    write = lambda out: explain_reconstruction(run, source, name, options, out)  # noqa: E731
  else:
    model = run.exp.model
    methods = resolve_methods(options.methods, model)
    if "grad_cam" in methods:
      check_layer(options.layer, model, run.state.variables, run.exp.dataset.image_shape)
    try:
      other = workdir_lib.load_trained(compare) if compare else None
    except UserError as e:
      raise UserError(f"--compare: {e}") from None
    if other is not None and other.exp.dataset.image_shape != run.exp.dataset.image_shape:
      raise UserError(f"--compare run {str(other.workdir)!r} was trained on {other.exp.dataset.image_shape} "
                      f"images, this one on {run.exp.dataset.image_shape}", "compare two runs on the same data")
    write = lambda out: _explain(run, other, source, name, model, methods, options, out, progress)  # noqa: E731
  out = pathlib.Path(out or run.workdir / "explain").expanduser().resolve()
  with contextlib.ExitStack() as held:
    if out.is_relative_to(run.workdir):  # it writes into the run's workdir: one writer at a time
      held.enter_context(WorkdirLock(run.workdir, "overfocus explain"))
    return write(workdir_lib.prepare_workdir(out))


def _explain(run, other, source, name, model, methods, options: Options, out: pathlib.Path, progress) -> dict:
  results, shown, first, accuracy, count = measure_methods(run, source, methods, options, progress)
  predictions = _predictions(model, run.state.variables, first["image"])
  images = _display(first["image"])
  written = {"attributions": figures.map_overlays(out / "attributions.png", images, shown, first["label"],
                                                  predictions, title=f"{_label(run)} — target: {options.target}")}
  written.update(_model_figures(run, first, out, predictions))
  runs = {_label(run): workdir_lib.read_metrics(run.workdir)}
  usage = {}
  if model.supports_split("latent"):
    usage[_label(run)] = feature_usage(run, source, count, options.target)
  if other is not None:
    runs[_label(other)] = workdir_lib.read_metrics(other.workdir)
    if other.exp.model.supports_split("latent"):
      usage[_label(other)] = feature_usage(other, source, count, options.target)
  if any(runs.values()):
    written["training_curves"] = figures.training_curves(out / "training_curves.png", runs)
  scales = patch_scale_summary(run, source, count)
  keypoints = keypoint_summary(run, source, count)
  if usage:
    written["feature_usage"] = figures.feature_usage(out / "feature_usage.png", usage)
    (out / "feature_usage.json").write_text(json.dumps(usage, indent=1))

  summary = {
      "workdir": str(run.workdir), "dataset": name, "step": run.step, "model": run.config.model,
      "regularizer": run.config.regularizer.name, "images": count, "accuracy": accuracy, "target": options.target,
      "ig": {"steps": options.ig_steps, "baseline": options.ig_baseline},
      "layer": options.layer if "grad_cam" in methods else None, "methods": results,
      "feature_usage": {label: {k: u[k] for k in ("effective_channels", "channels", "top10pct_share")}
                        for label, u in usage.items()},
      "figures": {k: str(v) for k, v in written.items()}, "out": str(out),
  }
  if scales is not None:
    summary["patch_scales"] = scales
  if keypoints is not None:
    summary["keypoints"] = keypoints
  (out / "explain.json").write_text(json.dumps(summary, indent=2))
  return summary


def explain_reconstruction(run, source, name: str, options: Options, out: pathlib.Path) -> dict:
  """A reconstructing run's explanation: its test MSE over the first ``images`` test images, its keypoints
  (:func:`keypoint_summary`), the figure of the first ``n`` (image and patches, heatmap, reconstruction) and the
  training curves; written to ``OUT/explain.json``."""
  model, variables, dataset = run.exp.model, run.state.variables, run.exp.dataset
  count = min(max(options.images, options.n), len(source))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  errors, first = [], None
  for batch in _batches(source, count, dataset):
    images = model_inputs(run, batch["image"])
    rebuilt, points, heatmap = apply(variables, images)
    kept = np.asarray(batch["mask"]) > 0
    errors.append(np.asarray(reconstruction.reconstruction_mse(rebuilt, images))[kept])
    if first is None:
      first = {"image": np.asarray(images)[:options.n], "label": np.asarray(batch["label"])[:options.n],
               "points": np.asarray(points)[:options.n], "heatmap": np.asarray(heatmap)[:options.n],
               "rebuilt": np.asarray(rebuilt)[:options.n],
               "scales": np.asarray(model.patch_scales(variables, images))[:options.n]}
  height, width = dataset.image_shape[:2]
  pixels = keypoints_in_pixels(first["points"], height, width)
  patch_px = np.stack([first["scales"] * width, first["scales"] * height], -1)
  group = run.config.reconstruction
  written = {"reconstructions": figures.reconstructions(
      out / "reconstructions.png", first["image"], pixels, patch_px, first["heatmap"], first["rebuilt"],
      first["label"], title=f"{run.workdir.name}: K={group.num_keypoints} patches of {group.patch_size}x"
      f"{group.patch_size} ({group.select})")}
  records = workdir_lib.read_metrics(run.workdir)
  if records:
    written["training_curves"] = figures.reconstruction_curves(out / "training_curves.png",
                                                               {run.workdir.name: records})
  summary = {"workdir": str(run.workdir), "dataset": name, "step": run.step, "model": run.config.model,
             "images": count, "mse": float(np.concatenate(errors).mean()),
             "keypoints": keypoint_summary(run, source, count),
             "figures": {k: str(v) for k, v in written.items()}, "out": str(out)}
  (out / "explain.json").write_text(json.dumps(summary, indent=2))
  return summary
