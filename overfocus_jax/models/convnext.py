r"""ConvNeXt (Liu, Mao, Wu, Feichtenhofer, Darrell & Xie, CVPR 2022, "A ConvNet for the 2020s", arXiv 2201.03545)
in timm's small published sizes (``timm/models/convnext.py``: ``convnext_atto`` … ``convnext_tiny``).

    stem(x)    = LayerNorm(conv_{k×k, stride k}(x))          k = 4 ("imagenet", the paper's), 2 ("small"), 1 ("pixel")
    stage i    = [LayerNorm → conv_{2×2, stride 2}, for i > 0] then depths[i] blocks of width dims[i]
    block(x)   = x + drop_path(γ ⊙ fc2(gelu(fc1(LayerNorm(dwconv_{7×7}(x))))))      fc1: C → 4C, fc2: 4C → C
    head(z)    = fc(LayerNorm(mean_hw(z)))                   (timm's head.norm and head.fc: pool, then norm)

    size    depths         dims                  timm's params (224×224×3, 1,000 classes)   MLP in timm
    atto    (2, 2, 6, 2)   (40, 80, 160, 320)     3,695,520                                  1×1 convs
    femto   (2, 2, 6, 2)   (48, 96, 192, 384)     5,217,784                                  1×1 convs
    pico    (2, 2, 6, 2)   (64, 128, 256, 512)    9,045,672                                  1×1 convs
    nano    (2, 2, 8, 2)   (80, 160, 320, 640)   15,593,560                                  1×1 convs
    tiny    (3, 3, 9, 3)   (96, 192, 384, 768)   28,589,128                                  Linear (the paper's)

Every LayerNorm has ε = 1e-6 (timm's LayerNorm/LayerNorm2d) and computes its statistics in float32, two-pass as
torch does; GELU is exact (torch's ``nn.GELU``). timm builds the four small sizes' MLPs as 1×1 convs (``conv_mlp``,
the same maths, weights (out, in, 1, 1)); here every MLP is a dense layer, and :func:`from_timm`/:func:`to_timm`
convert either form. Initialisation is timm's ``_init_weights``: every conv and dense kernel N(0, 0.02²) truncated
at ±2 (absolute, as timm's ``trunc_normal_``: ±100σ, in effect untruncated), zero biases, the classifier's kernel
times ``head_init_scale`` (timm's default 1), LayerNorms at the identity, layer scale γ = ``layer_scale_init``
(1e-6). Drop path (stochastic depth) zeroes each sample's residual branch with probability p and scales the kept
ones by 1/(1 − p), in training only; p rises linearly from 0 at the first block to ``drop_path_rate`` at the last
(timm's ``dp_rates``). It draws from the ``dropout`` PRNG stream, which :class:`overfocus_jax.models.Model` passes
as ``rng`` and the train step derives from its own key; with ``drop_path_rate = 0`` (the default) the model needs no
randomness at all.

Image sizes: the stem and the 2×2 downsamplings zero-pad a side that their stride does not divide at its end (bottom,
right) up to the next multiple, where timm's unpadded convs would drop those pixels. Their windows do not overlap, so
every output timm computes is computed identically, and the padded ones are extra rows and columns at the end: on
sides that the stride divides at every step (224×224 with the ImageNet stem) the model is timm's exactly, and any
image of at least 1×1 goes through (28×28: ImageNet stem 7 → 4 → 2 → 1; small stem 14 → 7 → 4 → 2; 8×8 digits with
the small stem 4 → 2 → 1 → 1). The small stems keep stage 0 at the stem's resolution (timm's ``patch_size=2`` would
add a stride-2 downsampling to stage 0 instead).

The split:

    z      = encode(x)   = stages(stem(x)): the last stage's map (B, H', W', dims[-1])
    logits = classify(z) = fc(LayerNorm(mean_hw(z)))

and at the pooled vector, *after* the head's LayerNorm (timm's ``forward_head(pre_logits=True)``, the features its
users take): ``embed(x)`` = LayerNorm(mean_hw(z)) (B, dims[-1]), ``classify_embedding`` = fc alone, as for every
model here. A regularizer that zeroes features of the pooled vector thus reaches the classifier as zeros; before the
norm, the renormalisation would rescale what was kept. No batch statistics: training and inference differ by drop
path alone.

Weights: parameter names follow timm's state dict (``stages.i.blocks.j`` → ``stage{i}_block{j}``, 0-based as there);
:func:`from_timm` maps a timm state dict (numpy arrays) onto this model's variables (OIHW → HWIO kernels, depthwise
(C, 1, 7, 7) → (7, 7, 1, C), dense (out, in) → (in, out)) — ``config.init_from`` with ``init_from_layout=timm``
finds it (:mod:`overfocus_jax.models.weights`) — and :func:`to_timm` back. With random weights and timm's state dict
loaded, this model's logits equal timm's own ``convnext_atto`` to 1e-4 of their largest magnitude (float32;
``tests/test_convnext.py``, where torch and timm are installed; ``python experiments/check_pretrained.py`` compares
every size).

On one CPU device, ``platform_tuning=auto`` computes the depthwise convolutions as shifted sums
(:mod:`overfocus_jax.platform_tuning`, point 3).
"""

