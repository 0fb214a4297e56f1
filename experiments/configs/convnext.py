r"""ConvNeXt-atto (models/convnext.py: timm's convnext_atto, 3.38 M parameters at 10 classes) with the small 2×2 stem
on mnist5k, trained with the ConvNeXt recipe scaled down: AdamW at the paper's 4e-3 (there for batch 4096, here 128),
weight decay 0.05, a warm-up epoch then cosine, label smoothing 0.1, stochastic depth 0.1.

    overfocus train --workdir runs/convnext --config experiments/configs/convnext.py

97.1% test accuracy on the 1,000 held-out digits in 10 epochs (64.7% after the first, 83.5% after the second), 4 min
28 s wall clock on 2 CPU cores, 244 s in the training loop (≈ 176 images/s, 24 s an epoch), with platform_tuning's
depthwise convolutions as shifted sums (``auto``; ``--config.platform_tuning=off`` runs the step 2.6× slower).
At learning rate 2e-3 it reached 94.7%. Unlike the paper's optimiser, this library's AdamW also decays the norms',
biases' and layer scales' parameters.
"""

from overfocus_jax.configs import default


def get_config():
  config = default.get_config()
  config.model = "convnext"
  config.convnext.size = "atto"
  config.convnext.stem = "small"        # 28 → 14 → 7 → 4 → 2: z is a 2×2×320 map (the ImageNet stem leaves 1×1)
  config.convnext.drop_path_rate = 0.1  # the paper's rate for ConvNeXt-T
  config.optimizer = "adamw"
  config.learning_rate = 4e-3
  config.weight_decay = 0.05
  config.schedule = "cosine"
  config.warmup_epochs = 1
  config.label_smoothing = 0.1
  return config
