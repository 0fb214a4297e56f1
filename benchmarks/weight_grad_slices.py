r"""When does summing a convolution's weight gradient over batch slices beat XLA's single call on this CPU?

    python benchmarks/weight_grad_slices.py        # → benchmarks/results/weight_grad_slices.json + table (~3 min)

For the convolution layer shapes of the two residual CNNs (the default model at batch 128 on 28×28×1 and on the
8×8 digits, ResNet-18 at batch 64 on 32×32×3 and at batch 128 on the digits), time dL/dW of a 3×3 (or 1×1)
convolution

    dW[i, j, c, o] = Σ_b Σ_{h,w} x_pad[b, s·h + i, s·w + j, c] · g[b, h, w, o]

computed by XLA's own transpose rule (one convolution whose window is the whole map) and as the same sum over n
batch slices (``overfocus_jax.models.conv.sliced_kernel_grad``), n = 2 … 32. Everything is compiled with the
package's CPU compiler options (``overfocus_jax.parallel.compiler_options``: Eigen convolutions), in one process;
each time is the median of 7 blocks of 3 calls. This table is what the package's rule for slicing
(``conv.slice_count``) was read from.
"""

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import jax  # noqa: E402

from overfocus_jax import parallel  # noqa: E402
from overfocus_jax.models import conv  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
# (batch, H, W, C_in, C_out, kernel, stride) of the two models' convolutions (1×1 projections: two of them)
LAYERS = {
    "resnet": [(128, 28, 28, 1, 16, 3, 1), (128, 28, 28, 16, 32, 3, 1), (128, 28, 28, 16, 32, 1, 1),
               (128, 28, 28, 32, 32, 3, 1), (128, 28, 28, 32, 64, 3, 2), (128, 28, 28, 32, 64, 1, 2),
               (128, 14, 14, 64, 64, 3, 1), (128, 14, 14, 64, 128, 3, 2), (128, 7, 7, 128, 128, 3, 1)],
    "resnet_digits": [(128, 8, 8, 16, 32, 3, 1), (128, 8, 8, 32, 32, 3, 1), (128, 8, 8, 32, 64, 3, 2),
                      (128, 4, 4, 64, 64, 3, 1)],
    "resnet18_digits": [(128, 8, 8, 64, 64, 3, 1), (128, 4, 4, 128, 128, 3, 1)],
    "resnet18": [(64, 32, 32, 3, 64, 3, 1), (64, 32, 32, 64, 64, 3, 1), (64, 32, 32, 64, 128, 3, 2),
                 (64, 16, 16, 128, 128, 3, 1), (64, 16, 16, 128, 256, 3, 2), (64, 8, 8, 256, 256, 3, 1),
                 (64, 8, 8, 256, 512, 3, 2), (64, 4, 4, 512, 512, 3, 1)],
}
SLICES = (1, 2, 4, 8, 16, 32)


def time_ms(fn, *args, blocks=7, calls=3) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(blocks):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return 1e3 * statistics.median(times)


def layer_row(layer, options) -> dict:
  batch, h, w, c_in, c_out, k, s = layer
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, h, w, c_in))
  kernel_shape = (k, k, c_in, c_out)
  strides, pads = (s, s), conv.same_pads((h, w), (k, k), (s, s))
  ho, wo = -(-h // s), -(-w // s)
  g = jax.random.normal(jax.random.PRNGKey(1), (batch, ho, wo, c_out))
  row = {"layer": list(layer), "ms": {}}
  for n in SLICES:
    if batch % n:
      continue
    fn = jax.jit(lambda x, g, n=n: conv.sliced_kernel_grad(x, g, kernel_shape, strides, pads, n),
                 compiler_options=options)
    row["ms"][n] = time_ms(fn, x, g)
  row["package_slices"] = conv.slice_count(batch, h, w, c_in, c_out)
  return row


def markdown(rows) -> str:
  head = "| model | batch, H×W, C_in → C_out, kernel, stride | " + " | ".join(
      "XLA (1)" if n == 1 else f"{n} slices" for n in SLICES) + " | package uses |"
  lines = [head, "|" + "---|" * (len(SLICES) + 3)]
  for model, model_rows in rows.items():
    for row in model_rows:
      b, h, w, ci, co, k, s = row["layer"]
      base = row["ms"][1]
      cells = [f"{row['ms'][n]:.1f}" + ("" if n == 1 else f" ({base / row['ms'][n]:.2f}×)") if n in row["ms"]
               else "—" for n in SLICES]
      lines.append(f"| {model} | {b}, {h}×{w}, {ci} → {co}, {k}×{k}, {s} | " + " | ".join(cells) +
                   f" | {row['package_slices']} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=list(LAYERS), choices=list(LAYERS))
  parser.add_argument("--out", default=str(HERE / "results" / "weight_grad_slices.json"))
  args = parser.parse_args()
  options = parallel.compiler_options(parallel.make_mesh(jax.devices()[:1]))
  info = {"command": "python benchmarks/weight_grad_slices.py", "date": datetime.date.today().isoformat(),
          "machine": harness.machine(), "versions": harness.versions(), "compiler_options": options,
          "unit": "ms per weight-gradient call (median of 7 blocks of 3)"}
  rows = {}
  for model in args.models:
    rows[model] = []
    for layer in LAYERS[model]:
      rows[model].append(layer_row(layer, options))
      print(json.dumps({"model": model, **rows[model][-1]}), flush=True)
  info["rows"] = rows
  info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
  pathlib.Path(args.out).write_text(json.dumps(info, indent=1) + "\n")
  print(markdown(rows))


if __name__ == "__main__":
  main()
