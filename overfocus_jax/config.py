"""Configs: ml_collections ``ConfigDict``s from ``experiments/configs/*.py``, overridden from the command line.

A config file defines ``get_config() -> ConfigDict``. ``--config.FIELD=VALUE`` overrides are parsed against the
type of the field they replace (so ``--config.batch_size=abc`` is an error, not a string), and unknown fields are
errors. :func:`validate` checks every value once, before anything is built or written.
"""

import ast
import importlib.util
import json
import math
import pathlib
import sys

import ml_collections

from overfocus_jax import challenge, models, platform_tuning, plugins
from overfocus_jax.challenge import invariance
from overfocus_jax.challenge.attribution import TARGETS
from overfocus_jax.challenge.rsc import RULES as RSC_RULES
from overfocus_jax.challenge.sgdrop import GRANULARITIES, RULES
from overfocus_jax.data import augmentation, on_device
from overfocus_jax.data.sources import NORMALIZATIONS
from overfocus_jax.errors import UserError
from overfocus_jax.models import convnext
from overfocus_jax.models.attention import COMPATIBILITIES, NORMALISATIONS, first_empty_layer
from overfocus_jax.models.focus import MAX_HARRIS_WINDOW
from overfocus_jax.models.resnet import ACTIVATIONS, NORMS, STEM_POOLS
from overfocus_jax.models.resnet_tv import STEMS as RESNET_TV_STEMS, ZERO_INIT_RESIDUAL
from overfocus_jax.models.weights import LAYOUTS
from overfocus_jax.models.vgg import HEADS as VGG_HEADS
from overfocus_jax.train.state import OPTIMIZERS, SCHEDULES

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent
BATCH_NORM_MODES = ("global", "local")
DEFAULT_CONFIG_NAME = "default.py"


def default_config_path() -> pathlib.Path:
  """The default config shipped with the package (also found in ``experiments/configs/`` of a checkout)."""
  return PACKAGE_ROOT / "configs" / DEFAULT_CONFIG_NAME


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Imports ``path`` and returns its ``get_config()``."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"config file {str(path)!r} not found", "pass --config PATH to an existing .py config "
                    "(see experiments/configs/)")
  spec = importlib.util.spec_from_file_location(f"overfocus_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"config file {str(path)!r} has a syntax error at line {e.lineno}", "fix the file") from None
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {str(path)!r} defines no get_config()", "add def get_config() -> ConfigDict")
  config = module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"get_config() in {str(path)!r} returned {type(config).__name__}",
                    "return an ml_collections.ConfigDict")
  return config


def _parse_value(text: str, current):
  """Parses ``text`` to the type of ``current`` (the value it overrides)."""
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError("expected true or false")
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, (tuple, list)):
    value = ast.literal_eval(text)
    if isinstance(value, (int, float, str)):
      value = (value,)
    if not isinstance(value, (tuple, list)):
      raise ValueError("expected a tuple such as (1,2,3)")
    return tuple(value)
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  if current == "auto" and text.strip().lstrip("-").isdigit():  # a field that is "auto" or a number
    return int(text)
  return text


# Groups whose fields the user names: the keyword arguments of a model or regularizer given by import path.
OPEN_GROUPS = ("model_args", "regularizer.args")


