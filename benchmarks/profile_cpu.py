r"""Where the JAX CPU train step spends its time, and what changes it — every comparison measured in one run.

    python -m benchmarks.profile_cpu                         # all sections → benchmarks/results/profile_cpu.json
    python -m benchmarks.profile_cpu --sections ops conv     # some of them

Run from the repository root. Sections (the default model: the seeds' residual CNN, batch 128, 28×28×1, unless
said otherwise):
  ops        per-HLO-op time of the compiled train step from a jax.profiler trace, grouped into convolution
             forward / input gradient / weight gradient, layout copies, elementwise fusions and reductions; at
             ``platform_tuning=off`` and ``auto``.
  parts      forward (train-mode BN + loss), forward+backward, full step (with the optimizer), JAX vs torch.
  conv       the biggest convolution alone (128×28×28×32 → 32, 3×3): forward, input gradient, weight gradient
             in JAX (XLA as it comes; NCHW/OIHW dimension numbers; Eigen via XLA_FLAGS; the package's
             convolution at ``platform_tuning=auto``) and in torch (NCHW, channels-last), plus JAX pinned to one
             core and torch with one thread.
  flags      the full step under XLA CPU flags (YNNPACK convolutions off, XNNPACK graph fusion, Eigen
             single-threaded, oneDNN, ...), JAX pinned to one core, default matmul precision, vs torch.
  batch      batch 64 and 256: JAX at ``platform_tuning=off`` and ``auto``, torch.
  bf16       the config's ``dtype=bfloat16`` (JAX, at ``platform_tuning=off`` and ``auto``) and torch's CPU
             autocast vs float32 — not the same math, reported because this CPU has AMX-BF16.
Each section starts one worker process per case (benchmarks/harness.py) and times them interleaved.

The "jax" step here is the package's step at ``--config.platform_tuning=off``, as XLA compiles it by default
(YNNPACK convolutions, XLA's own convolution gradients): the state this profile was made to explain, before the
package's CPU tuning (``platform_tuning=auto``: Eigen convolutions and the sliced weight gradient), which the
sections show beside it. ``python -m benchmarks.step_time`` times the package as it is against PyTorch.
"""

import argparse
import collections
import datetime
import glob
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

from benchmarks import harness

# This profile studies the step as XLA compiles it by default (platform_tuning=off) — the package before the CPU
# tuning it led to (BENCHMARKS.md) — so "jax" rows mean that step, and the tuning appears as a variant of it.
DEFAULT = {"model": "resnet", "batch_size": 128, "image_shape": [28, 28, 1], "dataset": "mnist5k",
           "platform_tuning": "off"}
TUNED = {**DEFAULT, "platform_tuning": "auto"}  # the package as it is on one CPU device
BIG_CONV = {"input_shape": [128, 28, 28, 32], "features": 32}
YNN_CONV_OFF = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _flags(value: str) -> dict:
  return {"XLA_FLAGS": value}


def section_parts():
  cases = {}
  for part in ("forward", "grad"):
    cases[f"jax {part}"] = {"kind": "jax_part", "part": part, **DEFAULT}
    cases[f"torch {part}"] = {"kind": "torch_part", "part": part, "channels_last": True, **DEFAULT}
  cases["jax step"] = {"kind": "jax_step", **DEFAULT}
  cases["torch step"] = {"kind": "torch_step", "channels_last": True, **DEFAULT}
  return cases, "torch step"


def section_conv():
  cases = {}
  for op in ("fwd", "dx", "dw"):
    cases[f"jax {op}"] = {"kind": "jax_conv", "op": op, **BIG_CONV}
    cases[f"jax {op} NCHW/OIHW"] = {"kind": "jax_conv", "op": op, "dimension_numbers": "NCHW", **BIG_CONV}
    cases[f"torch {op}"] = {"kind": "torch_conv", "op": op, **BIG_CONV}
    cases[f"torch {op} channels_last"] = {"kind": "torch_conv", "op": op, "channels_last": True, **BIG_CONV}
    cases[f"jax {op}, platform_tuning=auto"] = {"kind": "jax_conv", "op": op, "platform_tuning": "auto",
                                                **BIG_CONV}
  cases["jax dw, YNNPACK conv off (Eigen)"] = {"kind": "jax_conv", "op": "dw", "env": _flags(YNN_CONV_OFF),
                                                **BIG_CONV}
  cases["jax fwd, YNNPACK conv off (Eigen)"] = {"kind": "jax_conv", "op": "fwd", "env": _flags(YNN_CONV_OFF),
                                                 **BIG_CONV}
  for op in ("fwd", "dw"):
    cases[f"jax {op} 1 core"] = {"kind": "jax_conv", "op": op, "cpus": [0], **BIG_CONV}
    cases[f"torch {op} 1 thread"] = {"kind": "torch_conv", "op": op, "threads": 1, "channels_last": True,
                                     "cpus": [0], **BIG_CONV}
  return cases, "torch dw channels_last"


