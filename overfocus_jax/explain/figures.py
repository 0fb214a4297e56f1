"""Figures for ``overfocus explain`` (matplotlib, written as PNG; no display needed).

Every function takes NumPy arrays already in display form — images in [0, 1] as ``(N, H, W, C)``, maps
``(N, H, W)`` at image resolution — writes one PNG and returns its path.
"""

import pathlib
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HEATMAP = "inferno"
OVERLAY_ALPHA = 0.55


def _show_image(ax, image: np.ndarray) -> None:
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  else:
    ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])


def _overlay(ax, image: np.ndarray, heat: np.ndarray) -> None:
  """The image in gray with the map on top, scaled per image to its own maximum."""
  _show_image(ax, image.mean(axis=-1, keepdims=True))
  peak = float(heat.max())
  ax.imshow(heat / peak if peak > 0 else heat, cmap=HEATMAP, vmin=0, vmax=1, alpha=OVERLAY_ALPHA,
            interpolation="nearest")


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def _row_title(labels, predictions, i) -> str:
  return f"y={int(labels[i])} ŷ={int(predictions[i])}"


def map_overlays(path: pathlib.Path, images: np.ndarray, maps: Mapping[str, np.ndarray], labels: np.ndarray,
                 predictions: np.ndarray, title: str = "") -> pathlib.Path:
  """One row per image: the image, then each named map over it."""
  n, cols = len(images), 1 + len(maps)
  fig, axes = plt.subplots(n, cols, figsize=(1.7 * cols, 1.7 * n), squeeze=False)
  for i in range(n):
    _show_image(axes[i, 0], images[i])
    axes[i, 0].set_ylabel(_row_title(labels, predictions, i), fontsize=8)
    for j, (name, heat) in enumerate(maps.items(), start=1):
      _overlay(axes[i, j], images[i], heat[i])
      if i == 0:
        axes[i, j].set_title(name, fontsize=8)
  axes[0, 0].set_title("input", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def keypoint_overlays(path: pathlib.Path, images: np.ndarray, keypoints_px: np.ndarray,
                      patch_px: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                      title: str = "") -> pathlib.Path:
  """Images with their K keypoints (``(N, K, 2)`` as (column, row) pixels) and the patch each reads (``(N, K, 2)``
  as (width, height) pixels)."""
  n = len(images)
  cols = min(n, 8)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.0 * rows), squeeze=False)
  colors = plt.get_cmap("tab10")
  for ax in axes.flat:
    ax.axis("off")
  for i in range(n):
    ax = axes.flat[i]
    ax.axis("on")
    _show_image(ax, images[i])
    for k, (col, row) in enumerate(keypoints_px[i]):
      color = colors(k % 10)
      patch_w, patch_h = patch_px[i][k]
      ax.add_patch(plt.Rectangle((col - patch_w / 2, row - patch_h / 2), patch_w, patch_h, fill=False,
                                 edgecolor=color, linewidth=1.0))
      ax.plot([col], [row], marker="+", color=color, markersize=6)
    height, width = images[i].shape[:2]
    ax.set_xlim(-0.5, width - 0.5)  # patches may reach past the edge (they read zeros there): keep the frame
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_title(_row_title(labels, predictions, i), fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9, y=1.02)
  return _save(fig, path)


