r"""The data paths as a sweep: the default run with its data on the device and from the host stream in float32, and
on the device in bfloat16, three seeds: 9 runs, interleaved seed by seed so that load on the machine falls on every
path alike (run them with the local launcher: a parallel worker's share of the cores changes the throughput).

    overfocus sweep run --config experiments/configs/data_paths_sweep.py --out sweeps/data_paths --launcher local
    python experiments/data_paths.py --from-sweep sweeps/data_paths

Each run is the one ``python experiments/data_paths.py --modes MODE --dtype DTYPE --seeds SEED`` trains in its own
process (the same config fields). Runs are named ``config=default-data=M-dtype=D-seed=S``.
"""

from overfocus_jax.configs import default

PATHS = (("on", "float32"), ("off", "float32"), ("on", "bfloat16"))
SEEDS = (0, 1, 2)


def get_config():
  return default.get_config()


def get_sweep():
  return [{"name": f"config=default-data={mode}-dtype={dtype}-seed={seed}", "config": "default.py",
           "data_on_device": mode, "dtype": dtype, "seed": seed}
          for seed in SEEDS for mode, dtype in PATHS]
