"""SGDrop and RSC as the train step and the ``overfocus`` CLI use them: built from a config, jitted inside the step,
the EMA teacher moved by the step, chains, and the config's bad input and collapse warnings."""

import json

import chex
import jax
import jax.numpy as jnp
import pytest

from overfocus_jax import config as config_lib
from overfocus_jax.challenge import NONE, chain, rsc, sgdrop, stateless
from overfocus_jax.cli import main as cli_main
from overfocus_jax.models import build_model
from overfocus_jax.train import step as step_lib
from overfocus_jax.regularizers import build_regularizer

from test_challenge import paper_sgdrop


# ------------------------------------------------------------------------------------------------ in the step


@pytest.fixture(scope="module")
def tiny(tiny_model_setup):
  return tiny_model_setup


def _regularizer(config, **overrides):
  config = config.copy_and_resolve_references()
  for dotted, value in overrides.items():
    config_lib.apply_override(config, dotted, value)
  return build_regularizer(config, steps_per_epoch=10)


@pytest.mark.parametrize("overrides", [
    {"regularizer.name": "sgdrop"},
    {"regularizer.name": "sgdrop", "regularizer.sgdrop.granularity": "channel", "regularizer.sgdrop.ema_decay": "0.9"},
    {"regularizer.name": "rsc"},
    {"regularizer.name": "rsc_domainbed"},
])
def test_regularized_step_jit_equals_no_jit(tiny, overrides):
  config, model, tx, schedule, state, batch = tiny
  regularizer = _regularizer(config, **overrides)
  state = state.replace(regularizer_state=regularizer.init(state.variables))
  train_step = step_lib.make_train_step(model, tx, schedule=schedule, regularizer=regularizer)
  eager_state, eager_metrics = train_step(state, batch)
  jit_state, jit_metrics = jax.jit(train_step)(state, batch)
  chex.assert_trees_all_close(jit_state, eager_state, rtol=2e-5, atol=2e-6)
  chex.assert_trees_all_close(jit_metrics, eager_metrics, rtol=2e-5, atol=2e-6)
  assert any(k.startswith(("sgdrop_", "rsc_")) for k in jit_metrics)


def test_ema_teacher_in_the_step_moves_by_the_decay_toward_the_steps_variables(tiny):
  config, model, tx, schedule, state, batch = tiny
  decay = 0.9
  regularizer = _regularizer(config, **{"regularizer.name": "sgdrop", "regularizer.sgdrop.ema_decay": str(decay)})
  # make the teacher differ from the online network so the update is visible
  initial = regularizer.init(state.variables)
  teacher = {**initial, "ema": jax.tree.map(lambda a: a + 1.0, initial["ema"])}
  state = state.replace(regularizer_state=teacher)
  train_step = jax.jit(step_lib.make_train_step(model, tx, schedule=schedule, regularizer=regularizer))
  new_state, _ = train_step(state, batch)
  expected = jax.tree.map(lambda e, o: decay * e + (1 - decay) * o, teacher["ema"], state.variables)
  chex.assert_trees_all_close(new_state.regularizer_state["ema"], expected, rtol=1e-6, atol=1e-6)


def test_chain_two_regularizers_in_the_step(tiny):
  config, model, tx, schedule, state, batch = tiny
  chained = chain(paper_sgdrop(rate=0.1, ema_decay=0.5), rsc.rsc(batch_percent=0.5))
  state = state.replace(regularizer_state=chained.init(state.variables))
  assert len(state.regularizer_state) == 2 and "ema" in state.regularizer_state[0]
  assert chained.needs_teacher
  train_step = jax.jit(step_lib.make_train_step(model, tx, schedule=schedule, regularizer=chained))
  new_state, metrics = train_step(state, batch)
  assert {"sgdrop_dropped_fraction", "rsc_spatial"} <= set(metrics)
  chex.assert_trees_all_equal_structs(new_state.regularizer_state, state.regularizer_state)
  with pytest.raises(ValueError, match="different split points"):
    chain(sgdrop.sgdrop(ramp_steps=0), rsc.rsc_domainbed())


