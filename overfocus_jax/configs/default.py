r"""Default run: the seeds' pre-activation residual CNN on mnist5k (4,000 real MNIST digits, 1,000 held out).

    overfocus train --workdir runs/default

Reaches >= 97% test accuracy on the 1,000 held-out digits; see README.md for the measured accuracy and time on
2 CPU cores. Every field below can be overridden with --config.FIELD=VALUE.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Data: mnist5k | digits | tfds:NAME | idx:DIR | npz:FILE.
  config.dataset = "mnist5k"
  config.data_dir = ""  # a prepared TFDS directory, for tfds:NAME ("" = TFDS's default)
  config.augment = True  # random crop with padding; horizontal flip only for natural images

  # Model: resnet (the seeds' pre-activation residual CNN) | resnet18.
  config.model = "resnet"
  config.resnet = ml_collections.ConfigDict(dict(
      stem_features=16,
      stage_widths=(32, 64, 128),
      stage_sizes=(1, 1, 1),
      stage_strides=(1, 2, 2),
      stem_kernel=3,
      stem_strides=1,
      stem_pool="none",  # none | max | avg
  ))

  # Regularizer applied to the latent map z = encode(x) inside the train step.
  config.regularizer = ml_collections.ConfigDict(dict(name="none"))

  # Optimisation.
  config.num_epochs = 8
  config.batch_size = 128
  config.eval_batch_size = 250
  config.optimizer = "sgd"  # sgd (with momentum) | adam | adamw
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.schedule = "cosine"  # cosine | step | constant
  config.warmup_epochs = 1
  config.step_decay_epochs = (30, 60)  # for schedule=step
  config.step_decay_factor = 0.1
  config.label_smoothing = 0.0

  # Bookkeeping.
  config.seed = 0
  config.keep_checkpoints = 3
  return config
