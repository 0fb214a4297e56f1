r"""Which XLA:CPU flags route a convolution to a kernel library, and how fast each makes it.

    python -m benchmarks.library_flags            # → a markdown table and one JSON line; ~2 min on 2 cores

The package's CPU step is slower than PyTorch's because of its convolutions (BENCHMARKS.md, "Where the JAX step's
time goes"): XLA:CPU runs them with YNNPACK on one core or, with the package's platform tuning, with Eigen on
every core, while PyTorch calls oneDNN. jaxlib 0.10.2 knows more library flags than the two measured there
(``xla_cpu_experimental_{ynn,xnn,onednn}_fusion_type``, ``xla_cpu_use_xnnpack``, ``xla_cpu_use_onednn``,
``xla_cpu_experimental_xnn_graph_fusion_mode``). For each flag set, in its own process (``XLA_FLAGS`` is read
once, when JAX starts), this compiles a 3×3 convolution at batch 128, 28×28×32 → 32 (the default model's largest
layer) and its forward + both gradients, reads off the compiled HLO what runs each convolution — a plain
``convolution`` instruction (Eigen) or a library fusion/custom call (``ynn``, ``xnn``, ``onednn``) — and times both
(median of ``--repeats`` calls after one warm-up). It also times the weight gradient alone, as XLA writes it and as
one matrix product of the image patches (im2col, ``lax.conv_general_dilated_patches``) with the output gradient —
the form a oneDNN matrix product could take over (the last flag set sends matrix products to oneDNN). The last row
is the package's own way to oneDNN's convolutions (``overfocus_jax/onednn.py``): the same three
products through its FFI kernels, timed the same way.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

EIGEN = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
ONEDNN_ROW = "the package's oneDNN kernels (overfocus_jax.onednn, through XLA's FFI)"
FLAG_SETS = {
    "xla default (YNNPACK convolutions)": "",
    "Eigen convolutions (the package's tuning)": EIGEN,
    "+ onednn_fusion_type=individual_convolution": EIGEN + " --xla_cpu_experimental_onednn_fusion_type=individual_convolution",
    "+ use_onednn + onednn_fusion_type=individual_convolution": (
        EIGEN + " --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=individual_convolution"),
    "+ use_xnnpack + xnn_fusion_type=individual_convolution": (
        EIGEN + " --xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=individual_convolution"),
    "+ use_xnnpack + xnn graph fusion greedy": (
        EIGEN + " --xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    "+ use_onednn + onednn_fusion_type=dot (matrix products to oneDNN)": (
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot,-dot"
        " --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,individual_dot"),
    ONEDNN_ROW: EIGEN,
}


def convolution_kernels(hlo_text: str) -> list:
  """What runs each convolution in compiled HLO: 'eigen' for a plain instruction, else the library whose fusion
  or custom call holds it ('ynn', 'xnn', 'onednn')."""
  library_of_computation, convolutions_in, current = {}, [], None
  for line in hlo_text.splitlines():
    header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      continue
    fusion = re.search(r"%(ynn|xnn|onednn)\w*\s*=.*calls=%([\w.\-]+)", line)
    if fusion:
      library_of_computation[fusion.group(2)] = fusion.group(1)
    if "custom-call(" in line and "convolution" in line.lower():
      convolutions_in.append(("custom:" + line.split("custom_call_target=")[-1].split(",")[0].strip('"'), None))
    elif re.search(r"\bconvolution\(", line):
      convolutions_in.append(("conv", current))
  return [kind if kind != "conv" else library_of_computation.get(computation, "eigen")
          for kind, computation in convolutions_in]


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def weight_gradient(x, g, convolution=conv):
  """∂L/∂W of a 3×3 SAME ``convolution`` for output gradient g (with XLA's, a convolution over the batch)."""
  w = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype)
  return jax.vjp(lambda w: convolution(x, w), w)[1](g)[0]


def weight_gradient_as_matmul(x, g):
  """The same ∂L/∂W as one matrix product: patches[b,h,w, c·9 + k] = x_pad[b, h+kh, w+kw, c] (im2col), then
  ∂L/∂W[k, c, o] = Σ_{b,h,w} patches[b,h,w, c·9 + k] · g[b,h,w,o]."""
  patches = jax.lax.conv_general_dilated_patches(x, (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  product = jax.lax.dot_general(patches.reshape(-1, patches.shape[-1]), g.reshape(-1, g.shape[-1]),
                                (((0,), (0,)), ((), ())))
  return product.reshape(x.shape[-1], 3, 3, g.shape[-1]).transpose(1, 2, 0, 3)


def onednn_conv(x, w):
  from overfocus_jax import onednn
  if not onednn.available():
    raise SystemExit(f"the oneDNN kernels are not available: {onednn.status()}")
  return onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)))


def median_ms(fn, args, repeats: int) -> float:
  """Median milliseconds of ``fn(*args)`` over ``repeats`` calls after one warm-up (compilation) call."""
  jax.block_until_ready(fn(*args))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
  return round(statistics.median(seconds) * 1e3, 2)


def measure(repeats: int, with_onednn: bool = False) -> dict:
  x = jax.random.normal(jax.random.PRNGKey(0), (128, 28, 28, 32))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 32, 32)) * 0.1
  convolution = onednn_conv if with_onednn else conv
  forward = jax.jit(convolution)
  gradients = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(convolution(x, w) ** 2), argnums=(0, 1)))
  as_xla = jax.jit(lambda x, g: weight_gradient(x, g, convolution))
  as_matmul = jax.jit(weight_gradient_as_matmul)
  g = jax.random.normal(jax.random.PRNGKey(2), (128, 28, 28, 32))
  result = {"weight_gradient_forms_agree": bool(jnp.allclose(as_xla(x, g), as_matmul(x, g), rtol=1e-3, atol=1e-1))}
  result["weight_gradient_ms"] = median_ms(as_xla, (x, g), repeats)
  result["weight_gradient_as_matmul_ms"] = median_ms(as_matmul, (x, g), repeats)
  for name, fn in (("forward", forward), ("forward_and_gradients", gradients)):
    text = fn.lower(x, w).compile().as_text()
    result[name + "_kernels"] = sorted(set(convolution_kernels(text) + (["onednn (FFI)"] * ("Onednn" in text))))
    result[name + "_ms"] = median_ms(fn, (x, w), repeats)
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--child-onednn", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(measure(args.repeats, args.child_onednn)))
    return 0
  rows = {}
  for name, flags in FLAG_SETS.items():
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.library_flags", "--child", "--repeats",
                           str(args.repeats)] + ["--child-onednn"] * (name == ONEDNN_ROW), env=env,
                          capture_output=True, text=True)
    if done.returncode == 0:
      rows[name] = {"xla_flags": flags, **json.loads(done.stdout.strip().splitlines()[-1])}
    else:
      rows[name] = {"xla_flags": flags, "error": (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]}
  print("| flags | convolutions run by | forward ms | forward + gradients ms | weight gradient ms | as one matmul ms |")
  print("|---|---|---|---|---|---|")
  for name, row in rows.items():
    if "error" in row:
      print(f"| {name} | failed: {row['error']} | | | | |")
    else:
      print(f"| {name} | {', '.join(row['forward_and_gradients_kernels'])} | {row['forward_ms']} | "
            f"{row['forward_and_gradients_ms']} | {row['weight_gradient_ms']} | {row['weight_gradient_as_matmul_ms']} |")
  print(json.dumps({"command": "python -m benchmarks.library_flags", "repeats": args.repeats, "rows": rows}))
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