def _literal(text: str):
  """A Python literal (number, bool, tuple, ...) when ``text`` reads as one, else the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  """Sets ``config.<dotted>`` from the command-line string ``text``."""
  *parents, leaf = dotted.split(".")
  if ".".join(parents) in OPEN_GROUPS:  # a new argument of the user's factory
    group = config
    for name in parents:
      group = group[name]
    with group.unlocked():
      group[leaf] = _literal(text) if leaf not in group else _parse_value(text, group[leaf])
    return
  node = config
  for i, name in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise UserError(f"unknown config field 'config.{'.'.join(parents[:i + 1])}'",
                      f"valid fields here: {', '.join(sorted(node.keys()))}")
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else "none"
    raise UserError(f"unknown config field 'config.{dotted}'", f"valid fields here: {valid}")
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise UserError(f"config.{dotted} is a group of fields, not a value", f"set one of its fields, e.g. "
                    f"--config.{dotted}.{sorted(current.keys())[0]}=...")
  try:
    value = _parse_value(text, current)
  except (ValueError, SyntaxError) as e:
    raise UserError(f"cannot read --config.{dotted}={text!r} as {type(current).__name__} ({e})",
                    f"give a {type(current).__name__} value") from None
  with node.unlocked(), node.ignore_type():  # ignore_type: an "auto" field takes a number
    node[leaf] = value


def build_config(config_path: str | None, overrides: list[tuple[str, str]]) -> ml_collections.ConfigDict:
  """Loads a config file (the default one when ``config_path`` is None), applies overrides, validates."""
  config = load_config_file(config_path or default_config_path())
  for dotted, text in overrides:
    apply_override(config, dotted, text)
  validate(config)
  return config


def _require(condition: bool, problem: str, fix: str) -> None:
  if not condition:
    raise UserError(problem, fix)


def _require_choice(value, choices, field: str) -> None:
  _require(value in choices, f"unknown {field} {value!r}", f"use one of {', '.join(choices)} (--config.{field}=...)")


def _require_positive_ints(values, field: str) -> None:
  ok = len(values) > 0 and all(isinstance(v, int) and v > 0 for v in values)
  _require(ok, f"config.{field}={values!r} must be a non-empty tuple of positive integers",
           f"e.g. --config.{field}=(1,2,3)")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field a run depends on; raises :class:`UserError` naming the field and a valid value."""
  _require(config.model in models.MODELS or plugins.is_import_path(config.model), f"unknown model {config.model!r}",
           f"use one of {', '.join(models.MODELS)}, or your own by import path, e.g. --config.model=my_pkg.nets:TinyNet")
  _require(not len(config.model_args) or plugins.is_import_path(config.model),
           f"config.model_args={config.model_args.to_dict()!r} is for a model given by import path, and "
           f"config.model={config.model!r} is one of the library's", "set the model's own group instead "
           f"(--config.{config.model}.FIELD=...), or drop --config.model_args")
  _require_choice(config.dtype, tuple(models.DTYPES), "dtype")
  _require_choice(config.platform_tuning, platform_tuning.MODES, "platform_tuning")
  _require_choice(config.data_on_device, on_device.MODES, "data_on_device")
  _require_choice(config.batch_norm, BATCH_NORM_MODES, "batch_norm")
  _require(isinstance(config.data_workers, int) and config.data_workers >= 0,
           f"config.data_workers={config.data_workers!r} must be an integer of at least 0",
           "set --config.data_workers to N >= 1 grain worker processes, or 0 for threads")
  _require(isinstance(config.steps_per_dispatch, int) and config.steps_per_dispatch >= 0,
           f"config.steps_per_dispatch={config.steps_per_dispatch!r} must be an integer of at least 0",
           "set --config.steps_per_dispatch to K >= 1 steps per compiled call, or 0 for the platform's default")
  _require(isinstance(config.checkpoint_every_steps, int) and config.checkpoint_every_steps >= 0,
           f"config.checkpoint_every_steps={config.checkpoint_every_steps!r} must be an integer of at least 0",
           "set --config.checkpoint_every_steps to N >= 1 steps between checkpoints inside an epoch, or 0 for off")
  _require(math.isfinite(config.checkpoint_every_minutes) and config.checkpoint_every_minutes >= 0,
           f"config.checkpoint_every_minutes={config.checkpoint_every_minutes!r} must be a number of at least 0",
           "set --config.checkpoint_every_minutes, e.g. 30, or 0 for off")
  _require(config.regularizer.name in challenge.NAMES or plugins.is_import_path(config.regularizer.name),
           f"unknown regularizer.name {config.regularizer.name!r}", f"use one of {', '.join(challenge.NAMES)}, or "
           "your own by import path, e.g. --config.regularizer.name=my_pkg.reg:make")
  _require(not len(config.regularizer.args) or plugins.is_import_path(config.regularizer.name),
           f"config.regularizer.args={config.regularizer.args.to_dict()!r} is for a regularizer given by import path, "
           f"and regularizer.name={config.regularizer.name!r} is one of the library's",
           f"set --config.regularizer.{config.regularizer.name}.FIELD instead, or drop --config.regularizer.args")
  _require_choice(config.optimizer, OPTIMIZERS, "optimizer")
  _require_choice(config.schedule, SCHEDULES, "schedule")
  _require(isinstance(config.dataset, str) and config.dataset, "config.dataset is empty",
           "set --config.dataset=mnist5k (or digits, tfds:NAME, idx:DIR, npz:FILE, imagefolder:DIR)")
  _validate_image_size(config.image_size, config.dataset)
  for field in ("batch_size", "eval_batch_size", "num_epochs", "keep_checkpoints"):
    value = config[field]
    _require(isinstance(value, int) and value > 0, f"config.{field}={value!r} must be a positive integer",
             f"set --config.{field} to a value of at least 1")
  for field in ("learning_rate",):
    value = config[field]
    _require(math.isfinite(value) and value > 0, f"config.{field}={value!r} must be a positive number",
             f"set --config.{field}, e.g. 0.1 for SGD or 1e-3 for Adam")
  _require(math.isfinite(config.weight_decay) and config.weight_decay >= 0,
           f"config.weight_decay={config.weight_decay!r} must be >= 0", "set --config.weight_decay, e.g. 5e-4")
  _require(0 <= config.momentum < 1, f"config.momentum={config.momentum!r} must be in [0, 1)",
           "set --config.momentum, e.g. 0.9")
  _require(0 <= config.label_smoothing < 1, f"config.label_smoothing={config.label_smoothing!r} must be in [0, 1)",
           "set --config.label_smoothing, e.g. 0.1")
  _require(0 < config.step_decay_factor <= 1, f"config.step_decay_factor={config.step_decay_factor!r} must be in "
           "(0, 1]", "set --config.step_decay_factor, e.g. 0.1")
  _require_positive_ints(config.step_decay_epochs, "step_decay_epochs") if config.schedule == "step" else None
  _require(config.warmup_epochs >= 0, f"config.warmup_epochs={config.warmup_epochs!r} must be >= 0",
           "set --config.warmup_epochs, e.g. 0")
  arch = config.resnet
  for field in ("stage_widths", "stage_sizes", "stage_strides"):
    _require_positive_ints(arch[field], f"resnet.{field}")
  _require(len(arch.stage_widths) == len(arch.stage_sizes) == len(arch.stage_strides),
           "config.resnet.stage_widths, stage_sizes and stage_strides have different lengths",
           "give one entry per stage in each")
  for field in ("stem_features", "stem_kernel", "stem_strides"):
    _require(isinstance(arch[field], int) and arch[field] > 0, f"config.resnet.{field}={arch[field]!r} must be a "
             "positive integer", f"set --config.resnet.{field}")
  _require_choice(arch.stem_pool, STEM_POOLS, "resnet.stem_pool")
  _require_choice(arch.activation, tuple(ACTIVATIONS), "resnet.activation")
  _require_choice(arch.norm, NORMS, "resnet.norm")
  _validate_vgg(config.vgg)
  _validate_convnext(config.convnext)
  _validate_attention(config.attention)
  _validate_focus(config.focus, config.corner, config.model)
  _validate_regularizer(config.regularizer)
  _validate_environments(config)
  _validate_augmentation(config.augmentation)
  _validate_resnet_tv(config.resnet_tv)
  _validate_pretrained(config)


