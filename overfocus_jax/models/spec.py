"""What the library needs to know of a shipped model, declared in the model's own file and collected by
:data:`overfocus_jax.models.REGISTRY`:

    SPECS = (ModelSpec("vgg16", "VGG-16 ...", build=build_vgg16, groups=(VGG,), platform=Platform(onednn=True)),)

``build(config, *, num_classes, dtype, conv)`` returns the flax module from the config's groups; ``groups`` are the
config groups it reads (declared with their defaults, help and checks, :mod:`overfocus_jax.fields`); ``fits(config,
height, width)`` raises :class:`~overfocus_jax.errors.UserError` when the model cannot take such images;
``platform`` says what the model prefers on a CPU; ``recipe`` the training fields it needs where a run leaves them
``auto`` (:mod:`overfocus_jax.optimization`: optimizer, learning_rate, weight_decay, warmup_epochs, label_smoothing),
so that the model named alone trains; ``task`` what it learns (:data:`TASKS`). Adding a model is its file and one line in ``models/__init__``.
"""

import dataclasses
from typing import Any, Callable, Mapping

from overfocus_jax.fields import Group

CPU_CONVOLUTIONS = ("xla", "sliced", "depthwise")
# What a model learns: classify (logits; cross-entropy, accuracy) or reconstruct (its input; MSE, no labels).
TASKS = ("classify", "reconstruct")


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
  its image limits, its platform preferences and its training recipe."""

  name: str
  help: str
  build: Callable[..., Any]
  groups: tuple[Group, ...] = ()
  fits: Callable[[Any, int, int], None] | None = None
  platform: Platform = Platform()
  recipe: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  task: str = "classify"

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"unknown task={self.task!r} for model {self.name!r}; use one of {TASKS}")
