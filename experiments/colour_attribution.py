r"""How much of a ColoredMNIST prediction comes from the colour, and how much from the digit?

    python experiments/colour_attribution.py RUN [RUN ...] [--splits out in] [--steps 16] [--out FILE.jsonl]

Each RUN is a workdir trained on ``colored_mnist`` (``overfocus train`` or a ``dg.sweep`` run). A ColoredMNIST image
is a digit ``d`` (H×W) in one of two channels, ``x = d ⊗ e_c``: the digit's shape carries the label through
``digit < 5`` (75% right, the 25% label noise), its channel ``c`` — the colour — carries it at 90% or 80% in the
training environments and 10% in the −90% one. Both live in the same pixels, so a pixel map cannot tell them apart.
A path through input space can: from black ``0`` to the colour-neutral image ``x̄ = d ⊗ (½, ½)`` (the digit at half
ink in both channels: its shape, no colour), then on to ``x``. With ``m(x)`` the true class's logit margin
(``logit_y − logit_{1−y}``), integrated gradients along each leg (``overfocus_jax.explain.attributions``, the tool
behind ``overfocus explain``; midpoint rule, ``--steps`` 16) give per pixel the evidence each leg adds, and by
completeness their sums are

    R_digit  = Σ IG(0 → x̄)  ≈ m(x̄) − m(0)      the evidence of the digit's shape
    R_colour = Σ IG(x̄ → x)  ≈ m(x) − m(x̄)      the evidence of its colour

(the largest residual of the rule is printed). Per environment and split (by default the out-splits, 20% of each
environment, which no run trains on) the script prints the mean of each — the evidence for the true label, in logit
units — and the colour share of the evidence ``|E R_colour| / (|E R_colour| + |E R_digit|)``: near 1, the network
reads the colour alone (the shortcut); near 0, the digit alone. (The mean magnitudes are printed too: the halfway
image ``x̄``, lit in both channels, is unlike any training image, so per image both legs can be large and of either
sign; what the network consistently draws from each source is the signed mean.) It also prints the accuracy, and
the accuracy with every image's colour flipped (the digit moved to the other channel): a network that reads the
digit keeps it.

The same question asked of the tools the two overfocusing regularizers rank features with — how much of their
relevance mass falls on the colour (the relevance-mass measure of a known shortcut):

* **At the input, SGDrop's rule** ``ReLU(g ⊙ x)`` (``g = ∂m/∂x``, of the true class's margin) in a colour-opponent
  basis, where colour and shape are separate coordinates: per pixel, ``x = u·(1,1)/√2 + v·(1,−1)/√2`` (``u`` the luminance: the digit's
  ink, the same in either colour; ``v`` the opponent: its sign is the colour), and ``g`` likewise, so
  ``g·x = g_u u + g_v v``. The colour's relevance is ``Σ_pixels ReLU(g_v v)``, the digit's ``Σ ReLU(g_u u)``; the
  column is the colour's share of their sum over an environment's images (``input_colour_mass``).
* **In the latent, the regularizers' own tools**: each latent unit's colour dependence ``s = |z − z'| / (|z| +
  |z'|)`` ∈ [0, 1], with ``z'`` the unit's value on the colour-flipped image (0: the unit fires the same for either
  colour — it reads the digit; 1: it fires for one colour only), weighted by the tool's relevance:
  ``Σ A·s / Σ A`` with SGDrop's attribution ``A = ReLU(∂ψ_y/∂z ⊙ z)`` on the model's latent map
  (``sgdrop_colour_mass``), and with RSC's ranking score ``ReLU(∂ψ_y/∂f)`` on the pooled features ``f`` it drops
  from, DomainBed's RSC (``rsc_colour_mass``; the official RSC's channel score is the same gradient's spatial mean).
  ``unit_colour_dependence`` is the plain mean of ``s`` over the latent map, the share to compare with: a tool that
  ignores the colour puts on it no more than that.
"""

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from overfocus_jax.challenge.attribution import class_score_gradient, class_score_vjp, gradient_times_activation
from overfocus_jax.data import environments
from overfocus_jax.explain.attributions import integrated_gradients
from overfocus_jax.train import workdir as workdir_lib

BATCH = 250


def margins(logits: jax.Array) -> jax.Array:
  """Two-class logits (B, 2) → each class's margin over the other, (B, 2): IG of column y is IG of m."""
  difference = logits[:, 0] - logits[:, 1]
  return jnp.stack([difference, -difference], axis=1)


