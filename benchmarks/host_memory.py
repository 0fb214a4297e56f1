r"""XLA:CPU's per-step block kept mapped (``overfocus_jax/host_memory.py``) or left to glibc: faults and step time.

    python -m benchmarks.host_memory                       # → benchmarks/results/host_memory.json + a table
    python -m benchmarks.host_memory --dtypes float32 --rounds 7

For the default model at batch 128 on this CPU, per dtype: the package's train step as it is (the settings applied
when the package is imported), the same with ``OVERFOCUS_HOST_MEMORY=default`` (glibc's own malloc settings), and
the PyTorch eager peer (channels-last; bf16 autocast for bfloat16) — one worker process each, ``--warmup`` untimed
steps each, then interleaved rounds (medians). Each row gives the minor page faults per step of its timed blocks:
with glibc's settings XLA:CPU maps its 158 MB block of temporaries anew every step.
"""

import argparse
import json
import pathlib
import statistics
import sys

from benchmarks import harness

HERE = pathlib.Path(__file__).resolve().parent
COMMON = {"model": "resnet", "batch_size": 128, "image_shape": [28, 28, 1], "dataset": "mnist5k"}


def cases(dtype: str, warmup: int) -> dict:
  jax = {"kind": "jax_step", "dtype": dtype, "warmup": max(warmup - 1, 0), **COMMON}  # + the compiling step
  return {f"jax {dtype}, kept mapped": jax,
          f"jax {dtype}, glibc default": {**jax, "env": {"OVERFOCUS_HOST_MEMORY": "default"}},
          f"torch eager {dtype}": {"kind": "torch_step", "channels_last": True, "dtype": dtype, "warmup": warmup,
                                   **COMMON}}


def measure(dtype: str, args, log) -> dict:
  group = cases(dtype, args.warmup)
  workers = harness.start(group, log=log, platform="cpu")
  try:
    seconds = harness.interleave(workers, steps=args.steps, repeats=args.rounds, log=log)
  finally:
    harness.close(workers)
  reference = statistics.median(seconds[f"torch eager {dtype}"])
  rows = {}
  for name, values in seconds.items():
    rows[name] = {"step_ms": harness.median_ms(values), "step_ms_all": [v * 1e3 for v in values],
                  "images_per_s": COMMON["batch_size"] / statistics.median(values),
                  "over_torch_eager": reference / statistics.median(values),
                  "minor_faults_per_step": statistics.median(workers[name].minor_faults),
                  "host_memory": workers[name].info.get("host_memory")}
  return {"dtype": dtype, "rows": rows}


def markdown(groups: list[dict]) -> str:
  lines = ["| case | step ms | img/s | × torch eager | minor page faults / step | host_memory |",
           "|---|---|---|---|---|---|"]
  for group in groups:
    for name, row in group["rows"].items():
      lines.append(f"| {name} | {row['step_ms']:.1f} | {row['images_per_s']:.0f} | {row['over_torch_eager']:.2f} | "
                   f"{row['minor_faults_per_step']:,.0f} | {row['host_memory'] or '—'} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, JAX and torch (compilation "
                      "included)")
  parser.add_argument("--out", default=str(HERE / "results" / "host_memory.json"))
  args = parser.parse_args(argv)
  log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
  groups = [measure(dtype, args, log) for dtype in args.dtypes]
  record = {"command": "python -m benchmarks.host_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": harness.machine(), "versions": harness.versions(),
            "groups": groups}
  pathlib.Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
  print(markdown(groups))
  return 0


if __name__ == "__main__":
  sys.exit(main())
