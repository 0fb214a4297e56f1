"""Experiment assembly: everything a config builds before any step runs — data, mesh, model, optimizer, train
state, regularizer — and the train and eval steps compiled for the mesh. Shared by train, eval, explain and bench.

This is where a config meets the library: the platform tuning (``config.platform_tuning``) picks the models'
convolution and the compiler options here, and nowhere else.
"""

import dataclasses
import sys
from typing import Any, Callable

import jax
import ml_collections

from overfocus_jax import config as config_lib
from overfocus_jax import optimization, parallel, platform_tuning
from overfocus_jax.challenge import Regularizer
from overfocus_jax.challenge import invariance
from overfocus_jax.data import balanced, pipeline
from overfocus_jax.data.sources import ImageDataset, load_dataset, normalized_as
from overfocus_jax.errors import SettingError, UserError
from overfocus_jax.models import Model, build_model, check_fits_images, platform_of, task_of, weights
from overfocus_jax.train import reconstruction_step
from overfocus_jax.train import state as state_lib
from overfocus_jax.train.dispatch import Feed, make_train_chunk
from overfocus_jax.regularizers import build_regularizer
from overfocus_jax.train.step import local_batch_norm_step, make_eval_step, make_train_step


@dataclasses.dataclass
class Experiment:
  """Everything built from a config, before any step runs."""

  config: ml_collections.ConfigDict
  dataset: ImageDataset
  model: Model
  mesh: jax.sharding.Mesh
  steps_per_epoch: int
  schedule: Callable
  tx: Any
  state: state_lib.TrainState  # freshly initialised, replicated over the mesh
  regularizer: Regularizer
  layout: balanced.Layout | None = None  # environment-balanced batches (data/balanced.py), else None
  objective: invariance.Objective = invariance.ERM

  @property
  def task(self) -> str:
    """What the model learns: ``classify`` or ``reconstruct`` (:data:`overfocus_jax.models.spec.TASKS`)."""
    return task_of(self.config.model)


def build_experiment(config: ml_collections.ConfigDict, *, dataset: ImageDataset | None = None,
                     mesh: jax.sharding.Mesh | None = None, regularizer: Regularizer | None = None,
                     pretrained: bool = False) -> Experiment:
  """Builds ``config``'s experiment; ``regularizer`` replaces the one the config names (e.g. your own).

  ``pretrained``: the state starts from ``config.init_from``'s weights, when it names a file (a new run; a resumed
  run or a finished one restores its checkpoint instead, and so never reads the file).
  """
  config = config_lib.resolved(config)  # the model's training recipe where the config leaves it "auto"
  dataset = dataset or load_dataset(config.dataset, data_dir=config.data_dir or None,
                                    skip_bad_images=config.skip_bad_images, trial_seed=config.environments.trial_seed,
                                    image_size=config.image_size)
  # A resumed run keeps config.init_from, so its statistics are the new run's (the file itself is not read again).
  dataset = normalized_as(dataset, config.normalization, pretrained=bool(config.init_from))
  mesh = mesh or parallel.make_mesh()
  dataset, layout = environment_training(config, dataset, mesh.devices.size)
  if layout is not None and layout.batch_size != config.batch_size:  # a balanced batch near the configured one
    config = config.copy_and_resolve_references()
    config.batch_size = layout.batch_size
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
  check_fits_images(config, dataset.image_shape)  # the models' own limits (attention's pools, the patches)
  platform = platform_of(config.model)
  conv = platform_tuning.conv_module(mesh, config.platform_tuning, platform.cpu_convolution, platform.onednn)
  model = build_model(config, dataset.num_classes, conv=conv)
  check_input_shape(model, dataset.image_shape)
  steps = layout.steps_per_epoch if layout else pipeline.steps_per_epoch(dataset, config.batch_size)
  if task_of(config.model) == "reconstruct":
    check_reconstruction_run(config, regularizer)
    regularizer = build_regularizer(config, steps)  # none: the state keeps the regularizer's slot
  else:
    regularizer = regularizer or build_regularizer(config, steps)
    check_regularizer_fits(model, regularizer, config.regularizer.name)
  objective = invariance.build_objective(config.objective.name, config.objective.get(config.objective.name),
                                         len(layout.ids) if layout else 0, layout.ids if layout else None)
  schedule = optimization.make_schedule(config, steps)
  tx = optimization.make_optimizer(config, schedule)
  variables = pretrained_variables(config, model, dataset.image_shape) if pretrained else None
  # Compiled: eager initialisation dispatches every op of every layer on its own (slow on accelerators).
  create = lambda variables: state_lib.create_train_state(model, tx, seed=config.seed, input_shape=dataset.image_shape,
                                                          regularizer=regularizer, variables=variables)
  state = jax.jit(create, out_shardings=parallel.replicated(mesh))(
      None if variables is None else parallel.replicate(variables, mesh))
  return Experiment(config, dataset, model, mesh, steps, schedule, tx, state, regularizer, layout, objective)


