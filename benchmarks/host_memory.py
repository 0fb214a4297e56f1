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

from benchmarks import gpu_protocol, harness

HERE = pathlib.Path(__file__).resolve().parent
MODEL, BATCH_SIZE = "resnet", 128


def cases(dtype: str, warmup: int) -> dict:
  """The goal command's pair (gpu_protocol.step_cases on this CPU) and the JAX step with glibc's own settings."""
  pair = gpu_protocol.step_cases(MODEL, BATCH_SIZE, dtype, "cpu", ["eager"], warmup)
  jax = {key: value for key, value in pair["jax"].items() if key != "flops"}  # FLOPs are not asked for here
  return {f"jax {dtype}, kept mapped": jax,
          f"jax {dtype}, glibc default": {**jax, "env": {"OVERFOCUS_HOST_MEMORY": "default"}},
          f"torch eager {dtype}": pair["torch eager"]}


def measure(dtype: str, args, log) -> dict:
  rows = gpu_protocol.run_group(cases(dtype, args.warmup), args, log)
  failed = {name: row["error"] for name, row in rows.items() if "error" in row}
  if failed:
    raise SystemExit(f"cases failed to start: {failed}")
  reference = rows[f"torch eager {dtype}"]["step_ms"]
  for row in rows.values():
    row.update(over_torch_eager=reference / row["step_ms"],
               minor_faults_per_step=statistics.median(row["minor_faults_per_step"]),
               host_memory=row["info"].get("host_memory"))
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
  parser.set_defaults(platform="cpu", device="cpu")  # what gpu_protocol.run_group reads
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
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
