r"""The GPU protocol: the package's train step against PyTorch eager and torch.compile, the
regularizers' overhead, MFU and the end-to-end number, in one command that writes one JSON file.

    pip install torch==2.13.0      # next to jax[cuda12]; not a dependency of overfocus-jax
    python -m benchmarks.gpu_protocol --out benchmarks/results/gpu.json
    python -m benchmarks.gpu_protocol --device cpu --rounds 1 --steps 1 --batch-sizes 8 --models resnet \
        --dtypes float32 --out /tmp/gpu_protocol_smoke.json          # a smoke test of the same code on a CPU

Run from the repository root. Sections, in this order (``--sections`` picks some; the JSON file is rewritten
after every group, so an interrupted run keeps what it measured):

  check         the same-maths check first: ``python -m benchmarks.torch_peer --check-only`` for each model, on the
                device, float32 with TF32 off on both sides — two train steps of the JAX package and of the torch
                peer from the same parameters and batch; logits, loss and every parameter must agree within
                ``--check-tolerance``, else the protocol stops (exit 1) before timing anything.
  steps         for each model (``resnet``: the default residual CNN on mnist5k, 28×28×1; ``resnet18``: ResNet-18
                on 32×32×3 synthetic images, as ``benchmarks.step_time`` feeds it), batch size and dtype, one
                group of cases, each in its own worker process (benchmarks/harness.py), timed in interleaved
                rounds and reported as medians: the package's compiled train step (``experiment.jit_train_step``,
                ``--config.dtype``), and the torch peer (channels-last, on the device) in eager mode and under
                ``torch.compile`` modes ``default`` and ``reduce-overhead`` (bf16: ``torch.autocast``). Ratios are
                speeds, JAX over torch: JAX / eager (goal ≥ 1.5) and JAX / the faster torch.compile (goal ≥ 1.0).
                MFU = 3 × the model's inference FLOPs per image (``bench.inference_flops_per_image``, XLA's count)
                × batch / step time / the GPU's dense peak for the dtype (float32 against the TF32 peak: both
                frameworks let float32 convolutions use TF32 by default); null on a device not in ``PEAKS``.
  regularizers  the JAX step with ``--config.regularizer.name=sgdrop`` (the library's default SGDrop) and ``rsc``
                vs the plain one, per model, at the smallest batch size, float32 (goal ≤ 1.05× the plain step).
  mask_kernels  ``python -m benchmarks.mask_kernels --rounds R`` on the device: the drop mask's ``lax.top_k`` and
                threshold kernels at SGDrop's shapes (batch 128, N = 256 … 16384, ρ = 0.1), the ratio behind
                ``overfocus_jax.challenge.masks.mask_kernel``'s accelerator rule (threshold for k > 16).
  end_to_end    ``python -m overfocus_jax bench`` (= ``overfocus bench``) as a subprocess for each model, batch
                size and dtype, its JSON recorded whole; its ``end_to_end_images_per_s``/``end_to_end_step_ms``
                (the train loop with its input pipeline) when that version of the package reports them, else null.
                ResNet-18 reads a synthetic 32×32×3 ``npz:`` file written for the run.

``--device`` (default cuda when torch sees a GPU) is where both frameworks run: JAX workers get
``JAX_PLATFORMS=cuda,cpu`` (so a jax without GPU support fails instead of silently timing the CPU; the CPU backend
is there to count FLOPs) or ``cpu``. On a GPU
the JAX workers of a group share half the GPU memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``) and the cases of a
group are built in parallel; timing never overlaps. On a CPU ``reduce-overhead`` is left out (its CUDA graphs
need a GPU; the code it compiles is ``default``'s), and the numbers only show that the protocol runs.
A case that fails to build is recorded with its error and left out of its group; the others still run.
"""

import argparse
import datetime
import json
import math
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

from benchmarks import harness

