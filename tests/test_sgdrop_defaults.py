"""SGDrop at its default settings trains every shipped model: on real data — scikit-learn's 8×8 digits —
four short epochs of each model config at small size, with nothing but ``--config.regularizer.name=sgdrop``, lower
the loss and lift the accuracy on the samples the regularizer masks well above chance.

The paper's rule at the paper's setting (quantile, ρ = 0.1 of the elements, every sample) fails this on five of the
six configs (its masked samples stay at or below chance). The stricter rule a default meets — masked accuracy above
chance already in epoch 1, and test accuracy within a point of ERM's — is measured at full size, 3 seeds, by
``experiments/no_collapse.py`` (docs/results/no_collapse.md): a tiny network's first epoch is too short to ask it of.
"""

import pytest

from overfocus_jax import config as config_lib
from overfocus_jax.train import loop, workdir as workdir_lib

from conftest import TINY_FIELDS
from test_attention import TINY_ATTENTION
from test_vgg import TINY_VGG


def _fields(group: dict) -> list[tuple[str, str]]:
  return [(key.replace("__", "."), repr(value)) for key, value in group.items()]


TINY_RESNET = [field for field in TINY_FIELDS if field[0] not in ("batch_size", "eval_batch_size")]
# The shipped model configs (experiments/configs/*.py), each small enough to train in seconds: (fields, epochs). The
# focus models keep their shipped patch geometry on the 28×28 digits of mnist5k — on 8×8 images four patches of half
# the image's side leave a masked sample too little to go on, a regime no shipped config is in.
MODEL_CONFIGS = {
    "default": (TINY_RESNET, 4),
    "shortcut": (TINY_RESNET + [("resnet.stage_strides", "(2,2)")], 4),  # every stage at stride 2, as shipped
    "attention": ([("model", "attention")] + _fields(TINY_ATTENTION), 4),
    "focus": ([("model", "focus"), ("dataset", "mnist5k"), ("batch_size", "128")], 2),
    "corner": ([("model", "corner"), ("dataset", "mnist5k"), ("batch_size", "128")], 2),
    # The later backbones at small size: VGG-16 at 1/16 width with two pools (8 → 2: a 2×2 map), DomainBed's
    # MNIST_CNN as it is (8 → 4: 4×4). (resnet18 and convnext leave 8×8 digits a 1×1 map, where the spatial rule
    # has nothing to drop: their full-size runs are in docs/results/no_collapse.md.)
    "vgg16": ([("model", "vgg16")] + _fields(TINY_VGG), 4),
    "mnist_cnn": ([("model", "mnist_cnn")], 4),
}
CHANCE = 0.1


def train(tmp_path, model_fields, epochs: int, regularizer: str = "sgdrop", *extra) -> list[dict]:
  overrides = [("dataset", "digits"), ("batch_size", "64"), ("eval_batch_size", "64"), ("num_epochs", str(epochs)),
               ("warmup_epochs", "0"), ("regularizer.name", regularizer)] + list(model_fields) + list(extra)
  config = config_lib.build_config(None, overrides)
  loop.train_and_evaluate(config, tmp_path / regularizer, progress=False)
  return workdir_lib.read_metrics(tmp_path / regularizer)


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_default_sgdrop_trains_every_model_config(name, tmp_path):
  records = train(tmp_path, *MODEL_CONFIGS[name])
  first, last = records[0], records[-1]
  assert all(record["train_regularized_share"] > 0.4 for record in records)  # it does mask: half of each batch
  masked = [record["train_regularized_accuracy"] for record in records]
  assert masked[-1] > 2 * CHANCE, f"{name}: accuracy {masked[-1]:.3f} on the masked samples, near chance"
  assert last["train_loss"] < first["train_loss"], f"{name}: the loss did not fall"
  assert last["test_accuracy"] > 3 * CHANCE, f"{name}: test accuracy {last['test_accuracy']}"


def test_default_sgdrop_on_a_one_by_one_map_drops_nothing_and_says_so(tmp_path, capsys):
  """A 1×1 latent map (as resnet18 gives on 8×8 images; here the tiny CNN at stride 2 throughout: 8 → 4 → 2 → 1) has
  one position, which the spatial mass rule never drops (it would leave the head nothing). The run trains as ERM
  would and a warning names the fix."""
  records = train(tmp_path, TINY_RESNET + [("resnet.stem_strides", "2"), ("resnet.stage_strides", "(2,2)")], 1)
  assert records[0]["train_regularized_share"] == 0.0 and "train_regularized_accuracy" not in records[0]
  err = capsys.readouterr().err
  assert "changed no training sample" in err and "--config.regularizer.sgdrop.granularity=element" in err


def test_the_functional_api_and_the_config_share_the_defaults():
  """``sgdrop.sgdrop(ramp_steps=steps_per_epoch)`` in a user's own script is the same regularizer as
  ``--config.regularizer.name=sgdrop``: every other default is the config's, and the ramp's length has none (the
  library counts steps, the config epochs)."""
  import inspect
  from overfocus_jax.challenge import sgdrop
  signature = {name: p.default for name, p in inspect.signature(sgdrop.sgdrop).parameters.items()}
  group = config_lib.build_config(None, []).regularizer.sgdrop.to_dict()
  group["ema_decay"] = group["ema_decay"] or None  # the config's 0.0 is the function's None: no teacher
  assert signature.pop("ramp_steps") is None and group.pop("ramp_epochs") == 1.0
  assert signature == group
  with pytest.raises(ValueError, match="ramp_steps is required"):
    sgdrop.sgdrop()


def test_the_default_departs_from_the_paper_as_documented():
  group = config_lib.build_config(None, []).regularizer.sgdrop
  assert (group.rule, group.granularity, group.mass, group.rate, group.batch_fraction, group.ramp_epochs) == (
      "mass", "spatial", 0.5, 0.5, 0.5, 1.0)
