r"""Where must a model look to rebuild the whole image? The focus seed's saliency-by-reconstruction experiment,
trained end to end (overfocus_jax.models.reconstruction), against the same decoder fed other positions:

- ``learned``: the saliency network's K soft-argmax keypoints, trained through the bilinear patch sampler;
- ``seed_as_written``: the seed's code as written, its K highest heatmap cells read as integers, so no gradient
  reaches the heatmap and only the decoder trains;
- ``random``: K distinct heatmap cells drawn per image;
- ``harris``: the K strongest Harris corners (overfocus_jax.models.focus.harris_keypoints).

    python experiments/saliency_reconstruction.py --seeds 0 1 2 --out experiments/results/saliency_reconstruction.jsonl
    python experiments/saliency_reconstruction.py --dataset mnist5k_glyph --seeds 0 --out FILE --figures DIR

The seed's setting: K = 5 patches of 9×9 pixels, the MLP decoder (dropout 0.5, 1,024 hidden units, dropout 0.5),
MSE, Adam 1e-3, batch 16. Every run trains on ``--train-dataset`` (default mnist5k, 4,000 digits) and reports the
reconstruction MSE on ``--dataset``'s test split, one JSON line per selector and seed (``selector``, ``seed``,
``test_mse``, the keypoints' spread over the test images and the commit). ``--classify`` also trains the focus
models' patch classifier on the K patches of each trained saliency, frozen (``classify_accuracy`` on the dataset's
test split, trained on its training split).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
SELECTORS = ("learned", "seed_as_written", "random", "harris")


class Failure(Exception):
  """Bad input: one line on stderr, exit code 2."""


def commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def parse(argv):
  class Parser(argparse.ArgumentParser):
    def error(self, message):
      raise Failure(f"{message}; see 'python experiments/saliency_reconstruction.py --help'")

  parser = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
  parser.add_argument("--dataset", default="mnist5k", help="the test split reported (default mnist5k)")
  parser.add_argument("--train-dataset", default="mnist5k", help="trained on (default mnist5k)")
  parser.add_argument("--selectors", nargs="+", default=list(SELECTORS), help=f"some of {' '.join(SELECTORS)}")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0])
  parser.add_argument("--epochs", type=int, default=10, help="epochs of the training split (default 10)")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument("--num-keypoints", type=int, default=5, help="K (default 5)")
  parser.add_argument("--patch-size", type=int, default=9, help="P, pixels per patch side (default 9)")
  parser.add_argument("--temperature", type=float, default=0.2, help="the soft-argmax's temperature τ")
  parser.add_argument("--decoder-positions", action="store_true", help="the decoder also sees each patch's (x, y)")
  parser.add_argument("--classify", action="store_true", help="also train a patch classifier on each saliency")
  parser.add_argument("--classify-epochs", type=int, default=10)
  parser.add_argument("--out", required=True, help="JSON lines, appended; a finished selector and seed is skipped")
  parser.add_argument("--figures", help="folder for each selector's figure (seed 0): heatmap, patches, reconstruction")
  args = parser.parse_args(argv)
  unknown = sorted(set(args.selectors) - set(SELECTORS))
  if unknown:
    raise Failure(f"unknown selector {unknown[0]!r}; use some of {' '.join(SELECTORS)}")
  for name in ("epochs", "batch_size", "classify_epochs"):
    if getattr(args, name) < 1:
      raise Failure(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
  if args.temperature <= 0:
    raise Failure(f"--temperature must be positive, got {args.temperature}")
  return args


def load(spec: str):
  import numpy as np
  from overfocus_jax.data.sources import load_dataset
  from overfocus_jax.errors import UserError
  try:
    data = load_dataset(spec)
  except UserError as error:
    raise Failure(str(error)) from None

  def floats(split):
    return np.asarray(split.images, np.float32) / 255.0, np.asarray(split.labels, np.int32)

  return data, floats(data.train), floats(data.test)


def build(args, image_shape, selector):
  """The model of one selector; a ValueError naming the argument for a K or patch size the images cannot hold."""
  from overfocus_jax.models import reconstruction
  height, width, _ = image_shape
  select = "hard" if selector == "seed_as_written" else "soft"
  scale = args.patch_size / min(height, width)
  reconstruction.check_reconstruction(args.num_keypoints, args.patch_size, scale, select, height, width,
                                      reconstruction.heatmap_side(height) * reconstruction.heatmap_side(width))
  return reconstruction.SaliencyReconstructor(
      tuple(image_shape), num_keypoints=args.num_keypoints, patch_size=args.patch_size, patch_scale=scale,
      select=select, temperature=args.temperature, decoder_positions=args.decoder_positions)


def given_points(selector, images, key, args):
  """The positions the decoder is fed for the baselines; None: the saliency network's."""
  from overfocus_jax.models import focus, reconstruction
  if selector == "random":
    side_h, side_w = (reconstruction.heatmap_side(s) for s in images.shape[1:3])
    return reconstruction.random_cell_points(key, images.shape[0], args.num_keypoints, side_h, side_w)
  if selector == "harris":
    return focus.harris_keypoints(images, args.num_keypoints, harris_k=0.05, sigma=1.0, nms_radius=2, border=2)
  return None


