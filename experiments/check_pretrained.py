r"""Our resnet18_tv / resnet50_tv / vgg16 / convnext against torchvision's (and timm's) resnet18 / resnet50 / vgg16 /
vgg16_bn and timm's convnext_atto … convnext_tiny: the same weights through a .safetensors file, the same logits.

    pip install torch==2.13.0 torchvision==0.28.0 timm  # CPU wheels; not dependencies of the package
    python experiments/check_pretrained.py               # 224×224×3, batch 2, 1,000 classes, float32, CPU; timm too if
                                                         # it is installed (--libraries torchvision timm transcription)
    python experiments/check_pretrained.py --libraries transcription   # torch alone: torchvision's networks written
                                                         # out in experiments/torch_references.py

For each model and library it builds the library's network with random weights (no pretrained ones offline), puts its
batch norms away from the identity (random weight and bias; running mean and variance measured on random images, so
that a mix-up of any of them shows and the logits have a trained network's scale) and likewise ConvNeXt's LayerNorms
and layer scales (γ at 0.05–0.2, not timm's 1e-6, so that every block counts), saves ``state_dict()`` with
``safetensors.torch.save_file``, loads that file into ours (``models/weights.py``: ``--config.init_from_layout`` =
the library, the ImageNet stem) and compares eval-mode logits on the same random input (NCHW for torch, NHWC for us):
the largest absolute difference must be at most 1e-4. It also checks the parameter counts, and that the one-line
conversion of a pickled ``.pth`` (``weights.CONVERSION``, run in a subprocess) gives a file that loads.

Result (torch 2.13.0+cpu, torchvision 0.28.0, timm 1.0.31, jax 0.10.2, a shared 2-core CPU, float32; 5 min):

    model           library      params (peer)  params (ours)  input        max |logit|  max |Δ logit|
    resnet18_tv     torchvision     11,689,512     11,689,512  2×224×224×3        1.645       1.91e-06
    resnet18_tv     timm            11,689,512     11,689,512  2×224×224×3        1.645       1.91e-06
    resnet50_tv     torchvision     25,557,032     25,557,032  2×224×224×3        1.952       2.50e-05
    resnet50_tv     timm            25,557,032     25,557,032  2×224×224×3        1.952       2.50e-05
    vgg16           torchvision    138,357,544    138,357,544  2×224×224×3        0.269       3.28e-07
    vgg16_bn        torchvision    138,365,992    138,365,992  2×224×224×3        1.495       1.23e-05
    convnext_atto   timm             3,695,520      3,695,520  2×224×224×3        1.259       8.94e-07
    convnext_femto  timm             5,217,784      5,217,784  2×224×224×3        1.565       8.20e-07
    convnext_pico   timm             9,045,672      9,045,672  2×224×224×3        1.462       1.31e-06
    convnext_nano   timm            15,593,560     15,593,560  2×224×224×3        2.002       1.64e-06
    convnext_tiny   timm            28,589,128     28,589,128  2×224×224×3        2.068       1.97e-06
    conversion line (.pth → .safetensors → resnet18_tv): max |Δ logit| 2.86e-06

(float32 rounding: the ResNets' and VGGs' differences move within the 1e-6–1e-5 range between versions of the
libraries.)
(timm's plain resnet18/resnet50 have torchvision's tensor names and, from the same seed, its weights. The torchvision
wheel at hand offline was a CUDA build whose C ops do not load with CPU torch: its pure-Python models were imported
without them.)
"""

import argparse
import importlib.util
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np

from overfocus_jax import config as config_lib
from overfocus_jax.models import build_model, parameter_count, weights

