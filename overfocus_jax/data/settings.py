"""The data's config fields: which dataset, how it is augmented and streamed, and its environments
(:mod:`overfocus_jax.fields`)."""

import math

from overfocus_jax import fields
from overfocus_jax.data import augmentation, on_device
from overfocus_jax.data.sources import NORMALIZATIONS


def check_image_size(image_size, dataset: str) -> None:
  from overfocus_jax.data.imagefolder import MAX_SIZE  # here: imagefolder imports PIL
  fields.require(isinstance(image_size, int) and 0 <= image_size <= MAX_SIZE,
                 f"config.image_size={image_size!r} must be an integer in 0..{MAX_SIZE}",
                 "set --config.image_size to the side in pixels, e.g. 224, or 0 for the dataset's own")
  fields.require(image_size == 0 or dataset.strip().startswith("imagefolder:"),
                 f"config.image_size={image_size} resizes imagefolder: datasets only, and config.dataset={dataset!r} "
                 "keeps its own size", "set --config.image_size=0")


def check_data(config) -> None:
  fields.require(isinstance(config.dataset, str) and config.dataset, "config.dataset is empty",
                 "set --config.dataset=mnist5k (or digits, tfds:NAME, idx:DIR, npz:FILE, imagefolder:DIR)")
  check_image_size(config.image_size, config.dataset)
  fields.require_choice(config.normalization, NORMALIZATIONS, "normalization")
  fields.require_choice(config.data_on_device, on_device.MODES, "data_on_device")
  fields.require(isinstance(config.data_workers, int) and config.data_workers >= 0,
                 f"config.data_workers={config.data_workers!r} must be an integer of at least 0",
                 "set --config.data_workers to N >= 1 grain worker processes, or 0 for threads")


def check_augmentation(config) -> None:
  group = config.augmentation
  fields.require_choice(group.crop, augmentation.CROPS, "augmentation.crop")
  for name, upper in (("scale", 1.0), ("ratio", math.inf)):
    pair = tuple(group[name])
    fields.require(len(pair) == 2 and all(fields.is_number(v) for v in pair) and 0 < pair[0] <= pair[1] <= upper,
                   f"config.augmentation.{name}={pair!r} must be a range (low, high) with 0 < low <= high"
                   f"{' <= 1' if upper == 1.0 else ''}",
                   f"set --config.augmentation.{name}, e.g. {'(0.08,1.0)' if name == 'scale' else '(0.75,1.333)'}")
  jitter = group.color_jitter
  fields.require(fields.is_number(jitter) and 0 <= jitter <= 1,
                 f"config.augmentation.color_jitter={jitter!r} must be a number in [0, 1]",
                 "set --config.augmentation.color_jitter, e.g. 0.4 (torchvision's usual), or 0 for none")


def check_environments(config) -> None:
  envs = config.environments
  for field in ("test_envs", "train_envs"):
    fields.require(isinstance(envs[field], tuple) and all(isinstance(i, int) and i >= 0 for i in envs[field]),
                   f"config.environments.{field}={envs[field]!r} must be a tuple of environment indices",
                   f"e.g. --config.environments.{field}=2 or (0,1), or () for the default")
  fields.require_bool(envs.balanced, "environments.balanced")
  fields.require(isinstance(envs.trial_seed, int) and not isinstance(envs.trial_seed, bool) and envs.trial_seed >= 0,
                 f"config.environments.trial_seed={envs.trial_seed!r} must be an integer >= 0",
                 "set --config.environments.trial_seed, e.g. 0 (DomainBed's default) or 1")


AUGMENTATION = fields.Group("augmentation", "which augmentation (data/augmentation.py); the mirror stays on for "
                            "natural images only", {
    "crop": fields.Field("pad", "pad: a shift by up to an eighth of the side, zero fill | resized: torchvision's "
                         "RandomResizedCrop (scale, ratio), for natural images"),
    "scale": fields.Field((0.08, 1.0), "resized: the box's share of the image's area"),
    "ratio": fields.Field((0.75, 4 / 3), "resized: the box's aspect (width / height)"),
    "color_jitter": fields.Field(0.0, "j: brightness, contrast and saturation each x U(1 - j, 1 + j) (0: off)"),
}, validate=check_augmentation)

DATA = fields.Group("", "the data", {
    "dataset": fields.Field("mnist5k", "mnist5k | digits | colored_mnist | rotated_mnist | mnist5k_shortcut[:P] | "
                            "mnist5k_color[:P] | mnist5k_glyph[:P] | tfds:NAME | idx:DIR | npz:FILE | "
                            "imagefolder:DIR[:SIZE][:domains] | your own loader by import path, PKG.MOD:load"),
    "data_dir": fields.Field("", "a prepared TFDS directory, for tfds:NAME ('': TFDS's default)"),
    "skip_bad_images": fields.Field(False, "imagefolder: leave out unreadable files and count them (else an error)"),
    "image_size": fields.Field(0, "imagefolder: the side images are resized and centre-cropped to (0: the spec's "
                               ":SIZE, or 64)"),
    "augment": fields.Field(True, "random crops; horizontal flips for natural images only"),
    "augmentation": AUGMENTATION,
    "normalization": fields.Field("auto", "auto: ImageNet's mean/std with init_from (what such weights expect), else "
                                  "the dataset's own | dataset | imagenet"),
    "data_on_device": fields.Field("auto", "auto: on when the data fits an accelerator, on a CPU for the models that "
                                   "prefer it | on | off (grain on the host)"),
    "data_workers": fields.Field(0, "off: grain worker processes that read and augment (0: threads of this "
                                 "process)"),
}, validate=check_data)

ENVIRONMENTS = fields.Group("environments", "training on environments as DomainBed does (colored_mnist, "
                            "rotated_mnist, imagefolder:DIR:domains); every evaluation logs env{i}_in_acc and "
                            "env{i}_out_acc", {
    "test_envs": fields.Field((), "held out, never trained on; test_accuracy is then their in-split accuracy"),
    "train_envs": fields.Field((), "the environments trained on; (): every one not held out"),
    "balanced": fields.Field(True, "each batch holds batch_size / E examples of each of the E training "
                             "environments (a batch_size that does not divide becomes the nearest that does)"),
    "trial_seed": fields.Field(0, "seeds each environment's 80/20 in/out split (DomainBed's --trial_seed)"),
}, validate=check_environments)
