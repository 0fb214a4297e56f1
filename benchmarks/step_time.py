r"""Train-step throughput of overfocus-jax vs a PyTorch eager peer of the same model, measured side by side.

    python benchmarks/step_time.py                      # writes benchmarks/results/cpu.json, prints a table
    python benchmarks/step_time.py --steps 3 --repeats 3 --no-earlier   # quicker

For each configuration (default: the seeds' residual CNN, batch 128, on 28×28×1 — the mnist5k default — and on
32×32×3, the PERF-NOTES case) it starts one worker process per case and times them interleaved, round after
round (JAX, torch, torch channels-last, ..., then the same in reverse order), so all cases see the same load on a
shared machine; ratios of medians from one run are the numbers to trust, not absolute values across runs.

Cases per configuration:
  jax                the package as it is: ``loop.build_experiment`` + ``loop.jit_train_step`` (what ``overfocus
                     train``/``bench`` run), timed after compilation and warm-up, ``jax.block_until_ready`` on the
                     state after each block of steps; the batch is a fixed device array.
                     On one CPU device that step has the two CPU changes of BENCHMARKS.md: Eigen convolutions
                     (``parallel.compiler_options``) and weight gradients summed over batch slices
                     (``models/conv.py``).
  jax+xla_dw         the package without the second change: XLA's own convolution gradients.
  jax+xla_defaults   the package without either change: XLA's default compiler options (YNNPACK convolutions)
                     and its own gradients — the step as it was first measured. ``--no-earlier`` leaves both out.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

DEFAULT_CONFIGS = ("resnet:28x28x1:128:mnist5k", "resnet:32x32x3:128:synthetic")
# The package's step as it was before each of BENCHMARKS.md's CPU changes, timed next to it (same model and math).
EARLIER = {
    "xla_dw": {"conv_impl": "lax"},           # before change 2: XLA's own convolution gradients
    "xla_defaults": {"xla_defaults": True},   # before changes 1 and 2: XLA's default options (YNNPACK convs)
}
DEFAULT_EARLIER = ("xla_dw", "xla_defaults")


def parse_config(text: str) -> dict:
  """'resnet:32x32x3:128:synthetic' → spec fields (dataset defaults to synthetic)."""
  parts = text.split(":")
  model, shape, batch = parts[:3]
  dataset = parts[3] if len(parts) > 3 else "synthetic"
  return {"model": model, "image_shape": [int(v) for v in shape.split("x")], "batch_size": int(batch),
          "dataset": dataset}


def cases_for(config: dict, args) -> dict:
  cases = {"jax": {"kind": "jax_step", **config}}
  for name in args.earlier:
    cases[f"jax+{name}"] = {"kind": "jax_step", **EARLIER[name], **config}
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
  out = {"config": config, "cases": cases, "torch_best": torch_best,
         "jax_over_torch": cases["jax"]["images_per_s"] / cases[torch_best]["images_per_s"]}
  for name in cases:
    if name.startswith("jax+"):
      out[f"{name}_over_torch"] = cases[name]["images_per_s"] / cases[torch_best]["images_per_s"]
      out[f"{name}_over_jax"] = cases[name]["images_per_s"] / cases["jax"]["images_per_s"]
  return out


def markdown(results: list[dict], earlier) -> str:
  head = "| model | input | batch | JAX img/s | PyTorch img/s (format) | JAX / PyTorch |"
  rule = "|---|---|---|---|---|---|"
  for name in earlier:
    head += f" JAX, {name} img/s (/ PyTorch) |"
    rule += "---|"
  head += " PyTorch 1 thread img/s |"
  rule += "---|"
  lines = [head, rule]
  for r in results:
    c, cases = r["config"], r["cases"]
    torch = cases[r["torch_best"]]
    fmt = "channels_last" if r["torch_best"] == "torch_cl" else "NCHW"
    line = (f"| {c['model']} | {'×'.join(map(str, c['image_shape']))} | {c['batch_size']} | "
            f"{cases['jax']['images_per_s']:.0f} | {torch['images_per_s']:.0f} ({fmt}) | {r['jax_over_torch']:.2f} |")
    for name in earlier:
      line += f" {cases['jax+' + name]['images_per_s']:.0f} ({r['jax+' + name + '_over_torch']:.2f}) |"
    line += f" {cases['torch_cl_1t']['images_per_s']:.0f} |"
    lines.append(line)
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", action="append", dest="configs", metavar="MODEL:HxWxC:BATCH[:DATASET]",
                      help=f"repeatable; default {' and '.join(DEFAULT_CONFIGS)}")
  parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds; the median block is reported")
  parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
  parser.add_argument("--earlier", action="append", dest="earlier", choices=sorted(EARLIER),
                      help=f"the package before a change; repeatable; default {' and '.join(DEFAULT_EARLIER)}")
  parser.add_argument("--no-earlier", dest="earlier", action="store_const", const=[])
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "cpu.json"))
  args = parser.parse_args(argv)
  if args.earlier is None:
    args.earlier = list(DEFAULT_EARLIER)

  log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
  record = {"command": "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": harness.machine(), "versions": harness.versions(), "steps": args.steps,
            "repeats": args.repeats, "earlier": {n: EARLIER[n] for n in args.earlier}, "results": []}
  for text in args.configs or DEFAULT_CONFIGS:
    config = parse_config(text)
    log(f"{text}: starting workers")
    workers = harness.start(cases_for(config, args), log=log)
    try:
      n_jax, n_torch = workers["jax"].info["params"], workers["torch_nchw"].info["params"]
      if n_jax != n_torch:
        raise AssertionError(f"parameter counts differ: jax {n_jax}, torch {n_torch}")
      seconds = harness.interleave(workers, steps=args.steps, repeats=args.repeats, log=log)
    finally:
      harness.close(workers)
    result = summarize(config, seconds, workers)
    result["params"] = n_jax
    record["results"].append(result)
  record["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(record, indent=2) + "\n")
  print(markdown(record["results"], args.earlier))
  print(f"\nload average {record['machine'].get('load_average_at_start')} at start, "
        f"{record['load_average_at_end']} at end (2 cores); results in {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