TOLERANCE = 1e-4
# Checked name → (our model and its config fields, the peer's name in each library that has it). timm's plain
# resnet18/resnet50 share torchvision's names; its VGGs do not (a conv "pre_logits" head), so those are torchvision's.
PEERS = {
    "resnet18_tv": (("resnet18_tv", {"resnet_tv.stem": "imagenet"}),
                    {"torchvision": "resnet18", "timm": "resnet18", "transcription": "resnet18"}),
    "resnet50_tv": (("resnet50_tv", {"resnet_tv.stem": "imagenet"}),
                    {"torchvision": "resnet50", "timm": "resnet50", "transcription": "resnet50"}),
    "vgg16": (("vgg16", {"vgg.head": "classic", "vgg.batch_norm": "False", "vgg.max_pools": "5"}),
              {"torchvision": "vgg16", "transcription": "vgg16"}),
    "vgg16_bn": (("vgg16", {"vgg.head": "classic", "vgg.batch_norm": "True", "vgg.max_pools": "5"}),
                 {"torchvision": "vgg16_bn", "transcription": "vgg16_bn"}),
    # timm's ConvNeXts (torchvision has only convnext_tiny and up, in another layout that we do not read).
    **{f"convnext_{size}": (("convnext", {"convnext.size": size, "convnext.stem": "imagenet"}),
                            {"timm": f"convnext_{size}"})
       for size in ("atto", "femto", "pico", "nano", "tiny")},
}
# "transcription": torchvision's networks written out in plain PyTorch (experiments/torch_references.py), in its
# layout, for where torchvision is not installed.
LIBRARIES = ("torchvision", "timm", "transcription")
LAYOUTS = {"torchvision": "torchvision", "timm": "timm", "transcription": "torchvision"}


def transcription(name: str, num_classes: int):
  spec = importlib.util.spec_from_file_location("torch_references", pathlib.Path(__file__).with_name(
      "torch_references.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.NETWORKS[name](num_classes)


def peer_net(name: str, library: str, num_classes: int, seed: int, size: int = 224):
  """``library``'s network for our ``name``, eval mode: random weights, each batch norm's weight and bias random and
  its running statistics measured on random ``size``×``size`` images (so the logits have a trained network's scale,
  not the blow-up of random statistics)."""
  import torch
  torch.manual_seed(seed)
  peer = PEERS[name][1][library]
  if library == "timm":
    import timm
    net = timm.create_model(peer, pretrained=False, num_classes=num_classes)
  elif library == "transcription":
    net = transcription(peer, num_classes)
  else:
    from torchvision import models
    net = getattr(models, peer)(weights=None, num_classes=num_classes)
  with torch.no_grad():
    # ConvNeXt: layer scales γ at timm's 1e-6 would hide every block; its LayerNorms (timm's LayerNorm2d in the stem
    # and the downsamplings too) away from the identity, like the batch norms below.
    for param_name, param in net.named_parameters():
      if param_name.endswith("gamma"):
        param.uniform_(0.05, 0.2)
    for norm in (module for module in net.modules() if isinstance(module, torch.nn.LayerNorm)):
      norm.weight.uniform_(0.5, 1.5)
      norm.bias.normal_(0.0, 0.1)
    for norm in (module for module in net.modules() if isinstance(module, torch.nn.BatchNorm2d)):
      norm.weight.uniform_(0.5, 1.5)
      norm.bias.normal_(0.0, 0.1)
      norm.reset_running_stats()
      norm.momentum = None  # a cumulative average over the calibration batches
    net.train()
    for _ in range(2):
      net(torch.randn(4, 3, size, size))
  return net.eval()


def load_ours(name: str, path: pathlib.Path, layout: str, num_classes: int, input_shape: tuple[int, ...]):
  """``(model, variables)``: our model for the checked ``name`` (ImageNet stem, classic VGG head) with ``path``'s
  weights in ``layout``."""
  model_name, fields = PEERS[name][0]
  model = build_model(config_lib.build_config(None, [("model", model_name), *fields.items()]), num_classes)
  # Shapes are all the mapping needs when every tensor comes from the file (the head too): nothing to initialise.
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), input_shape))
  return model, weights.load_pretrained(model, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes), path, layout)