def reconstructions(path: pathlib.Path, images: np.ndarray, keypoints_px: np.ndarray, patch_px: np.ndarray,
                    heatmaps: np.ndarray, rebuilt: np.ndarray, labels: np.ndarray, title: str = "") -> pathlib.Path:
  """One column per image: the image with its K patches outlined (``keypoints_px`` (N, K, 2) (column, row) pixels,
  ``patch_px`` (N, K, 2) (width, height) pixels), the saliency heatmap (N, h, w) and the reconstruction (N, H, W, C)."""
  n = len(images)
  fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.0), squeeze=False)
  colors = plt.get_cmap("tab10")
  for i in range(n):
    height, width = images[i].shape[:2]
    _show_image(axes[0, i], images[i])
    for k, (col, row) in enumerate(keypoints_px[i]):
      patch_w, patch_h = patch_px[i][k]
      axes[0, i].add_patch(plt.Rectangle((col - patch_w / 2, row - patch_h / 2), patch_w, patch_h, fill=False,
                                         edgecolor=colors(k % 10), linewidth=1.0))
    axes[0, i].set_xlim(-0.5, width - 0.5)
    axes[0, i].set_ylim(height - 0.5, -0.5)
    axes[0, i].set_title(f"y={int(labels[i])}", fontsize=8)
    axes[1, i].imshow(heatmaps[i], cmap=HEATMAP, interpolation="nearest")
    axes[1, i].set_xticks([])
    axes[1, i].set_yticks([])
    _show_image(axes[2, i], np.clip(rebuilt[i], 0, 1))
  for row, name in enumerate(("image and patches", "heatmap", "reconstruction")):
    axes[row, 0].set_ylabel(name, fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  return _save(fig, path)


def training_curves(path: pathlib.Path, runs: Mapping[str, Sequence[dict]]) -> pathlib.Path:
  """The SGDrop paper's Fig. 1 for each run: attribution ratio and generalization gap per epoch."""
  fig, (ax_ratio, ax_gap) = plt.subplots(1, 2, figsize=(9, 3.4))
  for name, records in runs.items():
    epochs = [r["epoch"] for r in records if "attribution_ratio" in r]
    line, = ax_ratio.plot(epochs, [r["attribution_ratio"] for r in records if "attribution_ratio" in r],
                          marker="o", markersize=3, label=f"{name}: elements")
    spatial = [(r["epoch"], r["attribution_ratio_spatial"]) for r in records if "attribution_ratio_spatial" in r]
    if spatial:
      ax_ratio.plot(*zip(*spatial), marker="s", markersize=3, linestyle="--", color=line.get_color(),
                    label=f"{name}: positions")
    gap_epochs = [r["epoch"] for r in records if "train_accuracy" in r and "test_accuracy" in r]
    ax_gap.plot(gap_epochs, [r["train_accuracy"] - r["test_accuracy"] for r in records
                             if "train_accuracy" in r and "test_accuracy" in r], marker="o", markersize=3,
                label=name)
  if not any("attribution_ratio" in r for records in runs.values() for r in records):
    ax_ratio.text(0.5, 0.5, "no attribution_ratio in metrics.jsonl\n(a run from before it was logged)",
                  ha="center", va="center", transform=ax_ratio.transAxes, fontsize=9)
  ax_ratio.set(xlabel="epoch", ylabel="attribution ratio (share 0.5)", yscale="log",
               title="latent attribution ratio (small = overfocused)")
  ax_gap.set(xlabel="epoch", ylabel="train acc. − test acc.", title="generalization gap")
  ax_gap.axhline(0.0, color="gray", linewidth=0.5)
  for ax in (ax_ratio, ax_gap):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def feature_usage(path: pathlib.Path, usages: Mapping[str, dict]) -> pathlib.Path:
  """Per-channel attribution share (channels sorted by share) and the histogram of mean |activation|."""
  fig, (ax_share, ax_act) = plt.subplots(1, 2, figsize=(9, 3.4))
  # One set of bins for every run, so the histograms compare.
  bins = np.histogram_bin_edges(np.concatenate([np.asarray(u["activation"]) for u in usages.values()]), bins=30)
  for name, usage in usages.items():
    share = np.sort(np.asarray(usage["share"]))[::-1]
    rank = (np.arange(share.size) + 0.5) / share.size
    ax_share.plot(rank, share, drawstyle="steps-mid",
                  label=f"{name}: {usage['effective_channels']:.1f} of {usage['channels']} effective")
    ax_act.hist(np.asarray(usage["activation"]), bins=bins, alpha=0.5, label=name)
  ax_share.set(xlabel="channel rank (fraction of channels)", ylabel="share of latent attribution", yscale="log",
               title="feature usage: attribution per channel")
  ax_act.set(xlabel="mean |activation| per channel", ylabel="channels", title="feature activation")
  for ax in (ax_share, ax_act):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def reconstruction_curves(path: pathlib.Path, runs: Mapping[str, Sequence[dict]]) -> pathlib.Path:
  """Train and test reconstruction MSE per epoch for each run."""
  fig, ax = plt.subplots(figsize=(4.8, 3.4))
  for name, records in runs.items():
    for split, style in (("train", "--"), ("test", "-")):
      points = [(r["epoch"], r[f"{split}_mse"]) for r in records if f"{split}_mse" in r]
      if points:
        ax.plot(*zip(*points), style, marker="o", markersize=3, label=f"{name}: {split}")
  ax.set(xlabel="epoch", ylabel="reconstruction MSE", yscale="log", title="reconstruction error")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)