# ------------------------------------------------------------------------------------------------ bad input


def test_regularizer_on_a_model_without_a_split_is_a_user_error():
  import flax.linen as nn
  from overfocus_jax.errors import UserError
  from overfocus_jax.models import Model
  from overfocus_jax.train import experiment

  class Plain(nn.Module):  # logits only: no encode/classify
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(10)(x.reshape(x.shape[0], -1))

  model = Model(Plain(), "plain")
  assert not model.supports_split("latent") and not model.supports_split("pooled")
  with pytest.raises(UserError, match="encode/classify split"):
    experiment.check_regularizer_fits(model, NONE, "sgdrop")
  experiment.check_regularizer_fits(build_model(config_lib.load_config_file(config_lib.default_config_path()), 10),
                                    stateless(lambda *args: args[1:2] + ({},), split="pooled"), "rsc_domainbed")


@pytest.mark.parametrize("override,fragment", [
    ("--config.regularizer.sgdrop.rate=1.0", "regularizer.sgdrop.rate"),
    ("--config.regularizer.sgdrop.rate=-0.2", "regularizer.sgdrop.rate"),
    ("--config.regularizer.rsc.spatial_fraction=1.5", "regularizer.rsc.spatial_fraction"),
    ("--config.regularizer.rsc_domainbed.feature_drop=1", "regularizer.rsc_domainbed.feature_drop"),
    ("--config.regularizer.sgdrop.granularity=pixels", "granularity"),
    ("--config.regularizer.name=dropblock", "regularizer.name"),
    ("--config.regularizer.sgdrop.rule=top_k", "regularizer.sgdrop.rule"),
    ("--config.regularizer.sgdrop.mass=0", "regularizer.sgdrop.mass"),
    ("--config.regularizer.sgdrop.mass=1.5", "regularizer.sgdrop.mass"),
    ("--config.regularizer.sgdrop.ramp_epochs=-1", "regularizer.sgdrop.ramp_epochs"),
    ("--config.regularizer.sgdrop.batch_fraction=0", "regularizer.sgdrop.batch_fraction"),
    ("--config.regularizer.sgdrop.batch_fraction=1.5", "regularizer.sgdrop.batch_fraction"),
    ("--config.regularizer.rsc.rule=exact", "regularizer.rsc.rule 'exact'"),
    ("--config.regularizer.rsc_domainbed.rule=numpy", "regularizer.rsc_domainbed.rule 'numpy'"),
])
def test_bad_regularizer_config_is_a_one_line_error(override, fragment, tmp_path, capsys):
  code = cli_main(["train", "--workdir", str(tmp_path / "wd"), override])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and fragment in err, err
  assert not (tmp_path / "wd").exists()
  if ".rule=" in override and "rsc" in override:
    assert "reference, topk" in err, err  # the choices


