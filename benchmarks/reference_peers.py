r"""The named reference variants against their reference code (the transcriptions in ``tests/test_peers.py``): for
each case, whether the masks are equal entry for entry, and the largest differences of the loss and of the
gradients, with the largest gradient they are read against.

    python -m benchmarks.reference_peers --out benchmarks/results/reference_peers.json     # ~1 min; needs torch

Cases: DomainBed's ``RSC.update`` on its MNIST_CNN (a ColoredMNIST batch of real digits with repeated samples) at
f = b = 1/3 and at fractions its sweep draws; the official RSC's masking of a 7×7 map with constant background
(ties) at epochs 0, 10 and 20 with the coin on each side. The test suite asserts the same cases.
"""

import argparse
import json
import sys

import numpy as np

sys.path.insert(0, "tests")
import test_peers as peers  # noqa: E402  (the transcriptions of the references and the comparisons)

DOMAINBED_CASES = ((1 / 3, 1 / 3), (0.047, 0.25), (0.25, 0.047), (0.5, 0.5), (0.0, 0.0), (0.4183, 0.1237))


def summary(result: dict) -> dict:
  row = {k: result[k] for k in ("variant", "case", "loss_difference", "gradient_difference", "largest_gradient")}
  row["masks_equal"] = all(np.array_equal(ours, theirs) for ours, theirs in result["masks"].values())
  for key in ("torch_float32_error", "our_float32_error"):
    if key in result:
      row[key] = result[key]
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  rows = [summary(peers.compare_domainbed_update(f, b)) for f, b in DOMAINBED_CASES]
  rows += [summary(peers.compare_official_update(epoch, coin)) for epoch in (0, 10, 20) for coin in (2, 7)]
  for row in rows:
    print(json.dumps(row), flush=True)
  print("\n| variant | case | masks equal | loss diff | gradient diff (largest gradient) | float32 vs float64: "
        "PyTorch / ours |")
  print("|---|---|---|---|---|---|")
  for row in rows:
    against = (f"{row['torch_float32_error']:.1e} / {row['our_float32_error']:.1e}" if "our_float32_error" in row
               else "—")
    print(f"| {row['variant']} | {row['case']} | {'yes' if row['masks_equal'] else 'NO'} | "
          f"{row['loss_difference']:.1e} | {row['gradient_difference']:.1e} ({row['largest_gradient']:.2g}) | "
          f"{against} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  main()
