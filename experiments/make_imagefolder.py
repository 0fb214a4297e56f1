"""An image folder (``imagefolder:DIR``'s layout) written from a dataset this library reads, for trying the
``imagefolder:`` path and fine-tuning without downloading anything.

    python experiments/make_imagefolder.py DIR [--dataset mnist5k_rgb] [--classes 0 1 2 3 4] [--per-class N]

Writes ``DIR/train/CLASS/00000.png`` … and ``DIR/test/CLASS/…`` from the dataset's train and test splits (PNG,
lossless: the folder's pixels are the dataset's), class folders named by the label (``0`` … ``9``, zero-padded
beyond), at most
``--per-class`` images of each class per split (default: all), only the ``--classes`` given (default: all), so
the folder's labels (its sorted class names, numbered from 0) are the kept labels in order.
``overfocus train --config.dataset=imagefolder:DIR:SIZE`` then reads it back.
"""

import argparse
import pathlib
import sys

import numpy as np
from PIL import Image

from overfocus_jax.data.sources import load_dataset
from overfocus_jax.errors import UserError


def write_split(source, directory: pathlib.Path, classes, per_class: int | None) -> int:
  """The examples of ``source`` with a label in ``classes`` as PNGs under ``directory/LABEL/``; returns the count."""
  labels = np.asarray(source.labels)
  width = len(str(max(classes)))  # zero-padded names sort as the labels do: imagefolder numbers the sorted names
  written = 0
  for label in classes:
    rows = np.flatnonzero(labels == label)[:per_class]
    folder = directory / f"{label:0{width}d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
      image = np.asarray(source[int(row)][0], np.uint8)
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{i:05d}.png")
    written += len(rows)
  return written


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("dir", type=pathlib.Path)
  parser.add_argument("--dataset", default="mnist5k_rgb", help="any spec load_dataset reads (default mnist5k_rgb)")
  parser.add_argument("--classes", type=int, nargs="+", help="the labels to keep (default: all)")
  parser.add_argument("--per-class", type=int, help="at most this many images of each class per split")
  args = parser.parse_args(argv)
  try:
    dataset = load_dataset(args.dataset)
  except UserError as e:
    print(f"make_imagefolder: error: {e}", file=sys.stderr)
    return 2
  classes = args.classes if args.classes is not None else list(range(dataset.num_classes))
  unknown = [c for c in classes if not 0 <= c < dataset.num_classes]
  if unknown or (args.per_class is not None and args.per_class < 1):
    print(f"make_imagefolder: error: classes must lie in 0..{dataset.num_classes - 1} and --per-class be >= 1",
          file=sys.stderr)
    return 2
  counts = {split: write_split(getattr(dataset, split), args.dir / split, classes, args.per_class)
            for split in ("train", "test")}
  print(f"{args.dir}: {counts['train']} train and {counts['test']} test images of {len(classes)} classes "
        f"from {args.dataset}")
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