def _validate_augmentation(group: ml_collections.ConfigDict) -> None:
  _require_choice(group.crop, augmentation.CROPS, "augmentation.crop")
  for name, upper in (("scale", 1.0), ("ratio", math.inf)):
    pair = tuple(group[name])
    _require(len(pair) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
             and 0 < pair[0] <= pair[1] <= upper, f"config.augmentation.{name}={pair!r} must be a range (low, high) "
             f"with 0 < low <= high{' <= 1' if upper == 1.0 else ''}",
             f"set --config.augmentation.{name}, e.g. {'(0.08,1.0)' if name == 'scale' else '(0.75,1.333)'}")
  jitter = group.color_jitter
  _require(isinstance(jitter, (int, float)) and not isinstance(jitter, bool) and 0 <= jitter <= 1,
           f"config.augmentation.color_jitter={jitter!r} must be a number in [0, 1]",
           "set --config.augmentation.color_jitter, e.g. 0.4 (torchvision's usual), or 0 for none")


def _validate_environments(config: ml_collections.ConfigDict) -> None:
  envs, objective = config.environments, config.objective
  for field in ("test_envs", "train_envs"):
    _require(isinstance(envs[field], tuple) and all(isinstance(i, int) and i >= 0 for i in envs[field]),
             f"config.environments.{field}={envs[field]!r} must be a tuple of environment indices",
             f"e.g. --config.environments.{field}=2 or (0,1), or () for the default")
  _require(isinstance(envs.balanced, bool), f"config.environments.balanced={envs.balanced!r} must be true or false",
           "set --config.environments.balanced=true or false")
  _require(isinstance(envs.trial_seed, int) and not isinstance(envs.trial_seed, bool) and envs.trial_seed >= 0,
           f"config.environments.trial_seed={envs.trial_seed!r} must be an integer >= 0",
           "set --config.environments.trial_seed, e.g. 0 (DomainBed's default) or 1")
  _require_choice(objective.name, invariance.NAMES, "objective.name")
  for name in ("irm", "vrex"):
    group = objective[name]
    _require(isinstance(group.penalty_weight, (int, float)) and math.isfinite(group.penalty_weight)
             and group.penalty_weight >= 0, f"config.objective.{name}.penalty_weight={group.penalty_weight!r} must "
             "be a number >= 0", f"set --config.objective.{name}.penalty_weight, e.g. 100")
    _require(isinstance(group.anneal_steps, int) and group.anneal_steps >= 0,
             f"config.objective.{name}.anneal_steps={group.anneal_steps!r} must be an integer >= 0",
             f"set --config.objective.{name}.anneal_steps, e.g. 500 (0: the full penalty from the first step)")
  if objective.name != "erm":
    _require(envs.balanced, f"objective {objective.name!r} needs environment-balanced batches (it compares the "
             "training environments' risks)", "set --config.environments.balanced=true, or --config.objective.name=erm")
    _require(config.batch_norm == "global", f"objective {objective.name!r} compares risks over the whole batch, and "
             "batch_norm=local computes each device's part alone", "set --config.batch_norm=global")


