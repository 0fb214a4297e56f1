"""The drop mask's threshold kernel: exactly :func:`masks.top_k_drop_mask`'s mask (count, ties, ±0.0, NaN, k = 0,
k = N − 1, ramped counts, inside jax.jit) and the rule that picks a kernel for SGDrop and RSC (the GPU protocol's
record of the kernels' benchmark is tested in test_benchmarks_protocol.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax.challenge import masks, rsc, sgdrop

N = 37  # odd, not a power of two: the index bisection's top bit covers more than the row
# The cases are (4, N) float32 arrays, so that the (jitted) kernel compiles once for them; its count is an argument.
SPECIALS = np.array([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1.0, -1.0, 1e-45, -1e-45], np.float32)


def THRESHOLD(scores, count: int) -> jax.Array:  # noqa: N802 (the compiled kernel)
  """:func:`masks.threshold_mask`, the count always an int32 argument (one compilation)."""
  return masks.threshold_mask(scores, jnp.int32(count))


def rows(kind: str) -> np.ndarray:
  """Four rows of N float32 scores of one kind."""
  rng = np.random.default_rng(0)
  return {
      "random": rng.normal(size=(4, N)),
      "relu": np.maximum(rng.normal(size=(4, N)), 0.0),                  # attributions: many exact zeros
      "integers": rng.integers(0, 4, (4, N)),                            # many ties of every size
      "negative": -rng.integers(1, 5, (4, N)) - rng.uniform(size=(4, N)).round(1),
      "all_equal": np.full((4, N), 2.5),
      "zeros": np.zeros((4, N)),
      "specials": rng.choice(SPECIALS, (4, N)),                          # ±0.0, ±NaN, ±inf, subnormals
  }[kind].astype(np.float32)


KINDS = ("random", "relu", "integers", "negative", "all_equal", "zeros", "specials")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.5, (N - 1) / N])  # k = 0, 1, 4, 19, N − 1
def test_threshold_kernel_equals_top_k_drop_mask(kind, fraction):
  scores = jnp.asarray(rows(kind))
  expected = masks.top_k_drop_mask(scores, fraction)
  got = masks.threshold_drop_mask(scores, fraction)
  assert got.dtype == expected.dtype
  np.testing.assert_array_equal(got, expected)
  assert np.all(np.sum(np.asarray(got) == 0, axis=1) == masks.drop_count(fraction, N))


def top_k_reference(scores: jax.Array, k: int) -> np.ndarray:
  """0 at the indices lax.top_k returns for k (k = 0: none)."""
  _, dropped = jax.lax.top_k(scores, max(k, 1))
  expected = np.ones(scores.shape, np.float32)
  expected[np.arange(scores.shape[0])[:, None], np.asarray(dropped)[:, :k]] = 0.0
  return expected


def test_threshold_kernel_every_count_traced_inside_jit():
  """One compiled kernel, the count a traced argument: every k from 0 to N on tied rows, each dropping the k first
  entries of a stable descending sort (the specials' order is tested against lax.top_k below)."""
  for kind in ("integers", "all_equal"):
    scores = rows(kind)
    order = np.argsort(-scores, axis=1, kind="stable")
    for k in range(N + 1):
      expected = np.ones((4, N), np.float32)
      expected[np.arange(4)[:, None], order[:, :k]] = 0.0
      np.testing.assert_array_equal(THRESHOLD(scores, k), expected, err_msg=f"{kind} {k=}")


def test_ties_go_to_the_lower_index_and_signed_zeros_and_nans_rank_as_top_k_ranks_them():
  scores = np.full((4, N), -2.0, np.float32)
  scores[0, :5] = [1.0, 5.0, 5.0, 5.0, 0.0]
  np.testing.assert_array_equal(THRESHOLD(scores, 2)[0, :5], [1, 0, 0, 1, 1])  # 2 of three tied fives
  # lax.top_k's order on a CPU is the float total order: NaN > inf > 1 > +0.0 > -0.0 > -inf > -NaN (> -2 fillers
  # is false: -NaN ranks below every number).
  scores[1, :7] = [-0.0, 0.0, -np.nan, 1.0, -np.inf, np.nan, np.inf]
  order = [5, 6, 3, 1, 0]
  for k in range(1, 6):
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(THRESHOLD(scores, k))[1] == 0), sorted(order[:k]))
    np.testing.assert_array_equal(THRESHOLD(scores, k), top_k_reference(jnp.asarray(scores), k), err_msg=f"{k=}")
  assert np.asarray(THRESHOLD(scores, N))[1, 2] == 0 and np.asarray(THRESHOLD(scores, N - 1))[1, 2] == 1  # -NaN last


