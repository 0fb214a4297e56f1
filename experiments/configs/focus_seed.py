r"""FocusNet at the focus seed's own setting: K = 3 glimpses of 5×5 samples, each spanning 5/28 of the side (about 3%
of a 28×28 digit's area), so where the glimpses go decides what the classifier sees.

    overfocus train --workdir runs/focus_seed --config experiments/configs/focus_seed.py

The shipped focus config (experiments/configs/focus.py) reads four 12×12 glimpses, which cover most of a digit
wherever they sit; this one is where learned keypoints can matter. Compared with the keypoints frozen on their
initial grid (--config.focus.keypoint_grad_scale=0.0) and with Harris corners (--config.model=corner) by
experiments/configs/focus_keypoints_sweep.py.
"""

from overfocus_jax.configs import default


def get_config():
  config = default.get_config()
  config.model = "focus"
  config.focus.num_keypoints = 3
  config.focus.patch_size = 5
  config.focus.patch_scale = 5 / 28
  return config
