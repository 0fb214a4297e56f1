r"""ResNet-18 (the RSC papers' backbone: four stages of two pre-activation blocks, widths 64→512, CIFAR-style 3×3
stride-1 stem) on mnist5k, with the default optimizer (SGD 0.1, cosine, 10 epochs).

    overfocus train --workdir runs/resnet18 --config experiments/configs/resnet18.py

11.2 M parameters and 770 MFLOPs per 28×28 image (37× the default residual CNN's parameters, 12× its FLOPs): about
10 minutes on 2 CPU cores. Accuracy and speed: the efficiency table in README.md (python experiments/efficiency.py).
"""

from overfocus_jax.configs import default


def get_config():
  config = default.get_config()
  config.model = "resnet18"
  return config