MODELS = {  # the input each model is measured on, as benchmarks.step_time's configs
    "resnet": {"image_shape": [28, 28, 1], "dataset": "mnist5k"},
    "resnet18": {"image_shape": [32, 32, 3], "dataset": "synthetic"},
}
DTYPES = ("float32", "bfloat16")
TORCH_MODES = {"eager": "none", "compile default": "default", "compile reduce-overhead": "reduce-overhead"}
REGULARIZERS = {"none": [], "sgdrop": [["regularizer.name", "sgdrop"]], "rsc": [["regularizer.name", "rsc"]]}
SECTIONS = ("check", "steps", "regularizers", "mask_kernels", "end_to_end")
GOALS = {"jax_over_torch_eager": 1.5, "jax_over_torch_compile": 1.0, "regularizer_overhead": 1.05}
TRAIN_STEP_FLOPS_PER_INFERENCE_FLOP = 3  # forward + backward (input and weight gradients) ≈ 3 forwards
JAX_MEMORY_SHARE = 0.5  # of the GPU's memory, split between a group's JAX workers; torch's workers use the rest

# Dense peak throughput in TFLOP/s by the device name that jax (device_kind) and torch (get_device_name) report,
# e.g. "NVIDIA H100 80GB HBM3" (SXM) and "NVIDIA H200". PCIe and NVL boards have lower peaks and are not listed.
PEAKS = (
    (r"\bH100\b(?!.*\b(PCIe|NVL)\b)", "H100 SXM", {"bfloat16": 989.0, "tf32": 494.0, "float32": 67.0}),
    (r"\bH200\b(?!.*\bNVL\b)", "H200 SXM", {"bfloat16": 989.0, "tf32": 494.0, "float32": 67.0}),
)


# ------------------------------------------------------------------------------------------------- arithmetic


def peak_entry(device_name: str | None) -> dict | None:
  """The ``PEAKS`` entry for a device name: {"name", "tflops": {bfloat16, tf32, float32}}; None if unknown."""
  for pattern, name, tflops in PEAKS:
    if device_name and re.search(pattern, device_name, re.IGNORECASE):
      return {"name": name, "tflops": dict(tflops)}
  return None


def peak_basis(dtype: str, *, tf32: bool = True) -> str:
  """Which peak a step in ``dtype`` is measured against: bfloat16, tf32 (float32 with TF32 allowed) or float32."""
  if dtype == "bfloat16":
    return "bfloat16"
  return "tf32" if tf32 else "float32"


def peak_flops(device_name: str | None, dtype: str, *, tf32: bool = True) -> float | None:
  """The device's dense peak in FLOP/s for a step in ``dtype``; None for a device not in ``PEAKS``."""
  entry = peak_entry(device_name)
  return None if entry is None else entry["tflops"][peak_basis(dtype, tf32=tf32)] * 1e12


def mfu(flops_per_image: float | None, batch_size: int, step_seconds: float | None,
        peak: float | None) -> float | None:
  """Model FLOPs utilisation of a train step: 3 × inference FLOPs per image × batch / step time / peak FLOP/s.

  None when any input is unknown (or not positive).
  """
  if not flops_per_image or not step_seconds or not peak or step_seconds <= 0 or peak <= 0:
    return None
  return TRAIN_STEP_FLOPS_PER_INFERENCE_FLOP * flops_per_image * batch_size / step_seconds / peak


def speedup(step_ms: float | None, reference_ms: float | None) -> float | None:
  """How many times faster a step is than the reference (reference time / its time); None if either is missing."""
  if not step_ms or not reference_ms:
    return None
  return reference_ms / step_ms


# --------------------------------------------------------------------------------------------------- cases


def step_cases(model: str, batch_size: int, dtype: str, device: str, torch_modes, warmup: int = 5) -> dict:
  """The worker specs of one steps group: the JAX step and the torch peer in each mode (``warmup`` untimed
  steps each, compilation included)."""
  common = {"model": model, "batch_size": batch_size, "dtype": dtype, **MODELS[model]}
  cases = {"jax": {"kind": "jax_step", "flops": True, "warmup": max(warmup - 1, 0), **common}}  # + compiling
  for mode in torch_modes:
    cases[f"torch {mode}"] = {"kind": "torch_step", "device": device, "channels_last": True,
                              "compile": TORCH_MODES[mode], "warmup": warmup, **common}
  return with_device_env(cases, device)


def regularizer_cases(model: str, batch_size: int, device: str, regularizers) -> dict:
  """The worker specs of one regularizers group: the JAX step plain and with each regularizer, float32."""
  common = {"kind": "jax_step", "model": model, "batch_size": batch_size, "dtype": "float32", **MODELS[model]}
  return with_device_env({f"jax {name}": {**common, "overrides": REGULARIZERS[name]} for name in regularizers},
                         device)