def _require_positive_int(value, field: str, example) -> None:
  _require(isinstance(value, int) and value > 0, f"config.{field}={value!r} must be a positive integer",
           f"set --config.{field}, e.g. {example}")


def _validate_vgg(arch: ml_collections.ConfigDict) -> None:
  _require(isinstance(arch.batch_norm, bool), f"config.vgg.batch_norm={arch.batch_norm!r} must be true or false",
           "set --config.vgg.batch_norm=true or false")
  _require(isinstance(arch.width, (int, float)) and math.isfinite(arch.width) and arch.width > 0,
           f"config.vgg.width={arch.width!r} must be a positive number (it multiplies every conv's width)",
           "set --config.vgg.width, e.g. 0.25 or 1")
  _require(arch.max_pools == "auto" or (isinstance(arch.max_pools, int) and 0 <= arch.max_pools <= 5),
           f"config.vgg.max_pools={arch.max_pools!r} must be auto or an integer in 0..5 (VGG-16 has five blocks)",
           "set --config.vgg.max_pools, e.g. auto (z at least 3x3), 5 (the paper) or 3 for 28x28 images")
  _require_choice(arch.head, VGG_HEADS, "vgg.head")
  _require_positive_int(arch.hidden, "vgg.hidden", 4096)
  _require_positive_int(arch.head_pool, "vgg.head_pool", 7)


