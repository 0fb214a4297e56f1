r"""The default run: the pre-activation residual CNN on mnist5k (4,000 real MNIST digits, 1,000 held out), 10 epochs.

    overfocus train --workdir runs/default

Every field is declared, with its default and one line of help, by the part of the library that reads it
(:func:`overfocus_jax.config.parts`); ``overfocus train --help-config`` lists them all. A config file of your own
starts from this one and changes what it needs:

    from overfocus_jax.configs import default

    def get_config():
      config = default.get_config()
      config.model = "vgg16"
      return config
"""

import ml_collections

from overfocus_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  return config_lib.defaults()
