r"""Shortcut benchmark: does a regularizer stop the network from reading the label off a planted patch?

    python experiments/shortcut.py --seeds 0 1 2            # ERM, SGDrop, RSC, RSC-DomainBed; the table below
    overfocus train --workdir runs/shortcut_erm --config experiments/configs/shortcut.py
    overfocus train --workdir runs/shortcut_rsc --config experiments/configs/shortcut.py --config.regularizer.name=rsc

Training data: mnist5k_shortcut (a bright 3×3 patch whose border position encodes the label in 95% of training
images); test: the same 1,000 held-out digits with the patch at a random position (decorrelated), and clean
(``overfocus eval --dataset mnist5k``). Results and their commands: experiments/README.md. The model is the
default residual CNN with all three stages at stride 2 (a 4×4×128 latent map) and no augmentation, so that the
shortcut is clean and a run takes well under a minute on 2 CPU cores.
"""

from overfocus_jax.configs.default import get_config as default_config


def get_config():
  config = default_config()
  config.dataset = "mnist5k_shortcut"
  config.augment = False  # a random crop would blur the patch's position code
  config.resnet.stage_strides = (2, 2, 2)
  config.num_epochs = 6
  return config