def _validate_convnext(arch: ml_collections.ConfigDict) -> None:
  _require_choice(arch.size, tuple(convnext.SIZES), "convnext.size")
  _require_choice(arch.stem, tuple(convnext.STEMS), "convnext.stem")
  _require(isinstance(arch.width, (int, float)) and math.isfinite(arch.width) and arch.width > 0,
           f"config.convnext.width={arch.width!r} must be a positive number (it multiplies every stage's width)",
           "set --config.convnext.width, e.g. 1 (timm's widths) or 0.5")
  _require(isinstance(arch.drop_path_rate, (int, float)) and 0 <= arch.drop_path_rate < 1,
           f"config.convnext.drop_path_rate={arch.drop_path_rate!r} must be in [0, 1)",
           "set --config.convnext.drop_path_rate, e.g. 0 or 0.1")
  for field in ("layer_scale_init", "head_init_scale"):
    value = arch[field]
    _require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
             f"config.convnext.{field}={value!r} must be a positive number", f"set --config.convnext.{field}, e.g. "
             f"{1e-6 if field == 'layer_scale_init' else 1.0}")


def _validate_resnet_tv(arch: ml_collections.ConfigDict) -> None:
  _require_choice(arch.stem, RESNET_TV_STEMS, "resnet_tv.stem")
  _require(str(arch.zero_init_residual).lower() in ZERO_INIT_RESIDUAL,
           f"config.resnet_tv.zero_init_residual={arch.zero_init_residual!r} must be auto, true or false",
           "set --config.resnet_tv.zero_init_residual=auto, true or false")


def _validate_pretrained(config: ml_collections.ConfigDict) -> None:
  """The fields only; the file itself is read (and refused when it is a pickle, missing or does not fit) when a new
  run starts (models/weights.py)."""
  _require(isinstance(config.init_from, str), f"config.init_from={config.init_from!r} must be a path",
           "set --config.init_from=PATH to a .safetensors file, or '' for none")
  _require_choice(config.init_from_layout, LAYOUTS, "init_from_layout")
  _require_choice(config.normalization, NORMALIZATIONS, "normalization")
  _require(isinstance(config.freeze_backbone, bool), f"config.freeze_backbone={config.freeze_backbone!r} must be "
           "true or false", "set --config.freeze_backbone=true or false")
  scale = config.backbone_lr_scale
  _require(isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale >= 0,
           f"config.backbone_lr_scale={scale!r} must be a number >= 0",
           "set --config.backbone_lr_scale, e.g. 0.1 (the encoder at a tenth of the learning rate) or 1")
  _require(not (config.freeze_backbone and scale != 1), f"config.freeze_backbone=true and config.backbone_lr_scale="
           f"{scale!r} both set the encoder's learning rate", "set one of them: freeze_backbone=true is scale 0")


def _validate_attention(arch: ml_collections.ConfigDict) -> None:
  _require_positive_ints(arch.widths, "attention.widths")
  layers = len(arch.widths)
  valid = f"valid layer indices are 1..{layers}, one per entry of config.attention.widths"
  pools, attended = tuple(arch.pool_after), tuple(arch.attention_layers)
  _require(all(isinstance(i, int) and 1 <= i <= layers for i in pools),
           f"config.attention.pool_after={pools!r} names a layer the {layers}-layer backbone does not have", valid)
  _require(len(attended) > 0, "config.attention.attention_layers is empty", "give 2 or 3 layers, e.g. (2,3,4)")
  _require(all(isinstance(i, int) and 1 <= i <= layers for i in attended),
           f"config.attention.attention_layers={attended!r} names a layer the {layers}-layer backbone does not have",
           valid)
  _require(all(a < b for a, b in zip(attended, attended[1:])),
           f"config.attention.attention_layers={attended!r} is not strictly increasing",
           "list each layer once, shallowest first, e.g. (2,3,4)")
  _require_positive_int(arch.global_features, "attention.global_features", 128)
  _require_choice(arch.compatibility, COMPATIBILITIES, "attention.compatibility")
  _require_choice(arch.normalisation, NORMALISATIONS, "attention.normalisation")


def _validate_image_size(image_size, dataset: str) -> None:
  from overfocus_jax.data.imagefolder import MAX_SIZE as MAX_IMAGE_SIZE  # here: imagefolder imports PIL
  _require(isinstance(image_size, int) and 0 <= image_size <= MAX_IMAGE_SIZE,
           f"config.image_size={image_size!r} must be an integer in 0..{MAX_IMAGE_SIZE}",
           "set --config.image_size to the side in pixels, e.g. 224, or 0 for the dataset's own")
  _require(image_size == 0 or dataset.strip().startswith("imagefolder:"),
           f"config.image_size={image_size} resizes imagefolder: datasets only, and config.dataset={dataset!r} "
           "keeps its own size", "set --config.image_size=0")


