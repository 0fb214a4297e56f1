"""What the library needs to know of a shipped model, declared in the model's own file and collected by
:data:`overfocus_jax.models.REGISTRY`:

    SPECS = (ModelSpec("vgg16", "VGG-16 ...", build=build_vgg16, groups=(VGG,), platform=Platform(onednn=True)),)

``build(config, *, num_classes, dtype, conv)`` returns the flax module from the config's groups; ``groups`` are the
config groups it reads (declared with their defaults, help and checks, :mod:`overfocus_jax.fields`); ``fits(config,
height, width)`` raises :class:`~overfocus_jax.errors.UserError` when the model cannot take such images;
``platform`` says what the model prefers on a CPU. Adding a model is its file and one line in ``models/__init__``.
"""

import dataclasses
from typing import Any, Callable

from overfocus_jax.fields import Group

CPU_CONVOLUTIONS = ("xla", "sliced", "depthwise")


@dataclasses.dataclass(frozen=True)
class Platform:
  """A model's preferences on one CPU device (:mod:`overfocus_jax.platform_tuning`, :mod:`overfocus_jax.data.on_device`).

  Attributes:
    cpu_convolution: how its convolutions' gradients are computed: ``xla`` (as XLA does them), ``sliced`` (weight
      gradients in batch slices, for mid-sized layers) or ``depthwise`` (depthwise convolutions as shifted sums).
    onednn: its float32 convolutions go to oneDNN under ``platform_tuning=auto``.
    data_on_device: ``data_on_device=auto`` keeps its data on a CPU device (the crop inside the compiled step),
      where grain's threads beside the step cost more.
  """

  cpu_convolution: str = "xla"
  onednn: bool = False
  data_on_device: bool = False

  def __post_init__(self):
    if self.cpu_convolution not in CPU_CONVOLUTIONS:
      raise ValueError(f"unknown {self.cpu_convolution=}; use one of {CPU_CONVOLUTIONS}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A shipped model: its ``config.model`` name, one line of help, how it is built, the config groups it reads,
  its image limits and its platform preferences."""

  name: str
  help: str
  build: Callable[..., Any]
  groups: tuple[Group, ...] = ()
  fits: Callable[[Any, int, int], None] | None = None
  platform: Platform = Platform()
