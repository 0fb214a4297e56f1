r"""The focus models at the saliency-by-reconstruction experiment's glimpse setting (K = 5 patches of 9×9 pixels,
9/28 of the side): learned keypoints (``focus``) and Harris corners (``corner``) on mnist5k and two shortcut datasets,
three seeds each: 18 runs of 10 epochs, beside ``python experiments/saliency_reconstruction.py --classify``'s
classifier on the K patches of a frozen saliency.

    overfocus sweep run --config experiments/configs/focus_k5_sweep.py --out sweeps/focus_k5 \
        --launcher parallel --workers 2
    python -c "from overfocus_jax.sweeps import results
    for r in results.read('sweeps/focus_k5'): print(r['job'], r['test_accuracy'])"

Runs are named ``model=M-dataset=D-seed=S``.
"""

from overfocus_jax.configs import default

DATASETS = ("mnist5k", "mnist5k_glyph", "mnist5k_shortcut")
MODELS = ("focus", "corner")
SEEDS = (0, 1, 2)


def get_config():
  config = default.get_config()
  config.model = "focus"
  config.focus.num_keypoints = 5
  config.focus.patch_size = 9
  config.focus.patch_scale = 9 / 28
  return config


def get_sweep():
  return [{"name": f"model={model}-dataset={dataset}-seed={seed}", "model": model, "dataset": dataset, "seed": seed}
          for seed in SEEDS for model in MODELS for dataset in DATASETS]