def with_device_env(cases: dict, device: str) -> dict:
  """On a GPU: the JAX workers share ``JAX_MEMORY_SHARE`` of its memory, the torch workers never start JAX on it."""
  if device != "cuda":
    return cases
  n_jax = sum(spec["kind"].startswith("jax") for spec in cases.values())
  out = {}
  for name, spec in cases.items():
    if spec["kind"].startswith("jax"):
      env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{JAX_MEMORY_SHARE / n_jax:.3f}"}
    else:
      env = {"JAX_PLATFORMS": "cpu"}
    out[name] = {**spec, "env": env}
  return out


def run_group(cases: dict, args, log) -> dict:
  """Starts the cases (in parallel on a GPU), times them interleaved; {name: row} with medians or the error."""
  failed = {}
  workers = harness.start(cases, log=log, platform=args.platform, parallel=args.device == "cuda", failed=failed)
  try:
    seconds = harness.interleave(workers, steps=args.steps, repeats=args.rounds, log=log) if workers else {}
  finally:
    harness.close(workers)
  rows = {}
  for name, spec in cases.items():
    if name in failed:
      rows[name] = {"error": failed[name]}
      continue
    values = seconds[name]
    rows[name] = {"step_ms": harness.median_ms(values), "images_per_s": spec["batch_size"] / statistics.median(values),
                  "step_ms_all": [v * 1e3 for v in values], "minor_faults_per_step": workers[name].minor_faults,
                  "info": workers[name].info}
  return rows


def step_ms(rows: dict, name: str) -> float | None:
  return rows.get(name, {}).get("step_ms")


def summarize_steps(model: str, batch_size: int, dtype: str, rows: dict) -> dict:
  """One steps group's record: its cases, the speed ratios and each case's MFU."""
  jax_ms = step_ms(rows, "jax")
  compiled = [ms for ms in (step_ms(rows, "torch compile default"), step_ms(rows, "torch compile reduce-overhead"))
              if ms]
  info = rows.get("jax", {}).get("info", {})
  device_name = device_name_of(rows)
  basis = peak_basis(dtype)
  peak = peak_flops(device_name, dtype)
  flops = info.get("flops_per_image")
  for row in rows.values():
    if "step_ms" in row:
      row["mfu"] = mfu(flops, batch_size, row["step_ms"] / 1e3, peak)
  return {
      "model": model, "batch_size": batch_size, "dtype": dtype, **MODELS[model], "cases": rows,
      "jax_over_torch_eager": speedup(jax_ms, step_ms(rows, "torch eager")),
      "jax_over_torch_compile_default": speedup(jax_ms, step_ms(rows, "torch compile default")),
      "jax_over_torch_compile_reduce_overhead": speedup(jax_ms, step_ms(rows, "torch compile reduce-overhead")),
      "jax_over_torch_compile_best": speedup(jax_ms, min(compiled)) if compiled else None,
      "flops_per_image": flops, "device_name": device_name, "peak_basis": basis, "peak_flops_per_s": peak,
  }


def summarize_regularizers(model: str, batch_size: int, rows: dict) -> dict:
  base = step_ms(rows, "jax none")
  return {"model": model, "batch_size": batch_size, "dtype": "float32", **MODELS[model], "cases": rows,
          "ratio_to_none": {name.removeprefix("jax "): (step_ms(rows, name) / base if base and step_ms(rows, name)
                                                         else None) for name in rows}}


def device_name_of(rows: dict) -> str | None:
  """The device the group ran on, as its workers report it (jax's device_kind, else torch's device name)."""
  for key in ("device_kind", "device_name"):
    for row in rows.values():
      name = row.get("info", {}).get(key)
      if name and name != "cpu":
        return name
  return None


# ------------------------------------------------------------------------------------------- check, bench


