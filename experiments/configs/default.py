r"""Default run: the small pre-activation residual CNN on mnist5k (4,000 real MNIST digits, 1,000 held out).

    overfocus train --workdir runs/default --config experiments/configs/default.py

The same config `overfocus train` uses when no --config is given (it ships inside the package as
overfocus_jax/configs/default.py); its accuracy and time are in README.md, "Set-up: two commands".
"""

from overfocus_jax.configs.default import get_config  # noqa: F401