import functools
import math
import sys
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from overfocus_jax import fields
from overfocus_jax.models import norms, weights
from overfocus_jax.models.spec import ModelSpec, Platform
from overfocus_jax.models.split import EncoderHead

ModuleDef = Any  # a flax module class or a functools.partial of one (flax's examples' convention)

# size -> (depths, dims, conv_mlp): timm's convnext_<size>; conv_mlp: timm stores the MLP as 1×1 convs.
SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320), True),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384), True),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512), True),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640), True),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768), False),
}
STEMS = {"imagenet": 4, "small": 2, "pixel": 1}  # the stem's kernel and stride
EPSILON = 1e-6  # timm's LayerNorm and LayerNorm2d
KERNEL_STD = 0.02
# timm's trunc_normal_(std=.02) truncates at a=-2, b=2 in absolute units, i.e. at ±100σ.
KERNEL_INIT = nn.initializers.truncated_normal(KERNEL_STD, lower=-2.0 / KERNEL_STD, upper=2.0 / KERNEL_STD)
DW_KERNEL = 7
MLP_RATIO = 4
gelu = functools.partial(nn.gelu, approximate=False)  # torch's nn.GELU()


def scaled_dims(dims: Sequence[int], width: float = 1.0) -> tuple[int, ...]:
  """The stage widths times ``width``, rounded, at least 1."""
  return tuple(max(1, round(d * width)) for d in dims)


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
  """Per stage, each block's drop-path probability: linear from 0 at the first block to ``rate`` at the last."""
  flat = np.linspace(0.0, rate, sum(depths)).tolist()
  starts = np.cumsum((0, *depths))
  return [flat[a:b] for a, b in zip(starts[:-1], starts[1:])]


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Stochastic depth on a residual branch x (B, ...): each sample's branch is zeroed with probability ``rate`` and
  the kept ones are scaled by 1/(1 − rate), so its expectation is unchanged."""
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def pad_to_multiple(x: jax.Array, stride: int) -> jax.Array:
  """Zero-pads the end of each spatial side of x (B, H, W, C) up to a multiple of ``stride``: a k = stride conv then
  computes timm's outputs and, for a side it does not divide, one more at the end instead of dropping pixels."""
  pads = [(0, 0), *((0, -side % stride) for side in x.shape[1:3]), (0, 0)]
  return jnp.pad(x, pads) if any(high for _, high in pads) else x


def layer_norm(dtype: Any, name: str) -> nn.Module:
  # Two-pass variance (torch's), statistics in float32 under bfloat16 too.
  return norms.LayerNorm(epsilon=EPSILON, dtype=dtype, name=name)


def scaled_init(init, scale: float):
  """``init`` times ``scale`` (timm's head_init_scale)."""
  return lambda key, shape, dtype=jnp.float32: init(key, shape, dtype) * scale