def run_check(model: str, args, log) -> dict:
  """The same-maths check for one model on the device (a subprocess, so the GPU is free again afterwards)."""
  shape = MODELS[model]["image_shape"]
  cmd = [sys.executable, "-m", "benchmarks.torch_peer", "--check-only", "--model", model, "--image-shape",
         *map(str, shape), "--device", args.device, "--check-tolerance", str(args.check_tolerance)]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **harness.worker_env(args.platform)}
  log(f"[check] {model} {'x'.join(map(str, shape))} on {args.device}: {' '.join(cmd[1:])}")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(harness.ROOT))
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if not lines:
    return {"model": model, "passed": False, "error": f"exit {proc.returncode}: {proc.stderr[-3000:]}"}
  check = json.loads(lines[-1])["same_step_check"]
  expected_backend = "cpu" if args.device == "cpu" else "gpu"
  if check.get("jax_backend") != expected_backend:
    check["failures"].append(f"JAX ran on {check.get('jax_backend')}, not {expected_backend}")
  return {"model": model, "image_shape": shape, **check, "passed": proc.returncode == 0 and not check["failures"]}


def mask_kernels(args, log) -> dict:
  """``benchmarks.mask_kernels`` on the device (a subprocess): its JSON line, or the error."""
  cmd = [sys.executable, "-m", "benchmarks.mask_kernels", "--rounds", str(args.rounds)]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **harness.worker_env(args.platform)}
  log(f"[mask_kernels] {' '.join(cmd[1:])}")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(harness.ROOT))
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
  return json.loads(lines[-1])


def synthetic_npz(path: pathlib.Path, image_shape, n_train: int, seed: int = 0) -> str:
  """Random uint8 images and labels in the package's ``npz:`` format; returns the ``--config.dataset`` value."""
  import numpy as np
  rng = np.random.default_rng(seed)
  np.savez(path, x_train=rng.integers(0, 256, (n_train, *image_shape), dtype=np.uint8),
           y_train=rng.integers(0, 10, n_train).astype(np.int64),
           x_test=rng.integers(0, 256, (256, *image_shape), dtype=np.uint8),
           y_test=rng.integers(0, 10, 256).astype(np.int64))
  return f"npz:{path}"


