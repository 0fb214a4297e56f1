"""Tests for overfocus_jax.models.weights (pretrained weights from .safetensors, ``config.init_from``): the round trip
through torchvision's names, the head re-initialised on another class count, every bad file as one line (in the
library and through the CLI, nothing written to the workdir), a run starting from the file, a resumed run ignoring it,
``freeze_backbone``, and — with torch installed — the logits of torchvision's own networks."""

import importlib.util
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

from overfocus_jax import optimization
from overfocus_jax.errors import UserError
from overfocus_jax.models import resnet_tv, weights
from overfocus_jax.train import checkpoint as checkpoint_lib

from conftest import REPO_ROOT, assert_one_line_error, run_cli
from test_resnet_tv import make_config, make_model, numpy_variables

DIGITS = (8, 8, 1)
RUN_ARGS = ("--config.model=resnet18_tv", "--config.dataset=digits", "--config.num_epochs=1",
            "--config.batch_size=1024", "--no-progress")  # one step an epoch


def write(path, variables, *, extra=None, drop=()):
  """``variables`` as a torchvision state dict in a .safetensors file, with ``num_batches_tracked`` as torchvision
  writes it, ``extra`` tensors added and the names in ``drop`` left out."""
  state = resnet_tv.to_torchvision(variables)
  state.update({name.replace("running_var", "num_batches_tracked"): np.array(7, np.int64)
                for name in list(state) if name.endswith("running_var")})
  state.update(extra or {})
  save_file({k: v for k, v in state.items() if k not in drop}, str(path))
  return path


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory):
  """An image folder (``imagefolder:DIR:8``, written by experiments/make_imagefolder.py as the README's fine-tuning
  example does) of 6 training and 2 test digits per class: a run of resnet18_tv is then one step of 60 and one
  evaluation batch (its compute on all 1,438 digits took longer than its compilation)."""
  from overfocus_jax.data.sources import load_dataset
  digits = load_dataset("digits")
  make_imagefolder = load_check_script("make_imagefolder")
  root = tmp_path_factory.mktemp("few_digits")
  for split, per_class in (("train", 6), ("test", 2)):
    make_imagefolder.write_split(getattr(digits, split), root / split, range(10), per_class)
  return ("--config.model=resnet18_tv", f"--config.dataset=imagefolder:{root}:8", "--config.num_epochs=1",
          "--config.batch_size=60", "--config.eval_batch_size=20", "--no-progress")


@pytest.fixture(scope="module")
def digits_model():
  """resnet18_tv (CIFAR stem) for digits, and two different sets of its variables: the file's and the fresh ones."""
  model = make_model("resnet18_tv", 10)
  return model, numpy_variables(model, DIGITS, seed=0), numpy_variables(model, DIGITS, seed=1)


