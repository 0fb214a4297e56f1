r"""DomainBed's MNIST_CNN (models/mnist_cnn.py: four 3×3 convs, ReLU then GroupNorm, mean pool, one linear layer) on
DomainBed's ColoredMNIST built from mnist5k, with DomainBed's ERM settings for its small-image datasets.

    overfocus train --workdir runs/mnist_cnn --config experiments/configs/mnist_cnn.py

Where the numbers come from (facebookresearch/DomainBed): ``domainbed/hparams_registry.py`` gives ColoredMNIST, one
of its SMALL_IMAGES, lr 1e-3, weight_decay 0 and batch_size 64; ``domainbed/algorithms.py``'s ERM trains with
``torch.optim.Adam(lr, weight_decay)`` (PyTorch's betas 0.9/0.999 and eps 1e-8, optax's defaults too) at a constant
learning rate, without warm-up; ``domainbed/datasets.py`` applies no augmentation to the MNIST environments (its
``data_augmentation`` hparam only reaches the image-folder datasets). As DomainBed, each batch holds 64 examples of
each training environment (``environments.balanced``; ``batch_size`` is the whole batch, 64 × 2) and the −90%
environment (2) is held out (``environments.test_envs``): ``test_accuracy`` is its in-split accuracy, and every epoch
logs each environment's ``env{i}_in_acc``/``env{i}_out_acc``. Hold out another with
``--config.environments.test_envs=0``. What differs: an epoch is 20 steps (the smaller training environment's
1,334 in-split images from mnist5k, 64 at a time, each environment permuted without replacement, where DomainBed
samples with replacement); DomainBed runs 5,000 steps, 10 epochs here are 200 (``--config.num_epochs=250`` gives
5,000).

371,394 parameters on ColoredMNIST's 2×28×28 images and 2 classes, PyTorch's count for DomainBed's network.
"""

from overfocus_jax.configs import default


def get_config():
  config = default.get_config()
  config.model = "mnist_cnn"
  config.dataset = "colored_mnist"
  config.augment = False
  config.environments.test_envs = (2,)  # −90%: the environment where the colour cue reverses
  config.batch_size = 128  # 64 per training environment (DomainBed's batch_size), two training environments
  config.optimizer = "adam"
  config.learning_rate = 1e-3
  config.weight_decay = 0.0
  config.schedule = "constant"
  config.warmup_epochs = 0
  return config