def train_reconstruction(args, selector, seed, train_images):
  """Trains one model; returns (model, params)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from overfocus_jax.models import reconstruction

  model = build(args, train_images.shape[1:], selector)
  key = jax.random.PRNGKey(seed)
  params = model.init({"params": key}, jnp.asarray(train_images[:2]))["params"]
  tx = optax.adam(args.learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, key):
    point_key, dropout_key = jax.random.split(key)
    points = given_points(selector, images, point_key, args)

    def loss_fn(params):
      rebuilt, _, _ = model.apply({"params": params}, images, True, points, rngs={"dropout": dropout_key})
      return jnp.mean(reconstruction.reconstruction_mse(rebuilt, images))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  steps_per_epoch = len(train_images) // args.batch_size
  for epoch in range(args.epochs):
    order = rng.permutation(len(train_images))
    for i in range(steps_per_epoch):
      key, step_key = jax.random.split(key)
      batch = train_images[order[i * args.batch_size:(i + 1) * args.batch_size]]
      params, opt_state, loss = step(params, opt_state, jnp.asarray(batch), step_key)
  return model, params


def evaluate(model, params, selector, images, args, batch=500):
  """Test MSE and the keypoints (N, K, 2) the decoder was fed."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from overfocus_jax.models import reconstruction

  @jax.jit
  def run(images, key):
    points = given_points(selector, images, key, args)
    rebuilt, points, heatmap = model.apply({"params": params}, images, False, points)
    return reconstruction.reconstruction_mse(rebuilt, images), points

  errors, points = [], []
  key = jax.random.PRNGKey(12345)  # the random baseline's positions at test time, the same for every run
  for start in range(0, len(images), batch):
    key, batch_key = jax.random.split(key)
    mse, p = run(jnp.asarray(images[start:start + batch]), batch_key)
    errors.append(np.asarray(mse))
    points.append(np.asarray(p))
  return float(np.concatenate(errors).mean()), np.concatenate(points)


def spread_px(points, height, width):
  """Per keypoint, the RMS distance (pixels) of its position from its mean position over the images."""
  import numpy as np
  pixels = (points + 1.0) * np.array([width, height]) / 2.0
  return [float(v) for v in np.sqrt(((pixels - pixels.mean(axis=0)) ** 2).sum(-1).mean(axis=0))]