def _validate_zoom(patch: ml_collections.ConfigDict, model: str) -> None:
  _require(isinstance(patch.zoom, bool), f"config.focus.zoom={patch.zoom!r} must be True or False",
           "set --config.focus.zoom=True to learn each patch's scale")
  if not patch.zoom:
    return
  zoom_range = patch.zoom_range
  _require(isinstance(zoom_range, (tuple, list)) and len(zoom_range) == 2
           and all(isinstance(v, (int, float)) for v in zoom_range)
           and 0 < zoom_range[0] < patch.patch_scale < zoom_range[1] <= 1,
           f"config.focus.zoom_range={zoom_range!r} must be (s_min, s_max) with 0 < s_min < "
           f"patch_scale={patch.patch_scale!r} < s_max <= 1 (the scale starts at patch_scale)",
           "set --config.focus.zoom_range, e.g. (0.2,0.8)")
  _require(model == "focus", f"config.focus.zoom=True needs learned keypoints, but config.model={model!r}",
           "set --config.model=focus, or --config.focus.zoom=False")


def _validate_focus(patch: ml_collections.ConfigDict, harris: ml_collections.ConfigDict, model: str) -> None:
  _require(isinstance(patch.num_keypoints, int) and patch.num_keypoints >= 1,
           f"config.focus.num_keypoints={patch.num_keypoints!r} must be at least 1 (one patch per keypoint)",
           "set --config.focus.num_keypoints, e.g. 4")
  _require(isinstance(patch.patch_size, int) and patch.patch_size >= 1,
           f"config.focus.patch_size={patch.patch_size!r} must be at least 1 pixel", "set --config.focus.patch_size, "
           "e.g. 12 for 28x28 images")
  _require(isinstance(patch.patch_scale, (int, float)) and 0 < patch.patch_scale <= 1,
           f"config.focus.patch_scale={patch.patch_scale!r} must be in (0, 1] (the patch's side over the image's)",
           "set --config.focus.patch_scale, e.g. 0.43 for 12-pixel patches of 28x28 images")
  _require_positive_ints(patch.keypoint_widths, "focus.keypoint_widths")
  _require(isinstance(patch.keypoint_grad_scale, (int, float)) and 0 <= patch.keypoint_grad_scale < math.inf,
           f"config.focus.keypoint_grad_scale={patch.keypoint_grad_scale!r} must be a number >= 0",
           "set --config.focus.keypoint_grad_scale, e.g. 0.01 (0: the keypoints stay on their initial grid)")
  _require_positive_ints(patch.patch_widths, "focus.patch_widths")
  _require_positive_int(patch.feature_width, "focus.feature_width", 64)
  _require(isinstance(patch.hidden, int) and patch.hidden >= 0, f"config.focus.hidden={patch.hidden!r} must be an "
           "integer >= 0", "set --config.focus.hidden, e.g. 128 (0: no hidden layer)")
  _validate_zoom(patch, model)
  _require(isinstance(harris.harris_k, (int, float)) and 0 < harris.harris_k < 0.25,
           f"config.corner.harris_k={harris.harris_k!r} must be in (0, 0.25)",
           "set --config.corner.harris_k, e.g. 0.05")
  # Upper bounds keep the compiled filters small: the smoothing window has radius ⌈3σ⌉ and NMS compares
  # (2r+1)² − 1 shifted copies of the response.
  _require(isinstance(harris.sigma, (int, float)) and 0 < harris.sigma <= MAX_HARRIS_WINDOW,
           f"config.corner.sigma={harris.sigma!r} must be in (0, {MAX_HARRIS_WINDOW}]",
           "set --config.corner.sigma, e.g. 1.0")
  for field in ("nms_radius", "border"):
    value = harris[field]
    _require(isinstance(value, int) and value >= 0, f"config.corner.{field}={value!r} must be an integer >= 0",
             f"set --config.corner.{field}, e.g. 2")
  _require(harris.nms_radius <= MAX_HARRIS_WINDOW, f"config.corner.nms_radius={harris.nms_radius!r} must be at "
           f"most {MAX_HARRIS_WINDOW}", "set --config.corner.nms_radius, e.g. 2")