class Block(nn.Module):
  """One ConvNeXt block: dwconv7×7 → LayerNorm → fc1 (4C) → GELU → fc2 (C) → γ ⊙ → drop path, plus the input."""

  drop_rate: float = 0.0  # this block's drop-path probability
  layer_scale_init: float = 1e-6
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool):
    width = x.shape[-1]
    y = self.conv(width, (DW_KERNEL, DW_KERNEL), padding=((3, 3), (3, 3)), feature_group_count=width,
                  dtype=self.dtype, kernel_init=KERNEL_INIT, name="conv_dw")(x)
    y = layer_norm(self.dtype, "norm")(y)
    y = nn.Dense(MLP_RATIO * width, dtype=self.dtype, kernel_init=KERNEL_INIT, name="fc1")(y)
    y = nn.Dense(width, dtype=self.dtype, kernel_init=KERNEL_INIT, name="fc2")(gelu(y))
    gamma = self.param("gamma", nn.initializers.constant(self.layer_scale_init), (width,))
    y = y * gamma.astype(y.dtype)
    if train and self.drop_rate > 0:
      if not self.has_rng("dropout"):
        raise ValueError("ConvNeXt's drop path needs a 'dropout' PRNG key in training: pass rng= to Model.apply/"
                         "encode, or set drop_path_rate=0")
      y = drop_path(y, self.drop_rate, self.make_rng("dropout"))
    return x + y


AUTO_MIN_SIDE = 3  # stem="auto": the last map's smaller side stays at least this where a stem allows it


def auto_stem(height: int, width: int, stages: int = 4) -> int:
  """The stem's stride for ``stem="auto"``: the largest of 4, 2, 1 whose last map (the stem, then ``stages - 1``
  stride-2 downsamplings, each rounding up) keeps a side of at least :data:`AUTO_MIN_SIDE` (224×224: 4, timm's;
  28×28: 1, z 4×4); 1 where none does."""
  for stride in sorted(set(STEMS.values()), reverse=True):
    side = math.ceil(min(height, width) / stride)
    for _ in range(stages - 1):
      side = math.ceil(side / 2)
    if side >= AUTO_MIN_SIDE:
      return stride
  return min(STEMS.values())


class ConvNeXtEncoder(nn.Module):
  """Stem and four stages: x (B, H, W, C_in) → z (B, H', W', dims[-1])."""

  depths: Sequence[int]
  dims: Sequence[int]
  patch_size: int | str = 4  # or "auto" (auto_stem of the input's size)
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-6
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(self.conv, padding="VALID", dtype=self.dtype, kernel_init=KERNEL_INIT)
    p = auto_stem(x.shape[1], x.shape[2], len(self.depths)) if self.patch_size == "auto" else self.patch_size
    x = conv(self.dims[0], (p, p), strides=(p, p), name="stem_conv")(pad_to_multiple(x, p))
    x = layer_norm(self.dtype, "stem_norm")(x)
    rates = drop_path_rates(self.drop_path_rate, self.depths)
    for i, (depth, width) in enumerate(zip(self.depths, self.dims)):
      if i > 0:
        x = layer_norm(self.dtype, f"downsample{i}_norm")(x)
        x = conv(width, (2, 2), strides=(2, 2), name=f"downsample{i}_conv")(pad_to_multiple(x, 2))
      for j in range(depth):
        x = Block(rates[i][j], self.layer_scale_init, dtype=self.dtype, conv=self.conv,
                  name=f"stage{i}_block{j}")(x, train)
    return x


class ConvNeXtHead(nn.Module):
  """The classifier ψ: global average pool → LayerNorm (``pool``) → dense (``dense``)."""

  num_classes: int
  head_init_scale: float = 1.0
  dtype: Any = jnp.float32

  def setup(self):
    self.norm = layer_norm(self.dtype, None)
    self.fc = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=scaled_init(KERNEL_INIT, self.head_init_scale))

  def pool(self, z):
    return self.norm(jnp.mean(z, axis=(1, 2)))

  def dense(self, pooled):
    return self.fc(pooled).astype(jnp.float32)

  def __call__(self, z):
    return self.dense(self.pool(z))


