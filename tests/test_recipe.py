"""The training recipe: optimizer, learning_rate, weight_decay, warmup_epochs and label_smoothing are "auto" by
default and take the model's recipe (ModelSpec.recipe), else the defaults; a value the run sets stays."""

import json

import pytest

from overfocus_jax import config as config_lib
from overfocus_jax import optimization
from overfocus_jax.errors import UserError
from overfocus_jax.models import REGISTRY, recipe_of
from tests.conftest import REPO_ROOT, TINY_ARGS, run_cli


def recipe(config) -> dict:
  return {name: config[name] for name in optimization.RECIPE_FIELDS}


def test_the_recipe_fields_are_auto_by_default():
  assert recipe(config_lib.defaults()) == {name: "auto" for name in optimization.RECIPE_FIELDS}


def test_the_default_model_trains_with_the_default_recipe():
  """The default run's values, as they were before the fields became "auto": its config.json is unchanged."""
  assert recipe(config_lib.build_config(None, [])) == {"optimizer": "sgd", "learning_rate": 0.1,
                                                       "weight_decay": 5e-4, "warmup_epochs": 1,
                                                       "label_smoothing": 0.0}


def test_convnext_and_the_reconstruction_declare_recipes():
  assert {name for name, spec in REGISTRY.items() if spec.recipe} == {"convnext", "reconstruction"}


def test_convnext_named_alone_takes_its_recipe():
  assert recipe(config_lib.build_config(None, [("model", "convnext")])) == {
      "optimizer": "adamw", "learning_rate": 4e-3, "weight_decay": 0.05, "warmup_epochs": 1, "label_smoothing": 0.1}


def test_a_field_the_run_sets_stays_and_the_others_follow_the_recipe():
  config = config_lib.build_config(None, [("model", "convnext"), ("learning_rate", "2e-3"), ("label_smoothing", "0")])
  assert recipe(config) == {"optimizer": "adamw", "learning_rate": 2e-3, "weight_decay": 0.05, "warmup_epochs": 1,
                            "label_smoothing": 0.0}


def test_another_optimizer_takes_its_own_learning_rate_and_weight_decay():
  """ConvNeXt with SGD: SGD's 0.1 and 5e-4, not AdamW's 4e-3 and 0.05; the recipe's smoothing stays."""
  config = config_lib.build_config(None, [("model", "convnext"), ("optimizer", "sgd")])
  assert recipe(config) == {"optimizer": "sgd", "learning_rate": 0.1, "weight_decay": 5e-4, "warmup_epochs": 1,
                            "label_smoothing": 0.1}
  config = config_lib.build_config(None, [("optimizer", "adam")])
  assert (config.learning_rate, config.weight_decay) == (1e-3, 0.0)
  config = config_lib.build_config(None, [("optimizer", "adamw")])
  assert (config.learning_rate, config.weight_decay) == (1e-3, 1e-2)


def test_a_config_file_that_sets_the_recipe_keeps_its_numbers():
  config = config_lib.build_config(str(REPO_ROOT / "experiments" / "configs" / "mnist_cnn.py"), [])
  assert recipe(config) == {"optimizer": "adam", "learning_rate": 1e-3, "weight_decay": 0.0, "warmup_epochs": 0,
                            "label_smoothing": 0.0}


def test_a_model_by_import_path_takes_the_default_recipe():
  assert recipe_of("my_plugin.nets:TinyNet") == {}
  config = config_lib.defaults()
  config.model = "my_plugin.nets:TinyNet"
  assert recipe(config_lib.resolved(config))["optimizer"] == "sgd"


def test_resolving_leaves_a_resolved_config_alone():
  config = config_lib.build_config(None, [])
  assert config_lib.resolved(config) is config


def test_the_optimizer_refuses_an_unresolved_config():
  config = config_lib.defaults()
  with pytest.raises(ValueError, match="config.optimizer is 'auto'"):
    optimization.make_optimizer(config, optimization.make_schedule(config_lib.resolved(config), 10))
  with pytest.raises(ValueError, match="config.optimizer is 'auto'"):
    optimization.make_schedule(config, 10)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_shipped_recipe_sets_recipe_fields_to_valid_values(name):
  config = config_lib.defaults()
  config.model = name
  optimization.check_config(config_lib.resolved(config))
  assert set(REGISTRY[name].recipe) <= set(optimization.RECIPE_FIELDS)


def test_a_recipe_sets_only_the_recipe_fields():
  with pytest.raises(ValueError, match="recipe=.* sets \\['momentum'\\]; a recipe sets only"):
    optimization.recipe_values(config_lib.defaults(), {"momentum": 0.5})


@pytest.mark.parametrize("field, value, words", [
    ("learning_rate", "abc", ["config.learning_rate='abc'", "positive number"]),
    ("optimizer", "lion", ["unknown optimizer 'lion'", "sgd, adam, adamw"]),
    ("label_smoothing", "1.5", ["config.label_smoothing=1.5", "[0, 1)"]),
])
def test_bad_recipe_values_are_one_line(field, value, words):
  with pytest.raises(UserError) as error:
    config_lib.build_config(None, [("model", "convnext"), (field, value)])
  assert all(word in str(error.value) for word in words), str(error.value)


def test_help_config_shows_the_recipe(capsys):
  code, out, _ = run_cli(capsys, "train", "--help-config", "--config.model=convnext")
  assert code == 0
  assert "optimizer" in out and "'adamw'" in out
  assert "(recipe: optimizer=adamw, learning_rate=0.004, weight_decay=0.05" in out


def test_the_run_records_the_resolved_recipe(tmp_path, capsys):
  """config.json holds the numbers a run trained with, and eval reads them back."""
  workdir = tmp_path / "wd"
  code, _, err = run_cli(capsys, "train", "--workdir", workdir, *TINY_ARGS, "--config.num_epochs=1",
                         "--config.optimizer=adam", "--no-progress")
  assert code == 0, err
  saved = json.loads((workdir / "config.json").read_text())
  assert {name: saved[name] for name in optimization.RECIPE_FIELDS} == {
      "optimizer": "adam", "learning_rate": 1e-3, "weight_decay": 0.0, "warmup_epochs": 1, "label_smoothing": 0.0}
