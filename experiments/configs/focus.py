r"""FocusNet (models/focus.py) on mnist5k: classify from 4 learned 12×12 glimpses of each digit.

    overfocus train --workdir runs/focus --config experiments/configs/focus.py

97.0% on the 1,000 held-out digits in 10 epochs (96.8% with --config.seed=1), 48 s on 2 CPU cores (33 s in
the training loop); with the keypoints frozen on their initial grid (--config.focus.keypoint_grad_scale=0.0),
96.6%. The default config group and optimizer (SGD 0.1, cosine, 10 epochs); the keypoint CNN learns 100×
slower (focus.keypoint_grad_scale=0.01), or the keypoints leave the digit in a few steps.
"""

from overfocus_jax.configs import default


def get_config():
  config = default.get_config()
  config.model = "focus"
  return config