@pytest.mark.parametrize("rate", ["0", "0.0"])
def test_the_mass_rule_needs_a_cap_above_zero(rate, tmp_path, capsys):
  code = cli_main(["train", "--workdir", str(tmp_path / "wd"), "--config.regularizer.sgdrop.rule=mass",
                   f"--config.regularizer.sgdrop.rate={rate}"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  assert "regularizer.sgdrop.rate" in err and "mass rule" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ collapse warning


def test_collapse_warning_names_the_fields_only_at_or_below_chance():
  from overfocus_jax.train.loop import collapse_warning
  config = config_lib.build_config(None, [("regularizer.name", "sgdrop")])
  line = collapse_warning(config, 0.04, 10, 1)
  assert line.startswith("overfocus: warning: epoch 1: train accuracy 0.040") and "\n" not in line
  assert "--config.regularizer.sgdrop.rate" in line and "--config.regularizer.sgdrop.rule" in line
  assert collapse_warning(config, 0.1, 10, 2) is not None        # at chance counts
  assert collapse_warning(config, 0.11, 10, 2) is None
  erm = config_lib.build_config(None, [])
  assert collapse_warning(erm, 0.0, 10, 1) is None                # ERM is never "a regularizer collapsing"


@pytest.mark.slow
@pytest.mark.parametrize("regularizer, warns", [
    (["--config.regularizer.name=sgdrop", "--config.regularizer.sgdrop.rule=topk",
      "--config.regularizer.sgdrop.rate=0.9"], True),  # forced collapse
    # Half of each batch masked: the batch accuracy stays above chance, the masked half's does not.
    (["--config.regularizer.name=sgdrop", "--config.regularizer.sgdrop.rule=topk",
      "--config.regularizer.sgdrop.rate=0.9", "--config.regularizer.sgdrop.batch_fraction=0.5"], True),
    (["--config.regularizer.name=none"], False),
])
def test_collapse_warning_fires_in_a_real_run(regularizer, warns, tmp_path, capsys):
  from conftest import BASE_RUN_ARGS
  code = cli_main(["train", "--workdir", str(tmp_path / "wd"), *BASE_RUN_ARGS, "--config.num_epochs=1",
                   *regularizer])
  captured = capsys.readouterr()
  assert code == 0, captured.err  # the run goes on
  warnings = [line for line in captured.err.splitlines() if "warning: epoch 1" in line]
  assert len(warnings) == (1 if warns else 0), captured.err


def test_idle_warning_only_when_a_regularizer_changed_nothing():
  from overfocus_jax.train.loop import idle_warning
  config = config_lib.build_config(None, [("regularizer.name", "sgdrop")])
  line = idle_warning(config, 0.0, 3)
  assert line.startswith("overfocus: warning: epoch 3: sgdrop changed no training sample")
  assert "--config.regularizer.sgdrop.granularity=element" in line and "\n" not in line
  assert idle_warning(config, 0.5, 3) is None and idle_warning(config, None, 3) is None
  assert idle_warning(config_lib.build_config(None, []), 0.0, 3) is None  # ERM changes nothing by design


def test_regularized_sample_metrics_count_only_the_changed_samples():
  from overfocus_jax.train.step import regularized_sample_metrics
  z = jnp.ones((4, 2, 2, 3))
  regularized = z.at[1, 0, 0, 0].set(0.0).at[3].set(0.0)  # samples 1 and 3 changed
  logits = jnp.eye(3)[jnp.array([0, 1, 2, 0])]              # predicts 0, 1, 2, 0
  labels = jnp.array([0, 1, 0, 1])                           # right on 0 and 1 only
  metrics = regularized_sample_metrics(z, regularized, logits, labels)
  assert float(metrics["regularized_share"]) == 0.5
  assert float(metrics["regularized_hits"]) == 0.25         # sample 1: changed and right; sample 3: wrong


def test_partial_batch_records_the_accuracy_of_the_masked_samples(tmp_path, capsys):
  """metrics.jsonl's train_regularized_accuracy is the masked samples' own: with ρ = 0.9 on half of each batch it
  is far below the batch accuracy, which the untouched half lifts."""
  from conftest import BASE_RUN_ARGS
  code = cli_main(["train", "--workdir", str(tmp_path / "wd"), *BASE_RUN_ARGS, "--config.num_epochs=2",
                   "--config.regularizer.name=sgdrop", "--config.regularizer.sgdrop.rule=topk",
                   "--config.regularizer.sgdrop.rate=0.9", "--config.regularizer.sgdrop.batch_fraction=0.5"])
  assert code == 0, capsys.readouterr().err
  last = json.loads((tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()[-1])
  assert 0.4 < last["train_regularized_share"] < 0.6
  assert last["train_regularized_accuracy"] < last["train_accuracy"] - 0.1