class ConvNeXt(EncoderHead):
  """ConvNeXt with an ``encode``/``classify`` split (see the module docstring); atto's widths by default."""

  num_classes: int
  depths: Sequence[int] = SIZES["atto"][0]
  dims: Sequence[int] = SIZES["atto"][1]
  patch_size: int | str = STEMS["imagenet"]  # or "auto"
  drop_path_rate: float = 0.0
  layer_scale_init: float = 1e-6
  head_init_scale: float = 1.0
  dtype: Any = jnp.float32
  conv: ModuleDef = nn.Conv

  def setup(self):
    self.encoder = ConvNeXtEncoder(self.depths, self.dims, patch_size=self.patch_size,
                                   drop_path_rate=self.drop_path_rate, layer_scale_init=self.layer_scale_init,
                                   dtype=self.dtype, conv=self.conv)
    self.head = ConvNeXtHead(self.num_classes, head_init_scale=self.head_init_scale, dtype=self.dtype)


# ----------------------------------------------------------------------------- timm's weights


def _timm_layout(params: dict) -> Iterator[tuple[tuple[str, ...], str, str]]:
  """``(our path, timm's name, kind)`` for every parameter; kind says how the array converts: ``conv`` (OIHW ↔ HWIO),
  ``mlp`` (timm's Linear (out, in) or 1×1 conv (out, in, 1, 1) ↔ (in, out)), ``dense`` ((out, in) ↔ (in, out)),
  ``vector`` (as it is)."""

  def layer(path, timm, kernel_kind):
    names = {"kernel": ("weight", kernel_kind), "scale": ("weight", "vector"), "bias": ("bias", "vector")}
    node = params
    for part in path:
      node = node[part]
    for leaf in node:
      suffix, kind = names[leaf]
      yield (*path, leaf), f"{timm}.{suffix}", kind

  encoder = params["encoder"]
  yield from layer(("encoder", "stem_conv"), "stem.0", "conv")
  yield from layer(("encoder", "stem_norm"), "stem.1", "vector")
  stages = sorted({int(name[len("stage"):].split("_")[0]) for name in encoder if name.startswith("stage")})
  for i in stages:
    if i > 0:
      yield from layer(("encoder", f"downsample{i}_norm"), f"stages.{i}.downsample.0", "vector")
      yield from layer(("encoder", f"downsample{i}_conv"), f"stages.{i}.downsample.1", "conv")
    blocks = sorted(int(name.split("_block")[1]) for name in encoder if name.startswith(f"stage{i}_block"))
    for j in blocks:
      ours, timm = ("encoder", f"stage{i}_block{j}"), f"stages.{i}.blocks.{j}"
      yield from layer((*ours, "conv_dw"), f"{timm}.conv_dw", "conv")
      yield from layer((*ours, "norm"), f"{timm}.norm", "vector")
      yield from layer((*ours, "fc1"), f"{timm}.mlp.fc1", "mlp")
      yield from layer((*ours, "fc2"), f"{timm}.mlp.fc2", "mlp")
      yield (*ours, "gamma"), f"{timm}.gamma", "vector"
  yield from layer(("head", "norm"), "head.norm", "vector")
  yield from layer(("head", "fc"), "head.fc", "dense")


def _from_timm_array(value: np.ndarray, kind: str) -> np.ndarray:
  if kind == "conv":
    return np.transpose(value, (2, 3, 1, 0))
  if kind in ("mlp", "dense"):
    return np.transpose(value.reshape(value.shape[:2]) if value.ndim == 4 else value)
  return value


def _to_timm_array(value: np.ndarray, kind: str, conv_mlp: bool) -> np.ndarray:
  if kind == "conv":
    return np.transpose(value, (3, 2, 0, 1))
  if kind == "mlp" and conv_mlp:
    return np.transpose(value)[:, :, None, None]
  if kind in ("mlp", "dense"):
    return np.transpose(value)
  return value