def classify(args, model, params, selector, data_splits, seed):
  """Test accuracy of the focus models' patch classifier (PatchEncoder + PatchHead) trained on the K patches of a
  frozen saliency (or the baseline's positions)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from overfocus_jax.models import focus

  (train_x, train_y), (test_x, test_y), num_classes = data_splits
  height, width = train_x.shape[1:3]

  class PatchClassifier(nn.Module):
    @nn.compact
    def __call__(self, images, points, train: bool):
      z = focus.PatchEncoder(args.patch_size, args.patch_size / min(height, width), name="patches")(images, points,
                                                                                                  train)
      return focus.PatchHead(num_classes, name="head")(z, train)

  def points_of(images, key):
    given = given_points(selector, images, key, args)
    if given is not None:
      return given
    return jax.lax.stop_gradient(model.apply({"params": params}, images, method=model.keypoints))

  classifier = PatchClassifier()
  key = jax.random.PRNGKey(1000 + seed)
  probe = jnp.asarray(train_x[:2])
  variables = classifier.init(key, probe, points_of(probe, key), True)
  tx = optax.adam(args.learning_rate)
  cls_params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(cls_params)

  @jax.jit
  def step(cls_params, batch_stats, opt_state, images, labels, key):
    points = points_of(images, key)

    def loss_fn(cls_params):
      logits, updates = classifier.apply({"params": cls_params, "batch_stats": batch_stats}, images, points, True,
                                         mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(cls_params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(cls_params, updates), batch_stats, opt_state

  @jax.jit
  def predict(cls_params, batch_stats, images, key):
    logits = classifier.apply({"params": cls_params, "batch_stats": batch_stats}, images, points_of(images, key), False)
    return jnp.argmax(logits, -1)

  rng, batch_size = np.random.default_rng(seed), 128
  for _ in range(args.classify_epochs):
    order = rng.permutation(len(train_x))
    for i in range(len(train_x) // batch_size):
      rows = order[i * batch_size:(i + 1) * batch_size]
      key, step_key = jax.random.split(key)
      cls_params, batch_stats, opt_state = step(cls_params, batch_stats, opt_state, jnp.asarray(train_x[rows]),
                                                jnp.asarray(train_y[rows]), step_key)
  key = jax.random.PRNGKey(12345)
  right = 0
  for start in range(0, len(test_x), 500):
    key, batch_key = jax.random.split(key)
    right += int((np.asarray(predict(cls_params, batch_stats, jnp.asarray(test_x[start:start + 500]), batch_key))
                  == test_y[start:start + 500]).sum())
  return right / len(test_x)


def figure(path, model, params, selector, images, args, n=8):
  """Per test image: the image with its K patches outlined, the heatmap, the reconstruction."""
  import jax
  import jax.numpy as jnp
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  images = jnp.asarray(images[:n])
  points = given_points(selector, images, jax.random.PRNGKey(12345), args)
  rebuilt, points, heatmap = model.apply({"params": params}, images, False, points)
  height, width = images.shape[1:3]
  half = args.patch_size / 2
  fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2))
  for i in range(n):
    gray = np.asarray(images[i]).mean(-1)
    axes[0, i].imshow(gray, cmap="gray", vmin=0, vmax=1)
    for x, y in np.asarray(points[i]):
      col, row = (x + 1) * width / 2 - 0.5, (y + 1) * height / 2 - 0.5
      axes[0, i].add_patch(plt.Rectangle((col - half, row - half), args.patch_size, args.patch_size, fill=False,
                                         edgecolor="tab:red", linewidth=1))
    axes[1, i].imshow(np.asarray(heatmap[i]), cmap="magma")
    axes[2, i].imshow(np.asarray(rebuilt[i]).mean(-1), cmap="gray", vmin=0, vmax=1)
    for row in range(3):
      axes[row, i].axis("off")
  for row, title in enumerate(("patches", "heatmap", "reconstruction")):
    axes[row, 0].set_title(title, fontsize=8, loc="left")
  fig.suptitle(f"{selector}: K={args.num_keypoints} patches of {args.patch_size}x{args.patch_size}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def done_runs(out: pathlib.Path) -> set:
  """The settings already recorded in ``out``: a rerun of the same command trains only what is missing."""
  if not out.is_file():
    return set()
  keys = set()
  for line in out.read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      keys.add((record["selector"], record["seed"], record["dataset"], record["train_dataset"], record["epochs"],
                record["num_keypoints"], record["patch_size"], record["decoder_positions"], record["temperature"],
                record.get("classify_accuracy") is not None))
  return keys


def main(argv=None) -> int:
  try:
    args = parse(sys.argv[1:] if argv is None else argv)
    train_data, (train_x, _), _ = load(args.train_dataset)
    test_data, (test_train_x, test_train_y), (test_x, test_y) = load(args.dataset)
    if train_x.shape[1:] != test_x.shape[1:]:
      raise Failure(f"--dataset {args.dataset} has {test_x.shape[1:]} images, --train-dataset {args.train_dataset} "
                    f"{train_x.shape[1:]}; use datasets of one image shape")
    build(args, train_x.shape[1:], "learned")  # bad K or patch size: one line before any training
  except (Failure, ValueError) as error:
    print(f"saliency_reconstruction: error: {error}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  done = done_runs(out)
  figures = pathlib.Path(args.figures) if args.figures else None
  if figures:
    figures.mkdir(parents=True, exist_ok=True)
  revision = commit()
  for seed in args.seeds:
    for selector in args.selectors:
      key = (selector, seed, args.dataset, args.train_dataset, args.epochs, args.num_keypoints, args.patch_size,
             args.decoder_positions, args.temperature, args.classify)
      if key in done:
        print(f"{selector} seed {seed}: done before")
        continue
      start = time.perf_counter()
      model, params = train_reconstruction(args, selector, seed, train_x)
      mse, points = evaluate(model, params, selector, test_x, args)
      record = {"selector": selector, "seed": seed, "dataset": args.dataset, "train_dataset": args.train_dataset,
                "test_mse": mse, "epochs": args.epochs, "batch_size": args.batch_size,
                "num_keypoints": args.num_keypoints, "patch_size": args.patch_size,
                "decoder_positions": args.decoder_positions, "temperature": args.temperature,
                "spread_px": spread_px(points, *test_x.shape[1:3]), "commit": revision}
      if args.classify:
        record["classify_accuracy"] = classify(args, model, params, selector,
                                               ((test_train_x, test_train_y), (test_x, test_y),
                                                test_data.num_classes), seed)
      record["seconds"] = round(time.perf_counter() - start, 1)
      with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
      extra = f", accuracy {record['classify_accuracy']:.3f}" if args.classify else ""
      print(f"{selector} seed {seed}: test MSE {mse:.5f}{extra} ({record['seconds']:.0f} s)", flush=True)
      if figures and seed == args.seeds[0]:
        figure(figures / f"{selector}.png", model, params, selector, test_x, args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
