"""The config is put together from its parts: every field declared once, with its default and one line of help, by
the part that reads it; each shipped model declared in its own file; dataset kinds in one table; and
``overfocus train --help-config`` shows them all."""

import dataclasses
import pathlib
import re

import ml_collections
import pytest

from overfocus_jax import config as config_lib
from overfocus_jax import fields, models
from overfocus_jax.configs import default
from overfocus_jax.data import sources
from overfocus_jax.errors import UserError
from overfocus_jax.models import resnet
from overfocus_jax.models.spec import ModelSpec, Platform

from conftest import assert_one_line_error, run_cli


def leaves(node, prefix=""):
  for key, value in node.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)) and key not in ("model_args", "args"):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def test_every_field_has_one_declaration_with_help():
  config = config_lib.defaults()
  rows = [row for part in config_lib.parts()
          for row in part.describe(config if not part.name else config[part.name], f"{part.name}." * bool(part.name))]
  names = [name for name, _, _ in rows]
  assert len(names) == len(set(names))
  assert sorted(names) == sorted(leaves(config.to_dict()))
  assert all(text and "\n" not in text for _, _, text in rows)
  assert default.get_config() == config  # the default config file is the parts' defaults


def test_a_field_declared_twice_is_refused():
  twice = fields.Group("", "", {"seed": fields.Field(1, "again")})
  with pytest.raises(ValueError, match=r"declared twice: \['seed'\]"):
    fields.merge((*config_lib.parts(), twice))


def test_each_shipped_model_is_declared_in_its_own_file():
  assert models.MODELS == ("resnet", "resnet18", "resnet18_tv", "resnet50_tv", "vgg16", "convnext", "mnist_cnn",
                           "attention", "focus", "corner", "reconstruction")
  for name, spec in models.REGISTRY.items():
    assert spec.name == name and spec.help
    home = getattr(spec.build, "func", spec.build).__module__  # the file that declares the model builds it
    assert home.startswith("overfocus_jax.models.") and all(group.validate for group in spec.groups)
  # the groups each model reads are the config's groups, each declared once
  group_names = [group.name for group in models.model_groups()]
  assert group_names == ["resnet", "resnet_tv", "vgg", "convnext", "attention", "focus", "corner", "reconstruction"]
  assert [name for name, spec in models.REGISTRY.items() if spec.task != "classify"] == ["reconstruction"]
  assert models.platform_of("my_pkg.nets:TinyNet") == Platform()


def test_a_registered_model_trains_through_the_config(monkeypatch, tmp_path, capsys):
  """A new model is its spec and one registry entry: the config accepts its name, its group's check runs, and the
  train loop builds it."""
  def build_tiny(config, **common):
    return resnet.PreActResNet(stem_features=4, stage_widths=(8,), stage_sizes=(1,), stage_strides=(2,), **common)

  def check(config):
    fields.require(config.model != "tiny" or config.num_epochs == 1, "tiny trains one epoch", "--config.num_epochs=1")

  spec = ModelSpec("tiny", "a tiny residual CNN", build_tiny, (fields.Group("resnet", "", {}, validate=check),))
  monkeypatch.setitem(models.REGISTRY, "tiny", spec)
  monkeypatch.setattr(models, "MODELS", tuple(models.REGISTRY))
  args = ("train", "--workdir", tmp_path / "run", "--config.model=tiny", "--config.dataset=digits",
          "--config.augment=false", "--no-progress")
  code, out, _ = run_cli(capsys, *args, "--config.num_epochs=1")
  assert code == 0 and '"model": "tiny"' in out
  config = config_lib.defaults()
  config.model, config.num_epochs = "tiny", 2
  with pytest.raises(UserError, match="unknown model"):  # its name is known only while it is registered
    monkeypatch.undo()
    config_lib.validate(config)


def test_help_config_lists_every_field_with_this_configs_values(tmp_path, capsys):
  code, out, err = run_cli(capsys, "train", "--help-config", "--config.vgg.width=0.5", "--config.model=vgg16")
  assert code == 0 and err == ""
  for name in leaves(config_lib.defaults().to_dict()):
    assert f"  {name} " in out, name
  assert "vgg.width      = 0.5  # multiplies every conv's width" in out
  assert re.search(r"^  model +=  ?'vgg16'  # a shipped model", out, re.MULTILINE)
  for name, spec in models.REGISTRY.items():
    assert f"  {name}" in out and spec.help in out
  assert not (tmp_path / "run").exists()
  code, _, err = run_cli(capsys, "train", "--help-config", "--config.vgg.width=-1")
  assert_one_line_error(code, err, "config.vgg.width=-1")


def test_train_without_workdir_is_one_line(capsys):
  code, _, err = run_cli(capsys, "train", "--config.model=vgg16")
  assert_one_line_error(code, err, "required: --workdir")


def test_dataset_kinds_are_one_table():
  assert set(sources.DATASET_KINDS) == {"mnist5k", "digits", "mnist5k_rgb", "mnist5k_shortcut", "mnist5k_glyph",
                                        "mnist5k_color", "colored_mnist", "rotated_mnist", "tfds", "idx", "npz",
                                        "imagefolder"}
  assert sources.load_dataset("digits").name == "digits"
  with pytest.raises(UserError, match="digits takes no argument"):
    sources.load_dataset("digits:1")
  with pytest.raises(UserError, match="'tfds:' is missing its argument"):
    sources.load_dataset("tfds:")
  with pytest.raises(UserError, match="no dataset kind 'nowhere' and no module 'nowhere'"):
    sources.load_dataset("nowhere:load")


def test_a_new_dataset_kind_is_one_entry(monkeypatch):
  digits = sources.load_dataset("digits")
  kind = sources.DatasetKind(lambda spec, argument, options: dataclasses.replace(digits, name=spec), "optional")
  monkeypatch.setitem(sources.DATASET_KINDS, "my_digits", kind)
  assert sources.load_dataset("my_digits:anything").name == "my_digits:anything"


def test_every_shipped_config_file_builds_and_so_does_every_run_of_its_sweep():
  """experiments/configs/*.py: get_config() sets its fields (a number where the default is "auto" included) and
  validates; a get_sweep()'s every run builds from its config file with its fields."""
  from overfocus_jax.sweeps import grid
  configs = sorted((pathlib.Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.py"))
  assert len(configs) > 10
  for path in configs:
    config_lib.build_config(str(path), [])
    if "def get_sweep" in path.read_text():
      for job in grid.jobs_from_sweep(config_lib.load_sweep_file(str(path)), str(path))[::9]:
        config_lib.build_config(job.config, list(job.overrides))
