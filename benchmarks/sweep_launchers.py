r"""The parallel launcher against the local one: the same small sweep (the default model at a quarter of its widths on
the 8x8 digits, 2 epochs, four seeds) run one after another and with two workers, each a share of the cores, in one
run of this script; wall time of each and their ratio.

    python -m benchmarks.sweep_launchers --out benchmarks/results/sweep_launchers.json

The two launches start from fresh folders and an empty compilation cache each (OVERFOCUS_COMPILATION_CACHE=off), so
both pay the same compilations. Records equal bit for bit only at equal core counts (tests/test_sweeps.py); here
the local runs have every core and the parallel ones half each, so only the time is compared.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

SWEEP = '''
from overfocus_jax.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "digits"
  config.resnet.stem_features = 4
  config.resnet.stage_widths = (8, 16, 32)
  config.num_epochs = 2
  return config


def get_sweep():
  return [{"seed": seed} for seed in range(RUNS)]
'''


def launch(config: pathlib.Path, out: pathlib.Path, *launcher: str) -> float:
  env = dict(os.environ, OVERFOCUS_COMPILATION_CACHE="off")
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "overfocus_jax", "sweep", "run", "--config", str(config), "--out", str(out),
                  *launcher], check=True, env=env, stdout=subprocess.DEVNULL)
  return time.perf_counter() - start


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", type=int, default=4)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--out", help="write the result as JSON here")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as folder:
    folder = pathlib.Path(folder)
    config = folder / "sweep.py"
    config.write_text(SWEEP.replace("RUNS", str(args.runs)))
    local = launch(config, folder / "local")
    parallel = launch(config, folder / "parallel", "--launcher", "parallel", "--workers", str(args.workers))
  result = {"runs": args.runs, "workers": args.workers, "cores": len(os.sched_getaffinity(0)),
            "local_s": round(local, 1), "parallel_s": round(parallel, 1), "speedup": round(local / parallel, 2),
            "command": "python -m benchmarks.sweep_launchers"}
  print(json.dumps(result))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