def section_flags():
  variants = {
      "jax (no flags)": None,
      "YNNPACK convolutions off (Eigen)": YNN_CONV_OFF,
      "YNNPACK only for dots": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
      "XNNPACK graph fusion greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
      "xla_cpu_multi_thread_eigen=false": "--xla_cpu_multi_thread_eigen=false",
      "xla_cpu_use_onednn=true": "--xla_cpu_use_onednn=true",
      "xla_cpu_enable_fast_math=true": "--xla_cpu_enable_fast_math=true",
  }
  cases = {}
  for name, value in variants.items():
    cases[name] = {"kind": "jax_step", **DEFAULT, **({"env": _flags(value)} if value else {})}
  cases["jax, default_matmul_precision=highest"] = {"kind": "jax_step", "matmul_precision": "highest", **DEFAULT}
  cases["jax pinned to 1 core"] = {"kind": "jax_step", "cpus": [0], **DEFAULT}
  cases["torch (channels_last)"] = {"kind": "torch_step", "channels_last": True, **DEFAULT}
  cases["torch 1 thread, 1 core"] = {"kind": "torch_step", "channels_last": True, "threads": 1, "cpus": [0],
                                     **DEFAULT}
  return cases, "torch (channels_last)"


def section_batch(batch_size):
  off, tuned = {**DEFAULT, "batch_size": batch_size}, {**TUNED, "batch_size": batch_size}
  cases = {f"jax b{batch_size}": {"kind": "jax_step", **off},
           f"jax platform_tuning=auto b{batch_size}": {"kind": "jax_step", **tuned},
           f"torch b{batch_size}": {"kind": "torch_step", "channels_last": True, **off},
           f"torch nchw b{batch_size}": {"kind": "torch_step", "channels_last": False, **off}}
  return cases, f"torch b{batch_size}"


def section_bf16():
  cases = {"jax float32": {"kind": "jax_step", **DEFAULT},
           "jax bfloat16": {"kind": "jax_step", "dtype": "bfloat16", **DEFAULT},
           "jax float32, platform_tuning=auto": {"kind": "jax_step", **TUNED},
           "jax bfloat16, platform_tuning=auto": {"kind": "jax_step", "dtype": "bfloat16", **TUNED},
           "torch float32": {"kind": "torch_step", "channels_last": True, **DEFAULT},
           "torch bf16 autocast": {"kind": "torch_step", "channels_last": True, "dtype": "bfloat16", **DEFAULT}}
  return cases, "torch float32"


# ------------------------------------------------------------------------------------- per-op profile (ops)