def end_to_end(model: str, batch_size: int, dtype: str, dataset: str, args, log) -> dict:
  """``overfocus bench`` for one setting, its last stdout line recorded; the end-to-end keys or null."""
  cmd = [sys.executable, "-m", "overfocus_jax", "bench", f"--config.model={model}",
         f"--config.batch_size={batch_size}", f"--config.dtype={dtype}", f"--config.dataset={dataset}",
         f"--steps={args.steps}", f"--repeats={args.bench_repeats}", f"--warmup={args.bench_warmup}"]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **harness.worker_env(args.platform)}
  log(f"[end_to_end] {' '.join(cmd[1:])}")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(harness.ROOT))
  out = {"model": model, "batch_size": batch_size, "dtype": dtype, "dataset": dataset.split(":")[0],
         "command": "overfocus " + " ".join(cmd[3:])}
  lines = proc.stdout.strip().splitlines()
  try:
    bench = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
  except json.JSONDecodeError:
    bench = None
  if bench is None:
    return {**out, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
  return {**out, "bench": bench, "step_ms": bench.get("step_ms"), "images_per_s": bench.get("images_per_s"),
          "end_to_end_images_per_s": bench.get("end_to_end_images_per_s"),
          "end_to_end_step_ms": bench.get("end_to_end_step_ms")}


# ------------------------------------------------------------------------------------------------ reporting


def fmt(value, spec: str = ".2f", missing: str = "—") -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return missing
  return format(value, spec)


def markdown(record: dict) -> str:
  """The record's tables: the check, steps with ratios and MFU, regularizer overhead, mask kernels, end-to-end."""
  lines = []
  for check in record.get("check", []):
    verdict = "passed" if check.get("passed") else "FAILED"
    lines.append(f"Same-maths check, {check['model']}: {verdict} (float32, TF32 off; logits "
                 f"{fmt(check.get('logits_max_abs_diff'), '.1e')}, loss after 2 steps "
                 f"{fmt(check.get('loss_abs_diff_step2'), '.1e')}, parameters "
                 f"{fmt(check.get('params_max_abs_diff_after_2_steps'), '.1e')}; JAX on "
                 f"{check.get('jax_backend', '?')}, torch on {check.get('torch_device', '?')})")
  if lines:
    lines.append("")
  steps = record.get("steps", [])
  if steps:
    modes = [m for m in TORCH_MODES if any(f"torch {m}" in g["cases"] for g in steps)]
    lines.append("| model | input | batch | dtype | JAX img/s | " +
                 " | ".join(f"torch {m} img/s" for m in modes) +
                 f" | JAX / eager (goal ≥ {GOALS['jax_over_torch_eager']}) | JAX / torch.compile, best "
                 f"(goal ≥ {GOALS['jax_over_torch_compile']}) | MFU JAX | MFU torch, best |")
    lines.append("|---" * (9 + len(modes)) + "|")
    for g in steps:
      cases = g["cases"]
      ips = [fmt(cases.get(name, {}).get("images_per_s"), ".0f", "failed" if "error" in cases.get(name, {})
                 else "—") for name in ["jax"] + [f"torch {m}" for m in modes]]
      torch_mfus = [row.get("mfu") for name, row in cases.items() if name.startswith("torch") and row.get("mfu")]
      lines.append(f"| {g['model']} | {'×'.join(map(str, g['image_shape']))} | {g['batch_size']} | {g['dtype']} | "
                   + " | ".join(ips) + f" | **{fmt(g['jax_over_torch_eager'])}** | "
                   f"**{fmt(g['jax_over_torch_compile_best'])}** | "
                   f"{fmt(cases.get('jax', {}).get('mfu'), '.1%')} | {fmt(max(torch_mfus, default=None), '.1%')} |")
    devices = sorted({g["device_name"] for g in steps if g.get("device_name")})
    known = [f"{name}: {peak_entry(name)['name'] if peak_entry(name) else 'unknown, MFU null'}" for name in devices]
    lines += ["", "MFU: 3 × XLA's inference FLOPs per image × batch / step time / the dense peak of the device "
              f"({'; '.join(known) or 'no GPU: MFU null'}), float32 against the TF32 peak."]
  regs = record.get("regularizers", [])
  if regs:
    lines += ["", f"| model | batch | regularizer | JAX step ms | × none (goal ≤ {GOALS['regularizer_overhead']}) |",
              "|---|---|---|---|---|"]
    for g in regs:
      for name, row in g["cases"].items():
        short = name.removeprefix("jax ")
        lines.append(f"| {g['model']} | {g['batch_size']} | {short} | {fmt(row.get('step_ms'), '.2f', 'failed')} "
                     f"| **{fmt(g['ratio_to_none'].get(short), '.3f')}** |")
  kernels = record.get("mask_kernels", {})
  if kernels.get("rows"):
    lines += ["", f"| drop mask B × N ({kernels.get('device_kind')}) | k | top_k ms | threshold ms | threshold / "
              "top_k | auto picks |", "|---|---|---|---|---|---|"]
    for row in kernels["rows"]:
      lines.append(f"| {row['batch']} × {row['size']} | {row['k']} | {row['ms_per_call']['top_k']:.3f} | "
                   f"{row['ms_per_call']['threshold']:.3f} | **{row['threshold_over_top_k']:.2f}** | {row['auto']} |")
  e2e = record.get("end_to_end", [])
  if e2e:
    lines += ["", "| model | batch | dtype | `overfocus bench` step ms | img/s | end_to_end_images_per_s | "
              "end_to_end_step_ms |", "|---|---|---|---|---|---|---|"]
    for row in e2e:
      lines.append(f"| {row['model']} | {row['batch_size']} | {row['dtype']} | "
                   f"{fmt(row.get('step_ms'), '.2f', 'failed')} | {fmt(row.get('images_per_s'), '.0f')} | "
                   f"{fmt(row.get('end_to_end_images_per_s'), '.0f', 'null')} | "
                   f"{fmt(row.get('end_to_end_step_ms'), '.2f', 'null')} |")
  return "\n".join(lines)


def gpu_description() -> list[str] | None:
  """``nvidia-smi``'s name, driver and memory of each GPU, or None without one."""
  try:
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  return proc.stdout.strip().splitlines() if proc.returncode == 0 else None


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "gpu.json"))
  parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="where both frameworks run (default: cuda when torch sees a GPU, else cpu)")
  parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
  parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 512])
  parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
  parser.add_argument("--torch-modes", nargs="+", choices=tuple(TORCH_MODES), default=None,
                      help="default: all of them on a GPU; eager and compile default on a CPU")
  parser.add_argument("--regularizers", nargs="+", choices=tuple(r for r in REGULARIZERS if r != "none"),
                      default=[r for r in REGULARIZERS if r != "none"])
  parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
  parser.add_argument("--steps", type=int, default=20, help="steps per timed block (and per overfocus bench repeat)")
  parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, JAX and torch (compilation included)")
  parser.add_argument("--bench-repeats", type=int, default=3, help="overfocus bench --repeats")
  parser.add_argument("--bench-warmup", type=int, default=3, help="overfocus bench --warmup")
  parser.add_argument("--check-tolerance", type=float, default=1e-3,
                      help="largest absolute difference the same-maths check accepts")
  args = parser.parse_args(argv)
  if min(args.rounds, args.steps, args.bench_repeats, *args.batch_sizes) < 1 or args.warmup < 0:
    parser.error("--rounds, --steps, --bench-repeats and batch sizes must be at least 1, --warmup at least 0")
  return parser, args