def pretrained_variables(config: ml_collections.ConfigDict, model: Model, image_shape: tuple[int, ...]):
  """``config.init_from``'s weights on the model's fresh variables (host arrays), or None when it is empty.

  Raises:
    UserError: a layout the model has no mapping for, a pickle, a missing or unreadable file (these before the model
      is initialised), or a tensor that does not fit (models/weights.py).
  """
  if not config.init_from:
    return None
  weights.converter(model, config.init_from_layout)  # a layout without a mapping fails before the file is read,
  state = weights.read_safetensors(config.init_from)  # and a bad file before the model is initialised
  fresh = jax.jit(lambda: state_lib.initial_variables(model, config.seed, image_shape))()
  return weights.map_state(model, state, jax.device_get(fresh), config.init_from_layout, config.init_from)


def environment_training(config: ml_collections.ConfigDict, dataset: ImageDataset, devices: int = 1):
  """``(dataset, layout)``: for a dataset of environments, the view a run trains on (held-out ``test_envs``,
  per-environment evaluation splits: :func:`balanced.training_view`) and, with ``environments.balanced``, the
  balanced batch layout over the training environments; any other dataset as it is, and no layout.

  A ``config.batch_size`` that does not divide over the training environments (and the ``devices``) becomes the
  nearest that does (:func:`balanced.fitting_batch_size`), one line on stderr saying so; the layout holds it.

  Raises:
    UserError: test environments or an environment objective for a dataset without environments, bad test
      environments, or a batch that needs more examples of an environment than it has.
  """
  envs = config.environments
  if not balanced.has_environments(dataset):
    balanced.check_environments(dataset, envs.test_envs, envs.train_envs)  # () passes; anything else is an error
    if envs.trial_seed:
      raise SettingError("environments.trial_seed", f"environments.trial_seed={envs.trial_seed} re-splits the "
                         f"environments of a dataset, and {dataset.name!r} has none",
                         "0 (or train on colored_mnist, rotated_mnist or imagefolder:DIR:domains)")
    if config.objective.name != "erm":
      raise UserError(f"objective {config.objective.name!r} needs a dataset of environments, and "
                      f"{dataset.name!r} has none", "use colored_mnist, rotated_mnist or imagefolder:DIR:domains, "
                      "or --config.objective.name=erm")
    return dataset, None
  if not dataset.environment_splits:  # not already a training view
    dataset = balanced.training_view(dataset, envs.test_envs, envs.train_envs)
  if not envs.balanced:
    return dataset, None
  train_envs = balanced.training_environments(dataset, envs.test_envs, envs.train_envs)
  batch = balanced.fitting_batch_size(config.batch_size, len(train_envs), devices)
  if batch != config.batch_size:
    print(f"overfocus: note: batch_size={config.batch_size} does not divide over the {len(train_envs)} training "
          f"environments{f' and {devices} devices' if devices > 1 else ''}; using {batch} ({batch // len(train_envs)} "
          "of each)", file=sys.stderr)
  return dataset, balanced.make_layout(dataset.train.domains, batch, train_envs, dataset.domain_names)


def check_input_shape(model: Model, input_shape: tuple[int, ...]) -> None:
  """Fails clearly when the model cannot be built for these images (a backbone that needs larger inputs).

  The residual CNNs use SAME padding, so any size of at least 1×1 works for them; empty dimensions are rejected
  when the data is loaded.
  """
  try:
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), input_shape))
  except (ValueError, TypeError) as e:
    raise UserError(f"the {model.name} model cannot take {input_shape} images ({str(e).splitlines()[0]})",
                    "use larger images or fewer stride-2 stages (--config.resnet.stage_strides)") from None


