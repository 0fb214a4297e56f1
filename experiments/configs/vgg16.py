r"""VGG-16 (models/vgg.py: 13 conv3×3 layers with batch norm, a global-average-pool head) at a quarter of its width
(16-…-128) on mnist5k, with the default optimizer (SGD 0.1, cosine, 10 epochs).

    overfocus train --workdir runs/vgg16 --config experiments/configs/vgg16.py

The first three blocks keep their max-pools (28 → 14 → 7 → 3), so z is a 3×3×128 map that SGDrop and RSC can mask
(all five pools would leave 1×1). 0.92 M parameters; 98.3% test accuracy on the 1,000 held-out digits in 10 epochs,
2 min 12 s on 2 shared CPU cores (115 s in the training loop, about 400 images/s). Full size: --config.vgg.width=1
--config.vgg.max_pools=5 --config.vgg.head=classic is torchvision's vgg16_bn (138.4 M parameters on 224×224×3
images and 1,000 classes; --config.vgg.batch_norm=false for vgg16).
"""

from overfocus_jax.configs import default


def get_config():
  config = default.get_config()
  config.model = "vgg16"
  config.vgg.width = 0.25
  config.vgg.max_pools = 3
  return config
