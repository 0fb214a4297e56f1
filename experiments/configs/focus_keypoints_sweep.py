r"""Do learned keypoints beat fixed ones? The focus model with its keypoints learned (at three learning rates for the
keypoint CNN), frozen on their initial grid, and Harris corners in their place, at the shipped glimpse setting
(K = 4 glimpses of 12×12 over 0.43 of the side) and at the focus seed's (K = 3 of 5×5 over 5/28), on mnist5k and
two shortcut datasets, three seeds each: 90 runs of 10 epochs.

    overfocus sweep run --config experiments/configs/focus_keypoints_sweep.py --out sweeps/focus_keypoints \
        --launcher parallel --workers 2
    python experiments/focus_keypoints.py sweeps/focus_keypoints      # explain the learned runs, then the table

Each run's folder names its fields, e.g. setting=seed-variant=learned-dataset=mnist5k-seed=0.
"""

from overfocus_jax.configs import default

SETTINGS = {  # name: (K, P, patch_scale)
    "seed": (3, 5, 5 / 28),
    "shipped": (4, 12, 0.43),
}
VARIANTS = {  # name: (model, keypoint_grad_scale)
    "learned": ("focus", 0.01),
    "learned_x10": ("focus", 0.1),
    "learned_x100": ("focus", 1.0),
    "frozen": ("focus", 0.0),
    "corner": ("corner", 0.01),  # the scale is unused by Harris corners
}
DATASETS = ("mnist5k", "mnist5k_shortcut", "mnist5k_glyph")
SEEDS = (0, 1, 2)


def get_config():
  config = default.get_config()
  config.model = "focus"
  return config


def get_sweep():
  runs = []
  for seed in SEEDS:  # seed by seed, so that a sweep cut short holds every cell of the first seeds
    for setting, (k, size, scale) in SETTINGS.items():
      for variant, (model, grad_scale) in VARIANTS.items():
        for dataset in DATASETS:
          runs.append({"name": f"setting={setting}-variant={variant}-dataset={dataset}-seed={seed}",
                       "model": model, "focus.num_keypoints": k, "focus.patch_size": size, "focus.patch_scale": scale,
                       "focus.keypoint_grad_scale": grad_scale, "dataset": dataset, "seed": seed})
  return runs
