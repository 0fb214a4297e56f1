"""benchmarks/gpu_protocol.py and the harness around it, without a GPU: the MFU arithmetic and the peak table, the
tables rendered from a hand-made record, the end-to-end keys recorded or null, the worker environments (no
JAX_PLATFORMS unless asked; the CPU scripts ask), and — where torch is installed — the torch peer on the CPU.

Nothing here times anything or starts JAX; the whole file runs in seconds.
"""

import json
import subprocess
import types

import pytest

from benchmarks import gpu_protocol as gp
from benchmarks import harness

H100 = "NVIDIA H100 80GB HBM3"  # what jax's device_kind and torch.cuda.get_device_name report for an H100 SXM


# ------------------------------------------------------------------------------------------ peaks and MFU


@pytest.mark.parametrize("name, entry", [
    (H100, "H100 SXM"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H100 PCIe", None),   # other boards, other peaks: not in the table
    ("NVIDIA H100 NVL", None),
    ("NVIDIA H200 NVL", None),
    ("NVIDIA A100-SXM4-80GB", None),
    ("cpu", None),
    (None, None),
])
def test_peak_table_is_keyed_on_the_device_name(name, entry):
  found = gp.peak_entry(name)
  assert (found and found["name"]) == entry


def test_peak_flops_per_dtype():
  assert gp.peak_flops(H100, "bfloat16") == 989e12
  assert gp.peak_flops(H100, "float32") == 494e12            # float32 steps may use TF32: that peak
  assert gp.peak_flops(H100, "float32", tf32=False) == 67e12
  assert gp.peak_flops("NVIDIA H200", "bfloat16") == 989e12
  assert gp.peak_flops("Tesla T4", "bfloat16") is None


def test_mfu_is_three_forwards_per_train_step_over_the_peak():
  # 1 GFLOP per image forward → 3 GFLOP per image trained; 100 images in 10 ms = 30 TFLOP/s; of 1 PFLOP/s: 3%.
  assert gp.mfu(1e9, 100, 0.01, 1e15) == pytest.approx(0.03)
  # ResNet-18 as XLA counts it (≈ 1.11 GFLOP/image), batch 512 in 20 ms on an H100 in bf16.
  assert gp.mfu(1.11e9, 512, 0.020, gp.peak_flops(H100, "bfloat16")) == pytest.approx(3 * 1.11e9 * 512 / 0.02 / 989e12)
  for missing in [(None, 8, 0.1, 1e12), (1e9, 8, None, 1e12), (1e9, 8, 0.1, None), (1e9, 8, 0.0, 1e12)]:
    assert gp.mfu(*missing) is None


def test_speedup_is_the_reference_time_over_the_time():
  assert gp.speedup(10.0, 15.0) == 1.5   # JAX 10 ms vs torch 15 ms: JAX is 1.5× as fast
  assert gp.speedup(None, 15.0) is None and gp.speedup(10.0, None) is None


# -------------------------------------------------------------------------------------- records and tables


def _row(ms, batch, **info):
  return {"step_ms": ms, "images_per_s": batch / ms * 1e3, "step_ms_all": [ms], "info": info}


def test_summarize_steps_computes_ratios_and_mfu():
  rows = {"jax": _row(10.0, 512, device_kind=H100, flops_per_image=1e9),
          "torch eager": _row(20.0, 512, device_name=H100),
          "torch compile default": _row(12.5, 512, device_name=H100),
          "torch compile reduce-overhead": {"error": "worker died"}}
  g = gp.summarize_steps("resnet18", 512, "bfloat16", rows)
  assert g["jax_over_torch_eager"] == 2.0
  assert g["jax_over_torch_compile_default"] == 1.25
  assert g["jax_over_torch_compile_reduce_overhead"] is None
  assert g["jax_over_torch_compile_best"] == 1.25
  assert g["image_shape"] == [32, 32, 3] and g["peak_basis"] == "bfloat16"
  assert rows["jax"]["mfu"] == pytest.approx(3 * 1e9 * 512 / 0.010 / 989e12)
  assert "mfu" not in rows["torch compile reduce-overhead"]


def test_summarize_steps_without_a_known_device_reports_null_mfu():
  rows = {"jax": _row(10.0, 8, device_kind="cpu", flops_per_image=6e7), "torch eager": _row(40.0, 8)}
  g = gp.summarize_steps("resnet", 8, "float32", rows)
  assert g["device_name"] is None and g["peak_flops_per_s"] is None and rows["jax"]["mfu"] is None
  assert g["jax_over_torch_eager"] == 4.0 and g["jax_over_torch_compile_best"] is None


def _record():
  steps = gp.summarize_steps("resnet18", 128, "float32", {
      "jax": _row(4.0, 128, device_kind=H100, flops_per_image=1.1e9),
      "torch eager": _row(8.0, 128, device_name=H100),
      "torch compile default": _row(5.0, 128, device_name=H100),
      "torch compile reduce-overhead": {"error": "boom"}})
  regs = gp.summarize_regularizers("resnet", 128, {"jax none": _row(2.0, 128), "jax sgdrop": _row(2.08, 128),
                                                   "jax rsc": {"error": "boom"}})
  return {
      "check": [{"model": "resnet18", "passed": True, "logits_max_abs_diff": 1.5e-6, "loss_abs_diff_step2": 1.5e-5,
                 "params_max_abs_diff_after_2_steps": 1.6e-4, "jax_backend": "gpu", "torch_device": "cuda"}],
      "steps": [steps], "regularizers": [regs],
      "end_to_end": [{"model": "resnet", "batch_size": 128, "dtype": "float32", "step_ms": 2.5, "images_per_s": 51200,
                      "end_to_end_images_per_s": None, "end_to_end_step_ms": None},
                     {"model": "resnet", "batch_size": 512, "dtype": "float32", "error": "exit 1"}],
  }


def test_markdown_renders_every_section():
  text = gp.markdown(_record())
  assert "Same-maths check, resnet18: passed" in text and "1.6e-04" in text
  header = next(line for line in text.splitlines() if line.startswith("| model | input"))
  row = next(line for line in text.splitlines() if line.startswith("| resnet18 | 32×32×3 | 128 | float32"))
  rule = text.splitlines()[text.splitlines().index(header) + 1]
  assert header.count("|") == row.count("|") == rule.count("|")  # a well-formed table
  assert "torch compile reduce-overhead img/s" in header
  assert "| 32000 | 16000 | 25600 | failed | **2.00** | **1.25** |" in row
  mfu_jax = 3 * 1.1e9 * 128 / 0.004 / 494e12  # float32 against the TF32 peak
  assert f"{mfu_jax:.1%}" in row
  assert "H100 SXM" in text
  assert "| resnet | 128 | sgdrop | 2.08 | **1.040** |" in text
  assert "| resnet | 128 | rsc | failed | **—** |" in text
  assert "| resnet | 128 | float32 | 2.50 | 51200 | null | null |" in text
  assert "| resnet | 512 | float32 | failed |" in text


def test_markdown_of_an_empty_record_is_empty():
  assert gp.markdown({}) == ""


# ------------------------------------------------------------------------------------ check and bench runs


def _fake_run(monkeypatch, stdout, returncode=0, stderr=""):
  calls = []

  def run(cmd, **kwargs):
    calls.append((cmd, kwargs))
    return subprocess.CompletedProcess(cmd, returncode, stdout=stdout, stderr=stderr)

  monkeypatch.setattr(gp.subprocess, "run", run)
  return calls


def _args(**fields):
  base = dict(device="cpu", platform="cpu", steps=2, bench_repeats=1, bench_warmup=0, check_tolerance=1e-3)
  return types.SimpleNamespace(**{**base, **fields})


@pytest.mark.parametrize("extra, expected", [
    ({}, (None, None)),  # an `overfocus bench` without the end-to-end keys: recorded as null
    ({"end_to_end_images_per_s": 900.0, "end_to_end_step_ms": 9.5}, (900.0, 9.5)),
])
def test_end_to_end_records_the_bench_json_and_its_end_to_end_keys(monkeypatch, extra, expected):
  bench = {"step_ms": 8.0, "images_per_s": 1000.0, **extra}
  calls = _fake_run(monkeypatch, "compiling...\n" + json.dumps(bench) + "\n")
  out = gp.end_to_end("resnet", 8, "bfloat16", "mnist5k", _args(), log=lambda *a: None)
  assert out["bench"] == bench and out["images_per_s"] == 1000.0
  assert (out["end_to_end_images_per_s"], out["end_to_end_step_ms"]) == expected
  cmd, kwargs = calls[0]
  assert cmd[1:4] == ["-m", "overfocus_jax", "bench"]
  assert {"--config.model=resnet", "--config.batch_size=8", "--config.dtype=bfloat16",
          "--config.dataset=mnist5k", "--steps=2"} <= set(cmd)
  assert kwargs["env"]["JAX_PLATFORMS"] == "cpu"


def test_end_to_end_failure_is_recorded_not_raised(monkeypatch):
  _fake_run(monkeypatch, "", returncode=2, stderr="overfocus: error: something\n")
  out = gp.end_to_end("resnet", 8, "float32", "mnist5k", _args(), log=lambda *a: None)
  assert "bench" not in out and "something" in out["error"]


def test_check_fails_on_differences_and_on_the_wrong_backend(monkeypatch):
  check = {"logits_max_abs_diff": 1e-7, "loss_abs_diff_step2": 0.0, "params_max_abs_diff_after_2_steps": 1e-7,
           "jax_backend": "cpu", "torch_device": "cuda:0", "failures": []}
  _fake_run(monkeypatch, json.dumps({"same_step_check": check}) + "\n")
  result = gp.run_check("resnet", _args(device="cuda", platform="cuda"), log=lambda *a: None)
  assert not result["passed"] and "JAX ran on cpu, not gpu" in result["failures"]
  _fake_run(monkeypatch, json.dumps({"same_step_check": {**check, "failures": []}}) + "\n")
  assert gp.run_check("resnet", _args(), log=lambda *a: None)["passed"]
  _fake_run(monkeypatch, json.dumps({"same_step_check": {**check, "failures": ["loss 1 > 0.001"]}}) + "\n",
            returncode=1)
  assert not gp.run_check("resnet", _args(), log=lambda *a: None)["passed"]
  _fake_run(monkeypatch, "", returncode=1, stderr="Traceback ...")
  assert "Traceback" in gp.run_check("resnet", _args(), log=lambda *a: None)["error"]


def test_synthetic_npz_is_a_dataset_the_package_reads(tmp_path):
  from overfocus_jax.data import sources
  spec = gp.synthetic_npz(tmp_path / "x.npz", [32, 32, 3], n_train=64)
  dataset = sources.load_dataset(spec)
  assert tuple(dataset.image_shape) == (32, 32, 3) and dataset.num_classes == 10 and len(dataset.train) == 64


def test_parse_args_defaults_cover_the_whole_protocol():
  _, args = gp.parse_args([])
  assert args.models == ["resnet", "resnet18"] and args.batch_sizes == [128, 512]
  assert args.dtypes == ["float32", "bfloat16"] and args.sections == list(gp.SECTIONS)
  with pytest.raises(SystemExit):
    gp.parse_args(["--steps", "0"])


# ----------------------------------------------------------------------------------------- environments


def test_case_specs_and_their_environments():
  cpu = gp.step_cases("resnet18", 128, "bfloat16", "cpu", ["eager", "compile default"], warmup=4)
  assert set(cpu) == {"jax", "torch eager", "torch compile default"}
  assert all("env" not in spec for spec in cpu.values())
  # Both sides get ``warmup`` untimed steps: JAX's compiling step and warmup − 1 more.
  assert cpu["jax"] == {"kind": "jax_step", "flops": True, "model": "resnet18", "batch_size": 128, "warmup": 3,
                        "dtype": "bfloat16", "image_shape": [32, 32, 3], "dataset": "synthetic"}
  assert cpu["torch compile default"]["compile"] == "default" and cpu["torch eager"]["compile"] == "none"
  assert cpu["torch eager"]["channels_last"] and cpu["torch eager"]["warmup"] == 4
  gpu = gp.step_cases("resnet", 512, "float32", "cuda", list(gp.TORCH_MODES))
  assert gpu["jax"]["env"] == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.500"}
  assert all(gpu[f"torch {m}"]["env"] == {"JAX_PLATFORMS": "cpu"} and gpu[f"torch {m}"]["device"] == "cuda"
             for m in gp.TORCH_MODES)
  regs = gp.regularizer_cases("resnet", 128, "cuda", ["none", "sgdrop", "rsc"])
  assert regs["jax rsc"]["overrides"] == [["regularizer.name", "rsc"]]
  assert all(spec["env"] == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.167"} for spec in regs.values())


class _FakePopen:
  """Stands in for a worker process that builds its case at once."""

  instances = []

  def __init__(self, cmd, *, env, **kwargs):
    self.cmd, self.env = cmd, env
    self.stdin = types.SimpleNamespace(write=lambda text: None, flush=lambda: None, close=lambda: None)
    self.stdout = types.SimpleNamespace(readline=lambda: '@@{"ready": true, "info": {}}\n')
    _FakePopen.instances.append(self)

  def poll(self):
    return 0


def test_harness_sets_jax_platforms_only_when_asked(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(harness.subprocess, "Popen", _FakePopen)
  _FakePopen.instances.clear()
  harness.start({"a": {"kind": "jax_step"}}, log=lambda *a: None)
  harness.start({"b": {"kind": "jax_step"}}, log=lambda *a: None, platform="cpu", parallel=True)
  harness.start({"c": {"kind": "jax_step", "env": {"JAX_PLATFORMS": "cuda"}}}, log=lambda *a: None, platform="cpu")
  a, b, c = _FakePopen.instances
  assert "JAX_PLATFORMS" not in a.env
  assert b.env["JAX_PLATFORMS"] == "cpu"
  assert c.env["JAX_PLATFORMS"] == "cuda"  # a case's own env wins
  assert harness.worker_env(None) == {} and harness.worker_env("cpu") == {"JAX_PLATFORMS": "cpu"}


def test_harness_leaves_out_cases_that_fail_to_build_when_asked(monkeypatch):
  replies = iter(['@@{"ready": true, "info": {"n": 1}}\n', '@@{"error": "ValueError: no"}\n'])

  class Popen(_FakePopen):
    def __init__(self, cmd, **kwargs):
      super().__init__(cmd, **kwargs)
      reply = next(replies)
      self.stdout = types.SimpleNamespace(readline=lambda: reply)

  monkeypatch.setattr(harness.subprocess, "Popen", Popen)
  failed = {}
  workers = harness.start({"ok": {"kind": "x"}, "bad": {"kind": "y"}}, log=lambda *a: None, failed=failed)
  assert list(workers) == ["ok"] and workers["ok"].info == {"n": 1} and "ValueError: no" in failed["bad"]
  replies = iter(['@@{"error": "ValueError: no"}\n'])
  with pytest.raises(RuntimeError, match="ValueError: no"):
    harness.start({"bad": {"kind": "y"}}, log=lambda *a: None)


def test_cpu_benchmarks_ask_for_the_cpu_platform(monkeypatch):
  from benchmarks import profile_cpu, step_time

  class Stop(Exception):
    pass

  seen = []

  def start(cases, **kwargs):
    seen.append(kwargs.get("platform"))
    raise Stop

  monkeypatch.setattr(harness, "start", start)
  with pytest.raises(Stop):
    step_time.main(["--out", "/dev/null"])
  with pytest.raises(Stop):
    profile_cpu.run_section("parts", {}, "x", types.SimpleNamespace(steps=1, repeats=1), log=lambda *a: None)
  assert seen == ["cpu", "cpu"]


# ---------------------------------------------------------------------------------- with torch installed


def test_torch_peer_steps_on_the_cpu_eager_and_autocast():
  torch = pytest.importorskip("torch")
  from benchmarks import torch_peer
  for bf16 in (False, True):
    step = torch_peer.TorchStep("resnet", 4, (28, 28, 1), channels_last=True, device="cpu", bf16_autocast=bf16)
    before = [p.detach().clone() for p in step.model.parameters()]
    loss, accuracy, logits = step()
    assert logits.shape == (4, 10) and torch.isfinite(loss) and 0 <= float(accuracy) <= 1
    assert any(not torch.equal(a, p) for a, p in zip(before, step.model.parameters()))
    assert torch_peer.time_per_step(step, 1) > 0
  with pytest.raises(ValueError, match="compile"):
    torch_peer.TorchStep("resnet", 4, (28, 28, 1), channels_last=False, compile="max-autotune")


def test_torch_peer_check_failures():
  pytest.importorskip("torch")
  from benchmarks import torch_peer
  ok = {"logits_max_abs_diff": 5e-7, "loss_abs_diff_step2": 2e-7, "params_max_abs_diff_after_2_steps": 1e-7}
  assert torch_peer.check_failures(ok) == []
  bad = {**ok, "loss_abs_diff_step2": 0.5, "logits_max_abs_diff": float("nan")}
  failures = torch_peer.check_failures(bad)
  assert len(failures) == 2 and any(f.startswith("loss_abs_diff_step2 = 0.5") for f in failures)


def test_conv_split_slices_compute_the_same_gradients():
  """benchmarks/conv_split.py times the batch cut into independent slices: it must be the same two gradients."""
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import conv_split
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, 5, 5, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
  dx, dw = conv_split.both_gradients(x, w)
  for slices in (2, 4):
    dx_sliced, dw_sliced = conv_split.in_slices(x, w, slices)
    np.testing.assert_allclose(dx_sliced, dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw_sliced, dw, rtol=1e-5, atol=1e-4)


def test_library_flags_reads_which_kernel_runs_each_convolution():
  """benchmarks/library_flags.py tells Eigen's plain convolutions from a library fusion's, and its im2col form of
  the weight gradient is the same ∂L/∂W."""
  import jax
  import numpy as np
  from benchmarks import library_flags
  hlo = "\n".join([
      "%fused_computation (param_0: f32[8,8]) -> f32[8,8] {",
      "  ROOT %c = f32[2,4,4,3]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}, dim_labels=b01f_01io->b01f",
      "}",
      "ENTRY %main.1 (x: f32[2,4,4,3], w: f32[3,3,3,3]) -> f32[2,4,4,3] {",
      "  %ynn_fusion = f32[2,4,4,3]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation",
      "  ROOT %conv.2 = f32[2,4,4,3]{3,2,1,0} convolution(%ynn_fusion, %w), window={size=3x3}, dim_labels=b01f_01io->b01f",
      "}"])
  assert library_flags.convolution_kernels(hlo) == ["ynn", "eigen"]
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
  g = rng.standard_normal((2, 6, 6, 4)).astype(np.float32)
  np.testing.assert_allclose(library_flags.weight_gradient_as_matmul(x, g), library_flags.weight_gradient(x, g),
                             rtol=1e-4, atol=1e-4)
  compiled = jax.jit(library_flags.conv).lower(x, rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
  assert len(library_flags.convolution_kernels(compiled.compile().as_text())) == 1


def test_gpu_protocol_records_the_mask_kernel_benchmark(monkeypatch):
  row = {"batch": 128, "size": 4096, "k": 410, "ms_per_call": {"top_k": 2.0, "threshold": 0.5},
         "threshold_over_top_k": 0.25, "auto": "threshold"}
  line = json.dumps({"backend": "gpu", "device_kind": "NVIDIA H100 80GB HBM3", "rows": [row]})
  calls = []
  monkeypatch.setattr(gp.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)) or
                      subprocess.CompletedProcess(cmd, 0, "compiling\n" + line + "\n", ""))
  args = type("Args", (), {"rounds": 3, "platform": "cuda,cpu"})()
  record = gp.mask_kernels(args, log=lambda *a: None)
  assert calls[0][0][1:] == ["-m", "benchmarks.mask_kernels", "--rounds", "3"]
  assert calls[0][1]["env"]["JAX_PLATFORMS"] == "cuda,cpu" and record["rows"] == [row]
  table = gp.markdown({"mask_kernels": record})
  assert "| 128 × 4096 | 410 | 2.000 | 0.500 | **0.25** | threshold |" in table
  failing = lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "boom")  # noqa: E731
  monkeypatch.setattr(gp.subprocess, "run", failing)
  assert "boom" in gp.mask_kernels(args, log=lambda *a: None)["error"]