def test_ramped_threshold_kernel_equals_ramped_top_k_inside_jit():
  scores = jnp.asarray(rows("integers"))
  top_k = jax.jit(lambda s, scale: masks.ramped_top_k_drop_mask(s, 0.5, scale))
  threshold = jax.jit(lambda s, scale: masks.ramped_threshold_drop_mask(s, 0.5, scale))
  for scale in (0.0, 0.25, 0.5, 0.999, 1.0):
    np.testing.assert_array_equal(threshold(scores, scale), top_k(scores, scale), err_msg=f"{scale=}")


def test_bfloat16_scores_use_16_bit_keys_and_keep_their_dtype():
  scores = jnp.asarray(rows("random"), jnp.bfloat16)
  assert jax.eval_shape(masks.order_keys, scores).dtype == jnp.uint16
  got = masks.threshold_drop_mask(scores, 0.3)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got, masks.top_k_drop_mask(scores, 0.3))
  with pytest.raises(TypeError, match="floating-point"):
    jax.eval_shape(masks.order_keys, jnp.arange(3))


def test_no_gradient_flows_through_the_threshold_mask():
  scores = jnp.asarray(rows("random"))
  grad = jax.grad(lambda s: jnp.sum(masks.threshold_drop_mask(s, 0.1) * s))(scores)
  np.testing.assert_array_equal(grad, masks.threshold_drop_mask(scores, 0.1))  # the mask, as a constant


# ------------------------------------------------------------------------------------------------ the rule


def primitives(fn, *args) -> set:
  """The names of the primitives in ``fn``'s jaxpr, nested ones included."""
  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn.primitive.name
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from walk(sub)
  return set(walk(jax.make_jaxpr(fn)(*args).jaxpr))


def test_mask_kernel_rule():
  cpu, other = masks.TOP_K_MAX_K["cpu"], masks.DEFAULT_TOP_K_MAX_K
  assert (cpu, other) == (24, 16)  # measured on the CPU here: top_k at k ≤ 17, threshold from 26; GPU: unmeasured
  assert masks.mask_kernel(cpu, platform="cpu") == "top_k"
  assert masks.mask_kernel(cpu + 1, platform="cpu") == "threshold"
  assert masks.mask_kernel(other, platform="gpu") == "top_k"
  assert masks.mask_kernel(other + 1, platform="gpu") == "threshold"
  assert masks.mask_kernel(628, platform="tpu") == "threshold"
  assert masks.mask_kernel(628, "top_k", platform="cpu") == "top_k"      # an explicit kernel wins
  assert masks.mask_kernel(3, "threshold", platform="gpu") == "threshold"
  with pytest.raises(ValueError, match="unknown mask kernel"):
    masks.mask_kernel(3, "sort")


def test_drop_mask_dispatches_and_both_kernels_agree():
  scores = jnp.asarray(rows("relu"))
  assert "top_k" in primitives(lambda s: masks.drop_mask(s, 0.1), scores)  # k = 4: top_k on every platform
  assert "top_k" not in primitives(lambda s: masks.drop_mask(s, 0.5, "threshold"), scores)
  assert "top_k" not in primitives(lambda s: masks.ramped_drop_mask(s, 0.5, 0.5, "threshold"), scores)
  np.testing.assert_array_equal(masks.drop_mask(scores, 0.5, "threshold"), masks.drop_mask(scores, 0.5, "top_k"))