def _require_fraction(value, field: str, *, upper_inclusive: bool = False) -> None:
  ok = isinstance(value, (int, float)) and (0 <= value <= 1 if upper_inclusive else 0 <= value < 1)
  bounds = "[0, 1]" if upper_inclusive else "[0, 1)"
  _require(ok, f"config.{field}={value!r} must be in {bounds}", f"set --config.{field} to a value in {bounds}")


def _validate_regularizer(reg: ml_collections.ConfigDict) -> None:
  sgdrop, rsc, domainbed = reg.sgdrop, reg.rsc, reg.rsc_domainbed
  _require_fraction(sgdrop.rate, "regularizer.sgdrop.rate")
  _require_choice(sgdrop.granularity, GRANULARITIES, "regularizer.sgdrop.granularity")
  _require_choice(sgdrop.rule, RULES, "regularizer.sgdrop.rule")
  _require(isinstance(sgdrop.mass, (int, float)) and 0 < sgdrop.mass <= 1,
           f"config.regularizer.sgdrop.mass={sgdrop.mass!r} must be in (0, 1]",
           "set --config.regularizer.sgdrop.mass to a share of the attribution, e.g. 0.5")
  _require(isinstance(sgdrop.ramp_epochs, (int, float)) and 0 <= sgdrop.ramp_epochs < math.inf,
           f"config.regularizer.sgdrop.ramp_epochs={sgdrop.ramp_epochs!r} must be a number >= 0",
           "set --config.regularizer.sgdrop.ramp_epochs, e.g. 2 (0: no ramp)")
  if sgdrop.rule == "mass":
    _require(0 < sgdrop.rate < 1, f"config.regularizer.sgdrop.rate={sgdrop.rate!r} must be in (0, 1) with the mass "
             "rule (it caps the share of units dropped)", "set --config.regularizer.sgdrop.rate, e.g. 0.5")
  _require_choice(sgdrop.target, TARGETS, "regularizer.sgdrop.target")
  _require(0 < sgdrop.batch_fraction <= 1, f"config.regularizer.sgdrop.batch_fraction={sgdrop.batch_fraction!r} "
           "must be in (0, 1]", "set --config.regularizer.sgdrop.batch_fraction, e.g. 0.5 (the default) or 1")
  _require_fraction(sgdrop.ema_decay, "regularizer.sgdrop.ema_decay")
  _require_fraction(rsc.spatial_fraction, "regularizer.rsc.spatial_fraction")
  _require_fraction(rsc.channel_fraction, "regularizer.rsc.channel_fraction")
  _require_fraction(rsc.spatial_probability, "regularizer.rsc.spatial_probability", upper_inclusive=True)
  _require(rsc.batch_percent < 1, f"config.regularizer.rsc.batch_percent={rsc.batch_percent!r} must be below 1",
           "set a value in [0, 1), or -1 for the official curriculum")
  _require_choice(rsc.rule, RSC_RULES, "regularizer.rsc.rule")
  _require_choice(domainbed.rule, RSC_RULES, "regularizer.rsc_domainbed.rule")
  _require_fraction(domainbed.feature_drop, "regularizer.rsc_domainbed.feature_drop")
  _require_fraction(domainbed.batch_drop, "regularizer.rsc_domainbed.batch_drop")