def _get(tree: dict, path: tuple[str, ...]):
  for part in path:
    tree = tree[part]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for part in path[:-1]:
    tree = tree[part]
  tree[path[-1]] = value


def _head_is_fresh(state: dict, params: dict) -> str | None:
  """Why the classifier (timm's ``head.fc``) keeps its fresh values — the file has none, or one for another class
  count — or None when it is loaded (the loader's rule, :mod:`overfocus_jax.models.weights`)."""
  weight, classes = state.get("head.fc.weight"), params["head"]["fc"]["kernel"].shape[1]
  if weight is None and "head.fc.bias" not in state:
    return "the file has no head.fc"
  if weight is not None and np.ndim(weight) == 2 and np.shape(weight)[0] != classes \
      and np.shape(state.get("head.fc.bias", ())) == np.shape(weight)[:1]:
    return f"the file's head.fc has {np.shape(weight)[0]} classes, the model {classes}"
  return None


def from_timm(state: dict[str, np.ndarray], variables: dict) -> dict:
  """``variables`` with every parameter replaced by its array in timm's state dict ``state`` (name → numpy array,
  e.g. ``{k: v.numpy() for k, v in timm_model.state_dict().items()}``), converted to this layout and dtype.

  The classifier keeps its values from ``variables`` (one line on stderr) when ``state`` has no ``head.fc`` or one
  for another number of classes, as ImageNet weights on a 10-class model. Anything else that does not fit raises
  :class:`~overfocus_jax.models.weights.Mismatch` (a ValueError) naming the first such tensor: a missing one, another
  shape (another size or stem), a name this model has no parameter for.
  """
  new = _plain_dicts(jax.tree.map(np.asarray, variables["params"]))  # a writable copy
  fresh_reason = _head_is_fresh(state, new)
  layout = [(path, name, kind) for path, name, kind in _timm_layout(new)
            if not (fresh_reason and name.startswith("head.fc."))]
  unexpected = sorted(set(state) - {name for _, name, _ in _timm_layout(new)})
  for path, name, kind in layout:
    target = _get(new, path)
    if name not in state:
      hint = f"; the file's unmatched tensors begin {unexpected[:3]}" if unexpected else ""
      raise weights.Mismatch(f"expected {name!r}, found no such tensor{hint}")
    value = _from_timm_array(np.asarray(state[name]), kind)
    if value.shape != target.shape:
      raise weights.Mismatch(f"expected {name!r} to convert to this model's {'/'.join(path)} of shape "
                             f"{target.shape}, found {tuple(np.shape(state[name]))}")
    _set(new, path, value.astype(target.dtype))
  if unexpected:
    raise weights.Mismatch(f"found {unexpected[0]!r} of shape {tuple(np.shape(state[unexpected[0]]))}, which the "
                           "model has no place for")
  if fresh_reason:
    print(f"overfocus: init_from: {fresh_reason}: head.fc is re-initialised", file=sys.stderr, flush=True)
  return {**variables, "params": new}


def export_options(model) -> dict:
  """:func:`to_timm`'s options for ``model`` (a :class:`~overfocus_jax.models.Model`): timm's MLPs are 1×1 convs in
  every size but tiny (``SIZES[size][2]``), the only one of depths (3, 3, 9, 3)."""
  return {"conv_mlp": tuple(model.module.depths) != tuple(SIZES["tiny"][0])}


def to_timm(variables: dict, *, conv_mlp: bool = False) -> dict[str, np.ndarray]:
  """The parameters as timm's state dict (name → contiguous numpy array, ready for ``safetensors.numpy.save_file``);
  ``conv_mlp``: the MLPs as timm's 1×1 convs (atto, femto, pico and nano: ``SIZES[size][2]``) rather than Linear
  layers (tiny)."""
  params = _plain_dicts(jax.tree.map(np.asarray, variables["params"]))
  # Contiguous: safetensors.numpy.save_file writes an array's buffer as it lies in memory.
  return {name: np.ascontiguousarray(_to_timm_array(_get(params, path), kind, conv_mlp))
          for path, name, kind in _timm_layout(params)}