def main(argv=None) -> int:
  parser, args = parse_args(argv)
  try:
    import torch
  except ImportError:
    parser.error("PyTorch is needed for the peer (not a dependency of overfocus-jax): pip install torch==2.13.0")
  if args.device is None:
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
  if args.device == "cuda" and not torch.cuda.is_available():
    parser.error("--device cuda: torch sees no CUDA device (a CPU build of torch, or no GPU)")
  args.platform = "cuda,cpu" if args.device == "cuda" else "cpu"
  if args.torch_modes is None:
    args.torch_modes = list(TORCH_MODES) if args.device == "cuda" else ["eager", "compile default"]
  log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

  record = {"command": "python -m benchmarks.gpu_protocol " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": harness.machine(), "gpus": gpu_description(), "versions": harness.versions(),
            "device": args.device, "goals": GOALS,
            "settings": {k: getattr(args, k) for k in ("models", "batch_sizes", "dtypes", "torch_modes",
                                                        "regularizers", "sections", "rounds", "steps", "warmup",
                                                        "bench_repeats", "bench_warmup", "check_tolerance")}}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)

  def save():
    record["load_average_now"] = [round(x, 2) for x in os.getloadavg()]
    out.write_text(json.dumps(record, indent=2) + "\n")

  if "check" in args.sections:
    record["check"] = [run_check(model, args, log) for model in args.models]
    save()
    failed = [c for c in record["check"] if not c["passed"]]
    if failed:
      print(markdown(record))
      for c in failed:
        log(f"same-maths check FAILED for {c['model']}: {c.get('error') or '; '.join(c.get('failures', []))}")
      log(f"nothing timed; the record is in {out}")
      return 1
  if "steps" in args.sections:
    record["steps"] = []
    for model in args.models:
      for batch_size in args.batch_sizes:
        for dtype in args.dtypes:
          log(f"[steps] {model} batch {batch_size} {dtype}")
          rows = run_group(step_cases(model, batch_size, dtype, args.device, args.torch_modes, args.warmup),
                           args, log)
          record["steps"].append(summarize_steps(model, batch_size, dtype, rows))
          save()
  if "regularizers" in args.sections:
    record["regularizers"] = []
    for model in args.models:
      batch_size = min(args.batch_sizes)
      log(f"[regularizers] {model} batch {batch_size}")
      rows = run_group(regularizer_cases(model, batch_size, args.device, ["none", *args.regularizers]), args, log)
      record["regularizers"].append(summarize_regularizers(model, batch_size, rows))
      save()
  if "mask_kernels" in args.sections:
    record["mask_kernels"] = mask_kernels(args, log)
    save()
  if "end_to_end" in args.sections:
    record["end_to_end"] = []
    with tempfile.TemporaryDirectory() as tmp:
      for model in args.models:
        for batch_size in args.batch_sizes:
          dataset = MODELS[model]["dataset"]
          if dataset == "synthetic":  # the package reads it from a file like any user's data
            dataset = synthetic_npz(pathlib.Path(tmp) / f"{model}_{batch_size}.npz", MODELS[model]["image_shape"],
                                    n_train=max(2048, 8 * batch_size))
          for dtype in args.dtypes:
            record["end_to_end"].append(end_to_end(model, batch_size, dtype, dataset, args, log))
            save()
  save()
  print(markdown(record))
  print(f"\n{args.device} ({record['gpus'] or record['machine'].get('cpu_model')}); results in {out}")
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