def check_fits_images(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> None:
  """Raises :class:`UserError` when ``config.model`` cannot take (H, W, C) images, with the field to change.

  Only these models have such limits: the attention backbone's unpadded pools, the focus models' patch size and
  the corner detector's border. Call it once the dataset is known, before the model is initialised.
  """
  height, width = int(image_shape[0]), int(image_shape[1])
  if config.model == "attention":
    arch = config.attention
    empty = first_empty_layer(height, width, len(arch.widths), tuple(arch.pool_after))
    _require(empty is None, f"{height}x{width} images are too small for the attention backbone: its 2x2 pools "
             f"(config.attention.pool_after={tuple(arch.pool_after)}) shrink them to nothing by layer {empty}",
             "remove pools from --config.attention.pool_after or use larger images")
  if config.model in ("focus", "corner"):
    size = config.focus.patch_size
    _require(size <= min(height, width), f"config.focus.patch_size={size} is larger than the {height}x{width} "
             "images", f"set --config.focus.patch_size to at most {min(height, width)}")
  if config.model == "corner":
    k = config.focus.num_keypoints
    _require(k <= height * width, f"config.focus.num_keypoints={k} asks for more corners than the {height}x{width} "
             "images have pixels", f"set --config.focus.num_keypoints to at most {height * width}")  # top-K of pixels
    border = config.corner.border
    _require(2 * border < min(height, width), f"config.corner.border={border} leaves no pixel of the "
             f"{height}x{width} images to find corners in", f"set --config.corner.border below "
             f"{(min(height, width) + 1) // 2}")


# config.json's "format": 2 since SGDrop's rule "quantile" means the formula 1[A ≤ quantile(A, 1 − ρ)] as written
# and the RSCs follow their reference code's counts by default; in a config.json without it, SGDrop's "quantile" and
# both RSCs counted exactly ⌈f·N⌉ units: today's rule "topk".
CONFIG_FORMAT = 2
FORMAT_KEY = "format"


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps({**config.to_dict(), FORMAT_KEY: CONFIG_FORMAT}, indent=2, sort_keys=True, default=list)


# What a regularizer's rule field read before CONFIG_FORMAT 2, for a run that keeps it: SGDrop's "quantile", or none
# (the RSCs had no rule field), is now "topk".
EARLIER_RULES = {"sgdrop": "quantile", "rsc": None, "rsc_domainbed": None}


def trained_rule(saved: dict) -> str | None:
  """The regularizer of a saved config.json whose masks counted exactly ⌈f·N⌉ under a rule that now means something
  else (SGDrop's earlier "quantile"; the RSCs before they followed their reference code), or None."""
  if saved.get(FORMAT_KEY, 1) >= CONFIG_FORMAT:
    return None
  regularizer = saved.get("regularizer", {})
  name = regularizer.get("name")
  if name not in EARLIER_RULES or regularizer.get(name, {}).get("rule") != EARLIER_RULES[name]:
    return None
  return name


def trained_rule_note(name: str) -> str:
  return (f"overfocus: note: this run was trained with {name}'s exact-count rule (⌈f·N⌉ units), which its "
          f"config.json names as the earlier default; it keeps that rule, now rule 'topk'")


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a saved config on top of today's defaults, so a run saved before a field existed still loads
  (the new field takes its default); lists become tuples again so overrides keep their types. A saved true/false
  where a field has since become a word (``resnet_tv.zero_init_residual``: auto | true | false) is read as that
  word; and a run's regularizer that counted exactly ⌈f·N⌉ under a rule whose meaning has since changed
  (:func:`trained_rule`) keeps that rule, "topk" (one line on stderr says so)."""

  def tuples(node):
    if isinstance(node, dict):
      return {k: tuples(v) for k, v in node.items()}
    if isinstance(node, list):
      return tuple(tuples(v) for v in node)
    return node

  def overlay(base: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
      if isinstance(value, dict) and isinstance(base.get(key), ml_collections.ConfigDict):
        overlay(base[key], value)
      else:
        if isinstance(value, bool) and isinstance(base.get(key), str):
          value = str(value).lower()
        with base.unlocked(), base.ignore_type():  # a field that is "auto" today may hold a saved number
          base[key] = value

  saved = json.loads(text)
  earlier = trained_rule(saved)
  saved.pop(FORMAT_KEY, None)
  config = load_config_file(default_config_path())
  overlay(config, tuples(saved))
  if earlier:  # the run keeps the rule it was trained with
    print(trained_rule_note(earlier), file=sys.stderr)
    config.regularizer[earlier].rule = "topk"
  return config
