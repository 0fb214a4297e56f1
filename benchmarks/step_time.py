r"""Train-step throughput of overfocus-jax vs a PyTorch eager peer of the same model, measured side by side.

    python -m benchmarks.step_time                          # writes benchmarks/results/cpu.json, prints a table
    python -m benchmarks.step_time --steps 3 --repeats 3 --platform-tuning auto     # quicker

Run from the repository root. For each configuration (default: the seeds' residual CNN, batch 128, on 28×28×1 —
the mnist5k default — and on 32×32×3, the PERF-NOTES case) it starts one worker process per case and times them
interleaved, round after round (JAX, torch, torch channels-last, ..., then the same in reverse order), so all
cases see the same load on a shared machine; ratios of medians from one run are the numbers to trust, not
absolute values across runs.

Cases per configuration:
  jax                the package as it is (``--config.platform_tuning=auto``, the default):
                     ``experiment.build_experiment`` + ``experiment.jit_train_step`` (what ``overfocus train``/
                     ``bench`` run), timed after compilation and warm-up, ``jax.block_until_ready`` on the state
                     after each block of steps; the batch is a fixed device array. On one CPU device that step
                     has the CPU tuning of BENCHMARKS.md: Eigen convolutions and weight gradients summed over
                     batch slices.
  jax+off            the same step at ``--config.platform_tuning=off``: XLA's default compiler options (YNNPACK
                     convolutions) and its own convolution gradients. ``--platform-tuning auto`` leaves it out.
  torch_nchw         benchmarks/torch_peer.py's step, contiguous NCHW (input converted from NHWC inside the step).
  torch_cl           the same with ``torch.channels_last``.
  torch_cl_1t        channels-last with one intra-op thread: on a loaded 2-core machine OpenMP's two threads can be
                     slower than one, so this column tells whether a gap comes from load rather than kernels.
The torch number in the table is the faster of NCHW and channels-last at torch's default thread count; the
ratio is JAX / that torch, in images per second.
"""

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys

from overfocus_jax import platform_tuning

from benchmarks import harness

DEFAULT_CONFIGS = ("resnet:28x28x1:128:mnist5k", "resnet:32x32x3:128:synthetic")


def case_name(mode: str) -> str:
  return "jax" if mode == "auto" else f"jax+{mode}"


def parse_config(text: str) -> dict:
  """'resnet:32x32x3:128:synthetic' → spec fields (dataset defaults to synthetic)."""
  parts = text.split(":")
  model, shape, batch = parts[:3]
  dataset = parts[3] if len(parts) > 3 else "synthetic"
  return {"model": model, "image_shape": [int(v) for v in shape.split("x")], "batch_size": int(batch),
          "dataset": dataset}


def cases_for(config: dict, args) -> dict:
  cases = {case_name(mode): {"kind": "jax_step", "platform_tuning": mode, **config}
           for mode in args.platform_tuning}
  threads = {"threads": args.threads} if args.threads else {}
  cases["torch_nchw"] = {"kind": "torch_step", "channels_last": False, **threads, **config}
  cases["torch_cl"] = {"kind": "torch_step", "channels_last": True, **threads, **config}
  cases["torch_cl_1t"] = {"kind": "torch_step", "channels_last": True, "threads": 1, **config}
  return cases


def summarize(config: dict, seconds: dict, workers: dict) -> dict:
  batch = config["batch_size"]
  cases = {}
  for name, values in seconds.items():
    cases[name] = {
        "step_ms": harness.median_ms(values), "images_per_s": batch / statistics.median(values),
        "step_ms_min": min(values) * 1e3, "step_ms_all": [v * 1e3 for v in values],
        "cpu_per_wall_median": statistics.median(workers[name].cpu_per_wall), "info": workers[name].info,
    }
  torch_best = min(("torch_nchw", "torch_cl"), key=lambda n: cases[n]["step_ms"])
  out = {"config": config, "cases": cases, "torch_best": torch_best}
  for name in cases:
    if name.startswith("jax"):
      out[f"{name}_over_torch"] = cases[name]["images_per_s"] / cases[torch_best]["images_per_s"]
  if "jax" in cases and "jax+off" in cases:
    out["jax_over_jax+off"] = cases["jax"]["images_per_s"] / cases["jax+off"]["images_per_s"]
  return out


def markdown(results: list[dict], modes) -> str:
  head = "| model | input | batch |"
  rule = "|---|---|---|"
  for mode in modes:
    head += f" JAX platform_tuning={mode} img/s | JAX ({mode}) / PyTorch |"
    rule += "---|---|"
  head += " PyTorch img/s (format) | PyTorch 1 thread img/s |"
  rule += "---|---|"
  lines = [head, rule]
  for r in results:
    c, cases = r["config"], r["cases"]
    torch = cases[r["torch_best"]]
    fmt = "channels_last" if r["torch_best"] == "torch_cl" else "NCHW"
    line = f"| {c['model']} | {'×'.join(map(str, c['image_shape']))} | {c['batch_size']} |"
    for mode in modes:
      name = case_name(mode)
      line += f" {cases[name]['images_per_s']:.0f} | **{r[name + '_over_torch']:.2f}** |"
    line += f" {torch['images_per_s']:.0f} ({fmt}) | {cases['torch_cl_1t']['images_per_s']:.0f} |"
    lines.append(line)
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", action="append", dest="configs", metavar="MODEL:HxWxC:BATCH[:DATASET]",
                      help=f"repeatable; default {' and '.join(DEFAULT_CONFIGS)}")
  parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds; the median block is reported")
  parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
  parser.add_argument("--platform-tuning", nargs="+", choices=platform_tuning.MODES,
                      default=list(platform_tuning.MODES),
                      help="the JAX step at these --config.platform_tuning values (default: all of them)")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "cpu.json"))
  args = parser.parse_args(argv)
  args.platform_tuning = list(dict.fromkeys(args.platform_tuning))

  log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
  record = {"command": "python -m benchmarks.step_time " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": harness.machine(), "versions": harness.versions(), "steps": args.steps,
            "repeats": args.repeats, "platform_tuning": args.platform_tuning, "results": []}
  for text in args.configs or DEFAULT_CONFIGS:
    config = parse_config(text)
    log(f"{text}: starting workers")
    workers = harness.start(cases_for(config, args), log=log, platform="cpu")  # a CPU benchmark, anywhere
    try:
      n_torch = workers["torch_nchw"].info["params"]
      for mode in args.platform_tuning:
        n_jax = workers[case_name(mode)].info["params"]
        if n_jax != n_torch:
          raise AssertionError(f"parameter counts differ: jax ({mode}) {n_jax}, torch {n_torch}")
      seconds = harness.interleave(workers, steps=args.steps, repeats=args.repeats, log=log)
    finally:
      harness.close(workers)
    result = summarize(config, seconds, workers)
    result["params"] = n_torch
    record["results"].append(result)
  record["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=2) + "\n")
  print(markdown(record["results"], args.platform_tuning))
  print(f"\nload average {record['machine'].get('load_average_at_start')} at start, "
        f"{record['load_average_at_end']} at end (2 cores); results in {out}")
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
