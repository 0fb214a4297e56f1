"""ImageNet's per-channel mean and standard deviation (torchvision's), and their channel averages for greyscale
images: what backbones trained on ImageNet expect their inputs normalised with (``imagefolder:`` datasets, and a run
from pretrained weights: ``sources.normalized_as``)."""

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = (0.449,), (0.226,)


def imagenet_statistics(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """``(mean, std)`` of ImageNet for 3-channel images, their channel averages for 1-channel ones, else None."""
  return {3: (IMAGENET_MEAN, IMAGENET_STD), 1: (IMAGENET_GREY_MEAN, IMAGENET_GREY_STD)}.get(channels)
