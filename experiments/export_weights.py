"""A trained run's weights as a PyTorch state dict in a ``.safetensors`` file, what ``--config.init_from`` reads.

    python experiments/export_weights.py RUN OUT.safetensors [--layout torchvision|timm]

RUN is the workdir of an ``overfocus train`` run of ``resnet18_tv``, ``resnet50_tv`` (torchvision's tensor names,
also timm's) or ``convnext`` (timm's); its latest checkpoint is written (``weights.save_safetensors``). Another run
then starts from it as from torchvision's or timm's own weights (``--config.init_from=OUT.safetensors``; the head is
re-initialised when the class count differs), and PyTorch reads it with ``safetensors.torch.load_file``.
"""

import argparse
import sys

from overfocus_jax.errors import UserError
from overfocus_jax.models import weights
from overfocus_jax.train import workdir as workdir_lib


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("run", help="the workdir of a trained run")
  parser.add_argument("out", help="the .safetensors file to write")
  parser.add_argument("--layout", choices=weights.LAYOUTS, help="default: torchvision, timm for convnext")
  args = parser.parse_args(argv)
  try:
    run = workdir_lib.load_trained(args.run)
    layout = args.layout or ("timm" if run.config.model == "convnext" else "torchvision")
    state = weights.save_safetensors(run.exp.model, run.state.variables, args.out, layout)
  except UserError as e:
    print(f"export_weights: error: {e}", file=sys.stderr)
    return 2
  print(f"{args.out}: {len(state)} tensors of {run.config.model} at step {run.step} ({layout} names)")
  return 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