# ----------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize("name, input_shape", [("resnet18_tv", DIGITS), ("resnet50_tv", (8, 8, 3))])
def test_round_trip_through_torchvisions_names(tmp_path, name, input_shape):
  model = make_model(name, 10)
  saved, fresh = numpy_variables(model, input_shape, seed=0), numpy_variables(model, input_shape, seed=1)
  loaded = weights.load_pretrained(model, jax.device_get(fresh), write(tmp_path / "w.safetensors", saved),
                                   "torchvision")
  chex.assert_trees_all_equal(loaded, jax.device_get(saved))
  state = resnet_tv.to_torchvision(saved)
  kernel = np.asarray(saved["params"]["encoder"]["conv1"]["kernel"])  # (kh, kw, in, out) → (out, in, kh, kw)
  np.testing.assert_array_equal(state["conv1.weight"], kernel.transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(state["fc.weight"], np.asarray(saved["params"]["head"]["fc"]["kernel"]).T)
  np.testing.assert_array_equal(state["bn1.running_var"], saved["batch_stats"]["encoder"]["bn1"]["var"])
  if name == "resnet18_tv":  # the same outputs
    x = jax.random.normal(jax.random.PRNGKey(0), (2, *input_shape))
    chex.assert_trees_all_equal(model.apply(loaded, x)[0], model.apply(saved, x)[0])
  # timm's plain ResNets use torchvision's names.
  chex.assert_trees_all_equal(resnet_tv.from_timm(state, jax.device_get(fresh)), jax.device_get(saved))


def test_half_precision_files_load_as_float32(tmp_path, digits_model):
  import ml_dtypes
  model, saved, fresh = digits_model
  for dtype in (np.float16, ml_dtypes.bfloat16):
    state = {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in resnet_tv.to_torchvision(saved).items()}
    save_file(state, str(tmp_path / "half.safetensors"))
    loaded = weights.load_pretrained(model, jax.device_get(fresh), tmp_path / "half.safetensors", "torchvision")
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {np.dtype(np.float32)}
    expected = jax.tree.map(lambda a: np.asarray(a).astype(dtype).astype(np.float32), jax.device_get(saved))
    chex.assert_trees_all_equal(loaded, expected)


def test_the_head_is_reinitialised_for_another_class_count(tmp_path, digits_model, capsys):
  model, saved, _ = digits_model
  seven = make_model("resnet18_tv", 7)
  fresh = jax.device_get(numpy_variables(seven, DIGITS, seed=1))
  capsys.readouterr()
  loaded = weights.load_pretrained(seven, fresh, write(tmp_path / "w.safetensors", saved), "torchvision")
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["overfocus: init_from: the file's fc has 10 classes, the model 7: fc is re-initialised"]
  chex.assert_trees_all_equal(loaded["params"]["head"], fresh["params"]["head"])
  chex.assert_trees_all_equal(loaded["params"]["encoder"], jax.device_get(saved["params"]["encoder"]))
  chex.assert_trees_all_equal(loaded["batch_stats"], jax.device_get(saved["batch_stats"]))
  # A backbone without its classifier (timm's num_classes=0) loads too.
  headless = write(tmp_path / "headless.safetensors", saved, drop=("fc.weight", "fc.bias"))
  loaded = weights.load_pretrained(seven, fresh, headless, "torchvision")
  assert "the file has no fc: fc is re-initialised" in capsys.readouterr().err
  chex.assert_trees_all_equal(loaded["params"]["head"], fresh["params"]["head"])


def bad_files(tmp_path, saved):
  """(file, fragments of the one-line error) for each way a file can be wrong."""
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
  pickle = tmp_path / "W.pth"
  pickle.write_bytes(b"\x80\x04not really a pickle")
  three = make_model("resnet18_tv", 10)
  return [
      (pickle, ["init_from", "W.pth", "never unpickled", "safetensors.torch", "weights_only=True", "W.safetensors"]),
      (tmp_path / "nowhere.safetensors", ["init_from", "nowhere.safetensors", "not found"]),
      (garbage, ["garbage.safetensors", "not a readable safetensors file"]),
      (write(tmp_path / "rgb.safetensors", numpy_variables(three, (8, 8, 3))),
       ["does not fit model 'resnet18_tv' (torchvision layout)", "expected 'conv1.weight' of shape (64, 1, 3, 3), "
        "found (64, 3, 3, 3)"]),
      (write(tmp_path / "renamed.safetensors", saved, drop=("layer2.0.conv1.weight",),
             extra={"layer2.0.conv0.weight": np.zeros((128, 64, 3, 3), np.float32)}),
       ["expected 'layer2.0.conv1.weight' of shape (128, 64, 3, 3), found no such tensor",
        "unmatched tensors begin ['layer2.0.conv0.weight']"]),
      (write(tmp_path / "extra.safetensors", saved, extra={"fc2.weight": np.zeros((3, 4), np.float32)}),
       ["found 'fc2.weight' of shape (3, 4), which the model has no place for"]),
  ]


def test_every_bad_file_is_one_user_error(tmp_path, digits_model):
  model, saved, fresh = digits_model
  for path, fragments in bad_files(tmp_path, saved):
    with pytest.raises(UserError) as error:
      weights.load_pretrained(model, jax.device_get(fresh), path, "torchvision")
    message = str(error.value)
    assert "\n" not in message and all(f in message for f in fragments), (message, fragments)
  with pytest.raises(UserError, match="model 'resnet' has no mapping for torchvision-layout weights"):
    weights.load_pretrained(make_model("resnet"), {}, tmp_path / "nowhere.safetensors", "torchvision")
  assert weights.layouts_of(model) == ("torchvision", "timm") and weights.layouts_of(make_model("resnet")) == ()


def test_the_conversion_command_is_the_documented_one():
  assert weights.CONVERSION in (REPO_ROOT / "docs" / "guide" / "models.md").read_text()
  assert "weights_only=True" in weights.CONVERSION and "safetensors.torch" in weights.CONVERSION


def test_every_bad_file_through_the_cli_is_one_line_and_writes_nothing(tmp_path, digits_model, capsys):
  _, saved, _ = digits_model
  cases = [(path, fragments, "resnet18_tv") for path, fragments in bad_files(tmp_path, saved)]
  cases.append((tmp_path / "rgb.safetensors", ["model 'resnet' has no mapping for torchvision-layout"], "resnet"))
  for i, (path, fragments, model) in enumerate(cases):
    workdir = tmp_path / f"wd{i}"
    code, out, err = run_cli(capsys, "train", "--workdir", workdir, *RUN_ARGS, f"--config.model={model}",
                             f"--config.init_from={path}")
    assert_one_line_error(code, err, *fragments)
    assert out == "" and list(workdir.iterdir()) == [], (path, list(workdir.iterdir()))


# ----------------------------------------------------------------------------- runs


def test_a_new_run_starts_from_the_file(tmp_path, digits_model):
  from overfocus_jax.train import experiment
  _, saved, _ = digits_model
  path = write(tmp_path / "w.safetensors", saved)
  config = make_config("resnet18_tv", init_from=str(path))
  state = experiment.build_experiment(config, pretrained=True).state
  chex.assert_trees_all_equal(jax.device_get(state.variables), jax.device_get(saved))
  # The optimizer's state is made from them: SGD's momentum has their structure (a resumed run: the slow test below).
  chex.assert_trees_all_equal_structs(state.opt_state[1][0].trace, saved["params"])
  assert not checkpoint_lib.has_checkpoint(tmp_path / "none") and not (tmp_path / "none").exists()


def test_freeze_backbone_updates_the_head_only():
  config = make_config("resnet18_tv", freeze_backbone=True, weight_decay=0.1)
  tx = optimization.make_optimizer(config, optax.constant_schedule(0.1))
  params = {"encoder": {"conv": jnp.ones((3, 3))}, "head": {"fc": {"kernel": jnp.ones((2, 2))}}}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_array_equal(updates["encoder"]["conv"], 0)  # no gradient step and no weight decay
  assert np.all(np.asarray(updates["head"]["fc"]["kernel"]) < 0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_backbone_lr_scale_is_a_param_group_at_a_fraction_of_the_learning_rate(optimizer):
  """Encoder at learning_rate × 0.25, head at the full rate: the encoder's parameters follow the same optimizer run
  at a quarter of the rate (momentum, moments and weight decay included), the head's the full one's."""
  grads = [{"encoder": {"conv": jax.random.normal(jax.random.PRNGKey(i), (3, 3))},
            "head": {"fc": jax.random.normal(jax.random.PRNGKey(100 + i), (2, 2))}} for i in range(4)]

  def train(learning_rate, **fields):
    config = make_config("resnet18_tv", optimizer=optimizer, weight_decay=0.01, **fields)
    tx = optimization.make_optimizer(config, optax.constant_schedule(learning_rate))
    params = {"encoder": {"conv": jnp.ones((3, 3))}, "head": {"fc": jnp.ones((2, 2))}}
    opt_state = tx.init(params)
    for grad in grads:
      updates, opt_state = tx.update(grad, opt_state, params)
      params = optax.apply_updates(params, updates)
    return params

  grouped, full, quarter = train(0.1, backbone_lr_scale=0.25), train(0.1), train(0.025)
  np.testing.assert_allclose(grouped["encoder"]["conv"], quarter["encoder"]["conv"], rtol=1e-6)
  np.testing.assert_allclose(grouped["head"]["fc"], full["head"]["fc"], rtol=1e-6)
  assert not np.allclose(grouped["encoder"]["conv"], full["encoder"]["conv"])


@pytest.mark.parametrize("fields, fragment", [
    (dict(backbone_lr_scale=-0.1), "backbone_lr_scale=-0.1 must be a number >= 0"),
    (dict(backbone_lr_scale=0.1, freeze_backbone=True), "set one of them"),
])
def test_bad_backbone_lr_scale_is_a_user_error(fields, fragment):
  with pytest.raises(UserError, match=fragment):
    make_config("resnet18_tv", **fields)


@pytest.mark.slow
def test_a_run_from_the_file_with_a_frozen_backbone_and_its_resume(tmp_path, digits_model, few_digits, capsys):
  """Fine-tuning on an image folder: one epoch (one step) from the file with only the head training: the encoder's
  parameters stay the file's exactly, the head moves. Run again with the file gone, the run restores its checkpoint
  and never reads the file."""
  from conftest import restore_final_state
  _, saved, _ = digits_model
  path = write(tmp_path / "w.safetensors", saved)
  workdir = tmp_path / "run"
  args = ("train", "--workdir", workdir, *few_digits, "--config.freeze_backbone=true", f"--config.init_from={path}")
  code, out, err = run_cli(capsys, *args)
  assert code == 0, err
  assert "re-initialised" not in err
  state, _ = restore_final_state(workdir)
  chex.assert_trees_all_equal(jax.device_get(state.params["encoder"]), jax.device_get(saved["params"]["encoder"]))
  assert not np.allclose(state.params["head"]["fc"]["kernel"], saved["params"]["head"]["fc"]["kernel"])
  path.unlink()
  code, out, err = run_cli(capsys, *args)  # nothing left to train: the checkpoint is restored and evaluated
  assert code == 0, err
  assert json.loads(out.strip().splitlines()[-1])["steps"] == 1
  # experiments/export_weights.py writes the run back out in torchvision's names: the file maps onto the run's state.
  export = importlib.util.spec_from_file_location("export_weights", REPO_ROOT / "experiments" / "export_weights.py")
  script = importlib.util.module_from_spec(export)
  export.loader.exec_module(script)
  assert script.main([str(workdir), str(tmp_path / "out.safetensors")]) == 0
  exported = weights.read_safetensors(tmp_path / "out.safetensors")
  model = digits_model[0]
  chex.assert_trees_all_equal(resnet_tv.from_torchvision(exported, numpy_variables(model, DIGITS, seed=3)),
                              jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))
  assert script.main([str(workdir), str(tmp_path / "x.safetensors"), "--layout", "timm"]) == 0  # the same names
  assert script.main([str(tmp_path / "none"), str(tmp_path / "y.safetensors")]) == 2


# ----------------------------------------------------------------------------- against torchvision (torch only)


def load_check_script(name: str = "check_pretrained"):
  """``experiments/NAME.py`` as a module."""
  spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name, library", [("resnet18_tv", "torchvision"), ("resnet50_tv", "torchvision"),
                                           ("resnet50_tv", "timm"), ("vgg16", "torchvision"),
                                           ("vgg16_bn", "torchvision"), ("convnext_atto", "timm"),
                                           ("convnext_femto", "timm")])