def max_difference(net, model, variables, x: np.ndarray) -> tuple[float, float]:
  """``(max |logit| of the peer, max |Δ logit|)`` on NHWC images ``x``."""
  import torch
  with torch.no_grad():
    expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x)[0])(variables, x))
  return float(np.abs(expected).max()), float(np.abs(logits - expected).max())


def compare(name: str, directory: pathlib.Path, *, library: str = "torchvision", size: int = 224, batch: int = 2,
            num_classes: int = 1000, seed: int = 0) -> dict:
  """Saves ``library``'s ``name`` to ``directory``, loads it into ours, and compares the logits."""
  from safetensors.torch import save_file
  net = peer_net(name, library, num_classes, seed, size)
  path = directory / f"{library}_{PEERS[name][1][library]}.safetensors"
  save_file(net.state_dict(), str(path))
  model, variables = load_ours(name, path, LAYOUTS[library], num_classes, (size, size, 3))
  x = np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)
  largest, difference = max_difference(net, model, variables, x)
  return {"model": name, "library": library, "peer_params": sum(p.numel() for p in net.parameters()),
          "params": parameter_count(variables["params"]), "input": f"{batch}×{size}×{size}×3",
          "max_abs_logit": largest, "max_abs_diff": difference}


def check_conversion(directory: pathlib.Path, *, size: int = 64, seed: int = 1, library: str = "torchvision") -> float:
  """``torch.save`` torchvision's resnet18 state dict (``library``'s) as ``.pth``, convert it with
  :data:`weights.CONVERSION`, load the ``.safetensors`` file: the logits' largest difference."""
  import torch
  net = peer_net("resnet18_tv", library, 10, seed, size)
  torch.save(net.state_dict(), directory / "converted.pth")
  command = weights.CONVERSION.replace("W.", "converted.").removeprefix('python -c "').removesuffix('"')
  subprocess.run([sys.executable, "-c", command], cwd=directory, check=True)
  model, variables = load_ours("resnet18_tv", directory / "converted.safetensors", "torchvision", 10,
                               (size, size, 3))
  x = np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)
  return max_difference(net, model, variables, x)[1]


def available(library: str) -> bool:
  try:
    if library == "transcription":
      return importlib.util.find_spec("torch") is not None
    if library == "timm":
      return importlib.util.find_spec("timm") is not None and available("torchvision")
    from torchvision import models  # noqa: F401
    return True
  except ImportError:
    return False


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", default=list(PEERS), choices=tuple(PEERS))
  parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=2)
  args = parser.parse_args(argv)
  libraries = [library for library in args.libraries if available(library)]
  if not libraries:
    print("check_pretrained: needs torch (see the docstring); nothing checked", file=sys.stderr)
    return 2
  failures = 0
  print(f"{'model':15} {'library':11} {'params (peer)':>14} {'params (ours)':>14}  {'input':12} {'max |logit|':>11}  "
        f"{'max |Δ logit|':>13}")
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models:
      for library in (library for library in libraries if library in PEERS[name][1]):
        row = compare(name, pathlib.Path(tmp), library=library, size=args.size, batch=args.batch)
        print(f"{row['model']:15} {library:11} {row['peer_params']:>14,} {row['params']:>14,}  {row['input']:12} "
              f"{row['max_abs_logit']:>11.3f}  {row['max_abs_diff']:>13.2e}", flush=True)
        failures += row["max_abs_diff"] > TOLERANCE or row["params"] != row["peer_params"]
    converted = check_conversion(pathlib.Path(tmp), library=libraries[0] if "torchvision" not in libraries
                                 else "torchvision")
    print(f"conversion line (.pth → .safetensors → resnet18_tv): max |Δ logit| {converted:.2e}")
    failures += converted > TOLERANCE
  skipped = sorted(set(args.libraries) - set(libraries))
  print(("OK" if not failures else f"FAILED: {failures} check(s) above the tolerance {TOLERANCE:g}")
        + (f" ({', '.join(skipped)} not installed: not checked)" if skipped else ""))
  return 1 if failures else 0


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
