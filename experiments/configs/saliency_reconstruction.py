r"""Saliency learned by reconstruction (models/reconstruction.py): the focus seed's experiment in its corrected form.
A saliency CNN marks K = 5 positions, a 9×9 patch is read at each through the bilinear sampler, and the seed's MLP
decoder (dropout 0.5, 1,024 hidden units, dropout 0.5) rebuilds the 28×28 digit from them; MSE, Adam at 1e-3 (the
model's recipe), batch 16, no labels. The keypoints are soft-argmaxes, so the loss trains the saliency too
(``--config.reconstruction.select=hard`` is the seed's code as written: the K highest cells, no gradient to them).

    overfocus train --workdir runs/reconstruction --config experiments/configs/saliency_reconstruction.py
    overfocus explain --workdir runs/reconstruction

The summary's ``test_mse`` is the reconstruction error on the 1,000 held-out digits; ``explain`` draws the
heatmaps, the patches on each digit and the reconstructions.
"""

from overfocus_jax.configs import default


def get_config():
  config = default.get_config()
  config.model = "reconstruction"
  config.dataset = "mnist5k"
  config.augment = False        # the image is the target: rebuild it as it is
  config.batch_size = 16        # the seed's
  config.eval_batch_size = 200
  config.num_epochs = 5         # as experiments/saliency_reconstruction.py's records
  config.schedule = "constant"  # the seed's Adam at 1e-3 throughout
  return config