def check_regularizer_fits(model: Model, regularizer: Regularizer, name: str) -> None:
  """A regularizer needs the model's encode/classify split at its level."""
  if not model.supports_split(regularizer.split):
    raise UserError(f"regularizer {name!r} needs a model with an encode/classify split at the {regularizer.split} "
                    f"level, and {model.name!r} has none", "use --config.model=resnet or resnet18, or "
                    "--config.regularizer.name=none")


def check_reconstruction_run(config: ml_collections.ConfigDict, regularizer: Regularizer | None) -> None:
  """A model that reconstructs its input has no classes: no regularizer (they mask a classifier's latent with the
  head's gradients) and no environment objective (it weighs classification risks)."""
  if regularizer is not None or config.regularizer.name != "none":
    raise UserError(f"regularizer {config.regularizer.name!r} masks a classifier's latent, and model "
                    f"{config.model!r} reconstructs its input", "use --config.regularizer.name=none")
  if config.objective.name != "erm":
    raise UserError(f"objective {config.objective.name!r} weighs the environments' classification risks, and "
                    f"model {config.model!r} reconstructs its input", "use --config.objective.name=erm")


def jit(exp: Experiment, fun, **jit_kwargs):
  """``jax.jit`` with the config's platform tuning for the experiment's mesh."""
  return platform_tuning.jit(fun, exp.mesh, exp.config.platform_tuning, **jit_kwargs)


def _train_step(exp: Experiment, regularizer: Regularizer | None = None):
  """The experiment's :func:`make_train_step`, with ``regularizer`` in place of its own when given; with
  ``config.batch_norm = local``, run per device (:func:`local_batch_norm_step`)."""
  if exp.task == "reconstruct":  # no batch norm: batch_norm=local is the same step
    return reconstruction_step.make_train_step(exp.model, exp.tx, mean=exp.dataset.mean, std=exp.dataset.std,
                                               schedule=exp.schedule, kl_weight=exp.config.reconstruction.kl_weight)
  local = exp.config.batch_norm == "local"
  step = make_train_step(exp.model, exp.tx, schedule=exp.schedule, regularizer=regularizer or exp.regularizer,
                         label_smoothing=exp.config.label_smoothing,
                         axis_name=parallel.DATA_AXIS if local else None, objective=exp.objective)
  return local_batch_norm_step(step, exp.mesh, parallel.DATA_AXIS) if local else step


def jit_train_step(exp: Experiment, regularizer: Regularizer | None = None):
  """The train step compiled once for the mesh: state replicated, batch sharded, state buffers donated.

  ``regularizer`` defaults to the experiment's; its state must have the structure of
  ``exp.state.regularizer_state`` (build the experiment with it: ``build_experiment(config, regularizer=...)``).
  """
  rep, data = parallel.replicated(exp.mesh), parallel.data_sharded(exp.mesh)
  return jit(exp, _train_step(exp, regularizer), in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)


def jit_train_chunk(exp: Experiment, feed: Feed, data_sharding: jax.sharding.Sharding):
  """``train_chunk(state, data, num_steps) -> (state, metric sums, first_bad_step)``
  (:func:`overfocus_jax.train.dispatch.make_train_chunk`) for the mesh, compiled once per ``num_steps`` (static):
  the state replicated and donated, ``data`` laid out as ``data_sharding``, each batch built on the device and
  sharded over the data axis."""
  rep = parallel.replicated(exp.mesh)
  train_chunk = make_train_chunk(_train_step(exp), feed, parallel.data_sharded(exp.mesh))
  return jit(exp, train_chunk, in_shardings=(rep, data_sharding), out_shardings=(rep, rep, rep),
             static_argnums=2, donate_argnums=0)


def jit_eval_step(exp: Experiment):
  """The eval step compiled once for the mesh: state replicated, batch sharded, sums replicated."""
  rep, data = parallel.replicated(exp.mesh), parallel.data_sharded(exp.mesh)
  return jit(exp, eval_step(exp), in_shardings=(rep, data), out_shardings=rep)


def eval_step(exp: Experiment):
  """The experiment's ``eval_step(state, batch) -> sums`` (``loss_sum``, ``count`` and the task's own: ``correct``
  for a classifier, ``mse_sum`` for a reconstruction), not compiled."""
  if exp.task == "reconstruct":
    return reconstruction_step.make_eval_step(exp.model, mean=exp.dataset.mean, std=exp.dataset.std)
  return make_eval_step(exp.model)
