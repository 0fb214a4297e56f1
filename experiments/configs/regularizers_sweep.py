r"""A sweep: the default run with each regularizer (none, SGDrop, RSC, DomainBed's RSC), three seeds each.

    overfocus sweep run --config experiments/configs/regularizers_sweep.py --out sweeps/regularizers \
        --launcher parallel --workers 2
    overfocus sweep status sweeps/regularizers

get_config() is the default run; get_sweep() lists one dict of config fields per run, and each run trains in
sweeps/regularizers/<its fields>, e.g. regularizer=sgdrop-seed=1.
"""

from overfocus_jax.configs import default


def get_config():
  return default.get_config()


def get_sweep():
  return [{"regularizer.name": name, "seed": seed}
          for name in ("none", "sgdrop", "rsc", "rsc_domainbed") for seed in range(3)]