def _parse_hlo(text: str):
  """{instruction name: (shape, opcode, op_name metadata, called computation body)} for the entry computation."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%(\S+) \(.*?\) -> .*? \{\n(.*?)\n\}", text, re.S)}
  entry = text[text.index("\nENTRY"):]
  info = {}
  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(", line)
    if not m:
      continue
    calls = re.search(r"calls=%([^,\s}]+)", line)
    meta = re.search(r'op_name="([^"]+)"', line)
    body = bodies.get(calls.group(1), "") if calls else ""
    if not meta and body:
      meta = re.search(r'op_name="([^"]+)"', body)
    info[m.group(1)] = (m.group(2), m.group(3), meta.group(1) if meta else "", body, line)
  return info


def _category(info, batch: int) -> str:
  """A coarse kind for one entry instruction (a fusion is classified by the ops it contains)."""
  del batch
  shape, opcode, op_name, body, line = info
  text = body or line
  has = lambda op: re.search(rf"= \S+ {op}\(", text) is not None  # noqa: E731
  if has("convolution"):
    window = re.search(r"window=\{size=([\dx]+)", text)
    sizes = [int(v) for v in window.group(1).split("x")] if window else []
    if any(v not in (1, 3) for v in sizes):  # the model's kernels are 1×1 and 3×3; a larger window is dL/dW
      return "conv weight gradient"
    if "lhs_dilate" in text:
      return "conv input gradient (stride 2, lhs-dilated)"
    if "transpose(" in op_name:
      return "conv input gradient"
    return "conv forward"
  if has("dot"):
    return "dense (dot)"
  if has("reduce"):
    return "reductions (BN statistics, bias/scale grads)"
  if has("transpose") or opcode in ("copy", "transpose") or (has("copy") and not has("add")):
    return "layout copies (transpose/copy)"
  if has("concatenate") or has("slice") or has("pad"):
    return "slice / pad / concatenate"
  return "elementwise fusions (BN, ReLU, optimizer)"


def op_profile_worker(spec: dict) -> dict:
  """Runs in a subprocess: traces a few steps of the package's train step, returns time per category."""
  import time
  import jax
  from jax.profiler import ProfileData
  from benchmarks import cases as cases_lib
  made = cases_lib.make_jax_step(spec)
  step, exp, device_batch = made
  # The optimized HLO of the same jitted step: its instruction names are the thunk names in the trace.
  info = _parse_hlo(step.lower(exp.state, device_batch).compile().as_text())
  run, finish, _ = cases_lib.build_jax_step(spec, made)
  batch = spec["batch_size"]
  for _ in range(2):
    finish(run())
  steps = spec.get("steps", 5)
  trace_dir = tempfile.mkdtemp(prefix="overfocus_trace_")
  jax.profiler.start_trace(trace_dir)
  start, cpu_start = time.perf_counter(), time.process_time()
  out = None
  for _ in range(steps):
    out = run()
  finish(out)
  wall, cpu = (time.perf_counter() - start) / steps, (time.process_time() - cpu_start) / steps
  jax.profiler.stop_trace()
  path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  per_op = collections.Counter()
  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in info:
          per_op[event.name] += event.duration_ns / 1e6 / steps
  per_category = collections.Counter()
  for name, ms in per_op.items():
    per_category[_category(info[name], batch)] += ms
  top = [{"op": name, "ms": round(ms, 2), "category": _category(info[name], batch), "shape": info[name][0]}
         for name, ms in per_op.most_common(15)]
  # Eigen convolutions finish asynchronously in the intra-op pool: their work is not inside their thunk's trace
  # event. What the process burnt beyond the named ops is reported as such.
  per_category["not attributed to an HLO op (async Eigen work, runtime)"] = max(
      0.0, cpu * 1e3 - sum(per_op.values()))
  return {"wall_ms_per_step": wall * 1e3, "cpu_ms_per_step": cpu * 1e3,
          "op_ms_per_step_summed_over_threads": sum(per_op.values()),
          "categories_ms": dict(per_category.most_common()), "top_ops": top}


def section_ops(log):
  out = {}
  for name, spec in {"jax (platform_tuning=off)": DEFAULT, "jax (platform_tuning=auto)": TUNED}.items():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_cpu_enable_xprof_traceme=true"}
    log(f"  op profile: {name}")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile_cpu", "--op-profile-worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True, cwd=str(harness.ROOT))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("@@")]
    if proc.returncode or not lines:
      raise RuntimeError(f"op profile failed: {proc.stderr[-2000:]}")
    out[name] = json.loads(lines[-1][2:])
  return out


def thunk_runtime_flag() -> str:
  """Whether --xla_cpu_use_thunk_runtime=false still does anything in this jaxlib."""
  env = {**os.environ, "XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; jax.jit(lambda x: x + 1)(jnp.ones(2))"],
                        env=env, capture_output=True, text=True)
  warning = [l for l in proc.stderr.splitlines() if "thunk_runtime" in l]
  return warning[0].split("] ", 1)[-1] if warning else f"accepted silently (exit {proc.returncode})"