def _plain_dicts(tree):
  """Nested mappings (flax's FrozenDicts too) as plain dicts, so they can be written into."""
  if hasattr(tree, "items"):
    return {k: _plain_dicts(v) for k, v in tree.items()}
  return tree


# ------------------------------------------------------------------------------------- the config and the registry


def check_config(config) -> None:
  arch = config.convnext
  fields.require_choice(arch.size, tuple(SIZES), "convnext.size")
  fields.require_choice(arch.stem, ("auto", *STEMS), "convnext.stem")
  fields.require(fields.is_number(arch.width) and math.isfinite(arch.width) and arch.width > 0,
                 f"config.convnext.width={arch.width!r} must be a positive number (it multiplies every stage's width)",
                 "set --config.convnext.width, e.g. 1 (timm's widths) or 0.5")
  fields.require(fields.is_number(arch.drop_path_rate) and 0 <= arch.drop_path_rate < 1,
                 f"config.convnext.drop_path_rate={arch.drop_path_rate!r} must be in [0, 1)",
                 "set --config.convnext.drop_path_rate, e.g. 0 or 0.1")
  fields.require_positive_number(arch.layer_scale_init, "convnext.layer_scale_init", 1e-6)
  fields.require_positive_number(arch.head_init_scale, "convnext.head_init_scale", 1.0)


GROUP = fields.Group("convnext", "ConvNeXt (model=convnext): timm's convnext_<size>, z = the last stage's map", {
    "size": fields.Field("atto", "atto | femto | pico | nano | tiny"),
    "stem": fields.Field("auto", f"auto: the largest stem that keeps z at least {AUTO_MIN_SIDE}x{AUTO_MIN_SIDE} "
                         "(224x224: imagenet; 28x28: pixel) | imagenet: 4x4 stride 4, timm's (28 -> 7 -> 4 -> 2 -> 1) "
                         "| small: 2x2 stride 2 (28 -> ... -> 2) | pixel: 1x1 (28 -> ... -> 4)"),
    "width": fields.Field(1.0, "multiplies every stage's width (timm's model only at 1)"),
    "drop_path_rate": fields.Field(0.0, "stochastic depth at the last block, linear from 0 (training only)"),
    "layer_scale_init": fields.Field(1e-6, "the layer scale's initial value"),
    "head_init_scale": fields.Field(1.0, "the classifier's initial kernel times this (timm's head_init_scale)"),
}, validate=check_config)


def build_convnext(config, **common) -> nn.Module:
  arch = config.convnext
  depths, dims, _ = SIZES[arch.size]
  patch_size = "auto" if arch.stem == "auto" else STEMS[arch.stem]
  return ConvNeXt(depths=depths, dims=scaled_dims(dims, arch.width), patch_size=patch_size,
                  drop_path_rate=arch.drop_path_rate, layer_scale_init=arch.layer_scale_init,
                  head_init_scale=arch.head_init_scale, **common)


# Its depthwise convolutions as shifted sums on a CPU (platform_tuning.py); no oneDNN for its dense ones: python -m
# benchmarks.onednn_models finds its step no faster with them.
# Its recipe: the paper's optimizer and regularization (AdamW at 4e-3, weight decay 0.05, label smoothing 0.1, a
# warm-up), which it needs named alone: SGD at 0.1 makes its loss diverge.
RECIPE = {"optimizer": "adamw", "learning_rate": 4e-3, "weight_decay": 0.05, "warmup_epochs": 1,
          "label_smoothing": 0.1}
SPECS = (ModelSpec("convnext", "ConvNeXt (Liu et al.) in timm's small sizes, sized by config.convnext", build_convnext,
                   (GROUP,), platform=Platform(cpu_convolution="depthwise"), recipe=RECIPE),)