def colour_neutral(images: jax.Array) -> jax.Array:
  """``d ⊗ e_c`` → ``d ⊗ (½, ½)``: the digit at half ink in both channels (the shape without its colour)."""
  return jnp.broadcast_to(images.sum(-1, keepdims=True) / 2, images.shape)


def colour_flipped(images: jax.Array) -> jax.Array:
  """``d ⊗ e_c`` → ``d ⊗ e_{1−c}``: the same digit in the other colour."""
  return images[..., ::-1]


def path_evidence(margin_fn, images: jax.Array, labels: jax.Array, steps: int) -> dict[str, jax.Array]:
  """Per image: R_digit, R_colour (sums of integrated gradients along 0 → x̄ → x) and the margins at 0, x̄, x."""
  neutral = colour_neutral(images)
  digit = integrated_gradients(margin_fn, neutral, labels, steps=steps).sum((1, 2, 3))
  colour = integrated_gradients(margin_fn, images, labels, baseline=neutral, steps=steps).sum((1, 2, 3))
  pick = lambda x: jnp.take_along_axis(margin_fn(x), labels[:, None], axis=1)[:, 0]
  return {"digit": digit, "colour": colour, "m_black": pick(jnp.zeros_like(images)), "m_neutral": pick(neutral),
          "m_image": pick(images), "m_flipped": pick(colour_flipped(images))}