def test_logits_equal_the_peers(tmp_path, name, library):
  """experiments/check_pretrained.py at 64×64: the library's network, saved and loaded in its layout."""
  pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  pytest.importorskip(library)
  row = load_check_script().compare(name, pathlib.Path(tmp_path), library=library, size=64, batch=2, num_classes=10)
  assert row["params"] == row["peer_params"]
  assert row["max_abs_diff"] <= 1e-4, row


@pytest.mark.parametrize("name", ["resnet18_tv", "resnet50_tv", "vgg16_bn"])
def test_logits_equal_torchvisions_networks_written_out_in_torch(tmp_path, name):
  """The same check with torch alone (CI's): torchvision's ResNets and VGG-16 written out layer for layer with its
  state-dict names (experiments/torch_references.py; their parameter counts are torchvision's)."""
  pytest.importorskip("torch")
  row = load_check_script().compare(name, pathlib.Path(tmp_path), library="transcription", size=64, batch=2,
                                    num_classes=10)
  assert row["params"] == row["peer_params"]
  assert row["max_abs_diff"] <= 1e-4, row


def test_the_conversion_command_converts_a_pth_with_torch_alone(tmp_path):
  pytest.importorskip("torch")
  assert load_check_script().check_conversion(pathlib.Path(tmp_path), size=32, library="transcription") <= 1e-4


def test_the_conversion_command_converts_a_pth(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  assert load_check_script().check_conversion(pathlib.Path(tmp_path), size=32) <= 1e-4


def test_training_gradients_equal_torchvisions():
  """experiments/check_train_gradients.py on 4 digits: train mode (batch statistics) and its backward pass, float64."""
  pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  script = load_check_script("check_train_gradients")
  images, labels = script.batch(4)
  gap = script.float64_gap("resnet18", images, labels)
  assert abs(gap["loss"] - gap["torchvision_loss"]) < 1e-6 and gap["largest_gradient_gap"] < 1e-6, gap