def test_sgdrop_and_rsc_masks_take_the_threshold_kernel_on_an_accelerator(monkeypatch):
  """With the backend reported as a GPU, the exact-count rule's masks (plain and ramped) and RSC's run no top_k and
  are the CPU's masks exactly."""
  attribution = jnp.asarray(rows("relu")).reshape(4, 1, N, 1)  # N elements, N positions
  grad = jnp.asarray(rows("integers")).reshape(4, 1, 1, N)       # N channels
  cases = {"sgdrop": lambda a: sgdrop.saliency_mask(a, 0.5, "element", rule="topk"),
           "sgdrop ramped": lambda a: sgdrop.saliency_mask(a, 0.5, "spatial", rule="topk", scale=jnp.float32(0.6)),
           "rsc channel": lambda a: rsc.channel_mask(grad, 0.5)}
  on_cpu = {name: fn(attribution) for name, fn in cases.items()}
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for name, fn in cases.items():
    assert "top_k" not in primitives(fn, attribution), name
    np.testing.assert_array_equal(fn(attribution), on_cpu[name], err_msg=name)


# ------------------------------------------------------------------------------------------------ the references' rules


def percentile_rows(kind: str, rng) -> np.ndarray:
  size = int(rng.integers(2, 150))
  if kind == "random":
    return rng.normal(size=(4, size)).astype(np.float32)
  if kind == "ties":
    return rng.integers(0, 4, (4, size)).astype(np.float32)
  if kind == "neighbours":  # consecutive floats: the interpolation rounds onto an end
    return (np.float32(1.0) + rng.integers(-3, 4, (4, size)).astype(np.float32) * np.float32(2 ** -23))
  return (rng.normal(size=(4, size)) * 1e-6 + 1.0).astype(np.float32)


@pytest.mark.parametrize("kind", ["random", "ties", "neighbours", "close"])
def test_below_percentile_is_numpy_s_comparison(kind):
  """``scores < np.percentile(scores, p, axis=-1, keepdims=True)`` as NumPy decides it, at DomainBed's percents
  (1 − f)·100 for f from its sweep's range, with a Python percent (float64 weights) and inside jax.jit."""
  rng = np.random.default_rng(["random", "ties", "neighbours", "close"].index(kind))
  static = jax.jit(masks.below_percentile, static_argnums=1)
  for trial in range(60):
    scores = percentile_rows(kind, rng)
    f = [0.0, 1 / 3, 0.25, 0.5, 0.047][trial % 5] if trial < 10 else float(rng.uniform(0, 0.5))
    percent = (1 - f) * 100
    expected = scores < np.percentile(scores, percent, axis=1, keepdims=True)
    np.testing.assert_array_equal(static(jnp.asarray(scores), percent), expected, err_msg=f"{f=}")
  # A traced percent (float32 arithmetic) on distinct scores agrees too.
  scores = rng.normal(size=(4, 101)).astype(np.float32)
  traced = jax.jit(masks.below_percentile)
  for f in (0.0, 0.25, 1 / 3, 0.5):
    np.testing.assert_array_equal(traced(jnp.asarray(scores), jnp.float32((1 - f) * 100)),
                                  scores < np.percentile(scores, (1 - f) * 100, axis=1, keepdims=True))


def test_above_kth_mask_drops_above_the_next_score_ties_and_all():
  """The official RSC's rule: the entries strictly above the (k + 1)-th largest. Distinct: exactly k. A tie across the
  threshold: fewer, possibly none. k ≥ N: everything. −0.0 and +0.0 compare equal."""
  rows = jnp.array([[5.0, 1.0, 4.0, 2.0, 3.0],     # k = 2: the 5 and the 4
                    [5.0, 4.0, 4.0, 4.0, 1.0],     # the 3rd largest is a 4: only the 5 (fewer than k)
                    [2.0, 2.0, 2.0, 2.0, 2.0],     # all tied: none
                    [0.0, -0.0, 0.0, -0.0, 1.0]])  # ±0 tie: only the 1
  np.testing.assert_array_equal(masks.above_kth_mask(rows, 2), [[0, 1, 0, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1],
                                                                [1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(masks.above_kth_mask(rows, 5), np.zeros((4, 5)))
  traced = jax.jit(masks.above_kth_mask)
  for k in range(6):
    np.testing.assert_array_equal(traced(rows, k), masks.above_kth_mask(rows, k), err_msg=f"{k=}")