def opponent(images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two-channel images → per pixel (luminance, opponent) coordinates ``((x0 + x1)/√2, (x0 − x1)/√2)``."""
  return (images[..., 0] + images[..., 1]) / np.sqrt(2), (images[..., 0] - images[..., 1]) / np.sqrt(2)


def input_relevance(logit_fn, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per image, SGDrop's ``ReLU(g ⊙ x)`` at the input summed over the colour coordinate and the luminance one."""
  _, grad = class_score_vjp(logit_fn, images, lambda logits: labels)
  (g_lum, g_col), (x_lum, x_col) = opponent(grad), opponent(images)
  return jax.nn.relu(g_col * x_col).sum((1, 2)), jax.nn.relu(g_lum * x_lum).sum((1, 2))


def colour_dependence(z: jax.Array, z_flipped: jax.Array) -> jax.Array:
  """Per unit, ``|z − z'| / (|z| + |z'|)`` ∈ [0, 1]; 0 where both are 0 (a unit that never fires reads nothing)."""
  total = jnp.abs(z) + jnp.abs(z_flipped)
  return jnp.where(total > 0, jnp.abs(z - z_flipped) / jnp.where(total > 0, total, 1.0), 0.0)


def colour_bound_relevance(relevance: jax.Array, dependence: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per image, ``(Σ relevance·dependence, Σ relevance)`` over its units: their ratio is the colour's share."""
  axes = tuple(range(1, relevance.ndim))
  return (relevance * dependence).sum(axes), relevance.sum(axes)


def tool_relevance(model, variables, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Per image, the sums behind ``input_colour_mass``, ``sgdrop_colour_mass``, ``rsc_colour_mass`` and
  ``unit_colour_dependence`` (those a model's splits allow)."""
  flipped = colour_flipped(images)
  out = {}
  # At the input on the margin, as the path evidence: a two-class softmax depends on nothing else.
  out["input_colour"], out["input_digit"] = input_relevance(
      lambda x: margins(model.apply(variables, x, train=False)[0]), images, labels)
  if model.supports_split("latent"):
    encode, classify = model.split("latent")
    z, z_flipped = encode(variables, images)[0], encode(variables, flipped)[0]
    attribution = gradient_times_activation(lambda latent: classify(variables, latent)[0], z, labels)
    dependence = colour_dependence(z, z_flipped)
    out["sgdrop_colour"], out["sgdrop_total"] = colour_bound_relevance(attribution, dependence)
    out["units_colour"], out["units_total"] = colour_bound_relevance(jnp.ones_like(dependence), dependence)
  if model.supports_split("pooled"):
    embed, classify = model.split("pooled")
    f, f_flipped = embed(variables, images)[0], embed(variables, flipped)[0]
    _, grad = class_score_gradient(lambda pooled: classify(variables, pooled)[0], f, labels)
    out["rsc_colour"], out["rsc_total"] = colour_bound_relevance(jax.nn.relu(grad), colour_dependence(f, f_flipped))
  return out


def share(numerator: np.ndarray, denominator: np.ndarray) -> float | None:
  """``Σ numerator / Σ denominator`` over an environment's images (None without any relevance)."""
  total = float(np.sum(denominator))
  return float(np.sum(numerator)) / total if total > 0 else None


def measure(run, rows_by_split, steps: int) -> dict:
  """The evidence of every image of one environment's in- and out-split (normalised as the run's input)."""
  exp, state = run.exp, run.state
  mean, std = np.asarray(exp.dataset.mean, np.float32), np.asarray(exp.dataset.std, np.float32)
  if np.any(mean != 0) or np.any(std != 1):  # the path's points (0, x̄) are pixel images: keep pixels = inputs
    raise SystemExit(f"{run.workdir}: expects colored_mnist's unnormalised input (pixel / 255)")
  # The variables are an argument, not constants of the program (XLA would fold every weight into it).
  margin_fn = lambda variables: lambda x: margins(exp.model.apply(variables, x, train=False)[0])
  evidence = jax.jit(lambda variables, x, y: {**path_evidence(margin_fn(variables), x, y, steps),
                                                **tool_relevance(exp.model, variables, x, y)})
  result = {}
  for split, (images, labels) in rows_by_split.items():
    parts = [jax.device_get(evidence(state.variables, jnp.asarray(images[i:i + BATCH], jnp.float32) / 255.0,
                                     jnp.asarray(labels[i:i + BATCH], jnp.int32)))
             for i in range(0, len(labels), BATCH)]
    e = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    tools = {"input_colour_mass": share(e["input_colour"], e["input_colour"] + e["input_digit"])}
    for name, key in (("sgdrop_colour_mass", "sgdrop"), ("rsc_colour_mass", "rsc"), ("unit_colour_dependence", "units")):
      if f"{key}_total" in e:
        tools[name] = share(e[f"{key}_colour"], e[f"{key}_total"])
    colour, digit = float(np.mean(e["colour"])), float(np.mean(e["digit"]))
    result[split] = {
        "n": int(len(labels)),
        "accuracy": float(np.mean(e["m_image"] > 0)),
        "accuracy_colour_flipped": float(np.mean(e["m_flipped"] > 0)),
        "colour_share": abs(colour) / max(abs(colour) + abs(digit), 1e-12),
        "mean_colour_evidence": colour,
        "mean_digit_evidence": digit,
        "mean_abs_colour_evidence": float(np.mean(np.abs(e["colour"]))),
        "mean_abs_digit_evidence": float(np.mean(np.abs(e["digit"]))),
        "max_completeness_residual": float(np.max(np.abs(e["colour"] + e["digit"] - (e["m_image"] - e["m_black"])))),
        **tools,
    }
  return result


def describe(run) -> dict:
  config = run.config
  return {"workdir": str(run.workdir), "step": run.step, "dataset": config.dataset,
          "objective": config.objective.name, "regularizer": config.regularizer.name,
          "test_envs": list(config.environments.test_envs)}


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("runs", nargs="+", help="workdirs trained on colored_mnist")
  parser.add_argument("--splits", nargs="+", choices=("in", "out"), default=["out"],
                      help="each environment's splits to measure (default: out)")
  parser.add_argument("--steps", type=int, default=16, help="integrated gradients' steps per leg (default 16)")
  parser.add_argument("--out", type=pathlib.Path, help="append one JSON line per run here")
  args = parser.parse_args()
  for workdir in args.runs:
    run = workdir_lib.load_trained(workdir)
    if not str(run.config.dataset).startswith(environments.COLORED):
      raise SystemExit(f"{workdir}: trained on {run.config.dataset!r}, not colored_mnist")
    record = describe(run)
    dataset = run.exp.dataset
    for index, name in enumerate(dataset.domain_names):
      arrays = dict(zip(("in", "out"), environment_split_arrays(dataset, index)))
      record[f"env{index}"] = {"name": name, **measure(run, {s: arrays[s] for s in args.splits}, args.steps)}
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
      with args.out.open("a") as f:
        f.write(line + "\n")
  return 0


def environment_split_arrays(dataset, index: int):
  """Environment ``index``'s (in, out) arrays, from the run's view (its splits by environment) or the whole set."""
  splits = dict(dataset.environment_splits) if dataset.environment_splits else None
  if splits is None:
    return environments.environment_arrays(dataset, index)
  return tuple((s.images, s.labels) for s in (splits[f"env{index}_in"], splits[f"env{index}_out"]))


if __name__ == "__main__":
  from overfocus_jax.host_memory import retain_host_memory
  retain_host_memory()  # before JAX computes: a CPU run keeps its per-step memory mapped
  sys.exit(main())
