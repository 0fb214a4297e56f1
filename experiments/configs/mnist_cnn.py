r"""DomainBed's MNIST_CNN (models/mnist_cnn.py: four 3×3 convs, ReLU then GroupNorm, mean pool, one linear layer) on
DomainBed's ColoredMNIST built from mnist5k, with DomainBed's ERM settings for its small-image datasets.

    overfocus train --workdir runs/mnist_cnn --config experiments/configs/mnist_cnn.py

Where the numbers come from (facebookresearch/DomainBed): ``domainbed/hparams_registry.py`` gives ColoredMNIST, one
of its SMALL_IMAGES, lr 1e-3, weight_decay 0 and batch_size 64; ``domainbed/algorithms.py``'s ERM trains with
``torch.optim.Adam(lr, weight_decay)`` (PyTorch's betas 0.9/0.999 and eps 1e-8, optax's defaults too) at a constant
learning rate, without warm-up; ``domainbed/datasets.py`` applies no augmentation to the MNIST environments (its
``data_augmentation`` hparam only reaches the image-folder datasets). What differs: DomainBed draws 64 examples from
each training environment per step and holds one environment out; ``overfocus train`` pools every environment's
in-split (4,001 images, 62 steps of 64 an epoch) and tests on the pooled out-splits (environments.py). DomainBed
runs 5,000 steps; 10 epochs here are 620 (``--config.num_epochs=81`` gives 5,022).

371,394 parameters on ColoredMNIST's 2×28×28 images and 2 classes, PyTorch's count for DomainBed's network. About
30 s an epoch on 2 shared CPU cores (the first epoch: 139 images/s, test accuracy 61.2% on the pooled out-splits).
"""

from overfocus_jax.configs import default


def get_config():
  config = default.get_config()
  config.model = "mnist_cnn"
  config.dataset = "colored_mnist"
  config.augment = False
  config.batch_size = 64
  config.optimizer = "adam"
  config.learning_rate = 1e-3
  config.weight_decay = 0.0
  config.schedule = "constant"
  config.warmup_epochs = 0
  return config