# ----------------------------------------------------------------------------------------------- reporting


def run_section(name, cases, reference, args, log):
  log(f"[{name}] starting {len(cases)} workers")
  workers = harness.start(cases, log=log, platform="cpu")  # a CPU profile, on a GPU machine too
  try:
    seconds = harness.interleave(workers, steps=args.steps, repeats=args.repeats, log=log)
  finally:
    harness.close(workers)
  ref = statistics.median(seconds[reference])
  rows = {}
  for case, values in seconds.items():
    spec = cases[case]
    rows[case] = {"ms": harness.median_ms(values), "ms_min": min(values) * 1e3,
                  "ms_all": [v * 1e3 for v in values], "relative_to_reference": statistics.median(values) / ref,
                  "cpu_per_wall": statistics.median(workers[case].cpu_per_wall), "spec": spec}
    if "batch_size" in spec and spec["kind"].endswith("step"):
      rows[case]["images_per_s"] = spec["batch_size"] / statistics.median(values)
  return {"reference": reference, "rows": rows}


def markdown_section(name, section) -> str:
  if name == "ops":
    lines = []
    for case, prof in section.items():
      lines.append(f"**{case}**: {prof['wall_ms_per_step']:.0f} ms/step wall, {prof['cpu_ms_per_step']:.0f} ms "
                   f"CPU time (all threads), {prof['op_ms_per_step_summed_over_threads']:.0f} ms in named ops\n")
      lines.append("| category | CPU ms/step | share of CPU time |")
      lines.append("|---|---|---|")
      total = max(prof["cpu_ms_per_step"], prof["op_ms_per_step_summed_over_threads"])
      for cat, ms in prof["categories_ms"].items():
        if ms < 0.5:
          continue
        lines.append(f"| {cat} | {ms:.0f} | {ms / total:.0%} |")
      lines.append("")
    return "\n".join(lines)
  lines = [f"| case | ms | × {section['reference']} | img/s | CPU time / wall |", "|---|---|---|---|---|"]
  for case, row in section["rows"].items():
    ips = f"{row['images_per_s']:.0f}" if "images_per_s" in row else ""
    lines.append(f"| {case} | {row['ms']:.1f} | {row['relative_to_reference']:.2f} | {ips} | "
                 f"{row['cpu_per_wall']:.2f} |")
  return "\n".join(lines)


SECTIONS = ("ops", "parts", "conv", "flags", "batch", "bf16")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
  parser.add_argument("--steps", type=int, default=3, help="calls per timed block")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians are reported")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "profile_cpu.json"))
  parser.add_argument("--op-profile-worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.op_profile_worker:
    result = op_profile_worker(json.loads(args.op_profile_worker))
    print("@@" + json.dumps(result), flush=True)
    return 0

  log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
  record = {"command": "python -m benchmarks.profile_cpu " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": harness.machine(), "versions": harness.versions(), "steps": args.steps,
            "repeats": args.repeats, "sections": {}}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if "flags" in args.sections:
    record["xla_cpu_use_thunk_runtime=false"] = thunk_runtime_flag()
  for name in args.sections:
    if name == "ops":
      record["sections"]["ops"] = section_ops(log)
    elif name == "batch":
      for batch_size in (64, 256):
        cases, reference = section_batch(batch_size)
        record["sections"][f"batch{batch_size}"] = run_section(f"batch{batch_size}", cases, reference, args, log)
    else:
      cases, reference = globals()[f"section_{name}"]()
      record["sections"][name] = run_section(name, cases, reference, args, log)
    record["load_average_now"] = [round(x, 2) for x in os.getloadavg()]
    out.write_text(json.dumps(record, indent=2) + "\n")  # after every section: partial results survive
  for name, section in record["sections"].items():
    print(f"\n### {name}\n")
    print(markdown_section(name, section))
  if "xla_cpu_use_thunk_runtime=false" in record:
    print(f"\n--xla_cpu_use_thunk_runtime=false: {record['xla_cpu_use_thunk_runtime=false']}")
  print(f"\nload average {record['machine'].get('load_average_at_start')} at start, "
        f"{record['load_average_now']} at end (2 cores); results in {out}")
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
