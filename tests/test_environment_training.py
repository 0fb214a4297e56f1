"""Training on environments as DomainBed does: held-out environments, environment-balanced batches on both data
streams, the IRM and V-REx objectives (closed forms on a tiny linear model, the optimizer restart), per-environment
records of a real run, and the bad input."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from overfocus_jax.challenge import invariance
from overfocus_jax.data import balanced, pipeline
from overfocus_jax.data.sources import ArraySource, ImageDataset, load_dataset
from overfocus_jax.errors import UserError

from conftest import assert_one_line_error, read_metrics, run_cli, tiny_config

# --------------------------------------------------------------------------------------- a dataset of environments


def toy_environments(sizes=(10, 14, 9), test_sizes=(3, 3, 3)):
  """Three environments; image pixel (0, 0) holds the row's index in its split, channel 1 its environment."""
  def split(sizes):
    count = sum(sizes)
    domains = np.repeat(np.arange(len(sizes)), sizes)
    images = np.zeros((count, 4, 4, 2), np.uint8)
    images[:, 0, 0, 0] = np.arange(count)
    images[:, 0, 0, 1] = domains
    return ArraySource(images, np.arange(count) % 2, domains)

  return ImageDataset(name="toy", train=split(sizes), test=split(test_sizes), image_shape=(4, 4, 2), num_classes=2,
                      natural_images=False, mean=(0.0, 0.0), std=(1.0, 1.0), domain_names=("a", "b", "c"))


def test_training_view_holds_out_the_test_environment():
  dataset = toy_environments()
  view = balanced.training_view(dataset, test_envs=(1,))
  np.testing.assert_array_equal(np.unique(view.train.domains), [0, 2])
  assert len(view.train) == 19 and len(view.test) == 14  # the test environment's in-split is the reported test set
  assert set(view.test.domains) == {1}
  names = [name for name, _ in view.environment_splits]
  assert names == ["env0_in", "env0_out", "env1_in", "env1_out", "env2_in", "env2_out"]
  sizes = {name: len(source) for name, source in view.environment_splits}
  assert sizes == {"env0_in": 10, "env0_out": 3, "env1_in": 14, "env1_out": 3, "env2_in": 9, "env2_out": 3}
  # Explicit training environments: only those, the others neither trained on nor tested.
  only = balanced.training_view(dataset, test_envs=(1,), train_envs=(2,))
  assert set(only.train.domains) == {2}
  # None held out: every in-split trains, every out-split tests (as before environments existed).
  pooled = balanced.training_view(dataset)
  assert pooled.train is dataset.train and pooled.test is dataset.test


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(test_envs=(3,)), "has no environment 3"),
    (dict(test_envs=(0, 0)), "names an environment twice"),
    (dict(test_envs=(0, 1, 2)), "leaving none to train on"),
    (dict(test_envs=(1,), train_envs=(0, 1)), "both a test environment"),
])
def test_bad_environments_name_the_problem(kwargs, fragment):
  with pytest.raises(UserError, match=fragment):
    balanced.training_view(toy_environments(), **kwargs)


def test_environments_of_a_dataset_without_any_are_an_error():
  with pytest.raises(UserError, match="has no environments"):
    balanced.check_environments(load_dataset("digits"), test_envs=(0,))


def test_balanced_epochs_hold_each_environment_in_its_own_block():
  dataset = toy_environments()
  layout = balanced.make_layout(dataset.train.domains, 6, (0, 1, 2), dataset.domain_names)
  assert (layout.per_env, layout.steps_per_epoch, layout.batch_size) == (2, 4, 6)  # the smallest has 9 rows
  for epoch in range(3):
    order = balanced.epoch_order(layout, seed=0, epoch=epoch)
    assert order.shape == (24,)
    blocks = dataset.train.domains[order].reshape(4, 3, 2)  # (steps, environments, per_env)
    np.testing.assert_array_equal(blocks, np.broadcast_to(np.arange(3)[None, :, None], (4, 3, 2)))
    assert len(set(order)) == 24  # without replacement within an epoch
  first, second = (balanced.epoch_order(layout, seed=0, epoch=e) for e in (0, 1))
  assert not np.array_equal(first, second)  # each epoch its own order
  np.testing.assert_array_equal(first, balanced.epoch_order(layout, seed=0, epoch=0))  # a function of seed, epoch
  # The device stream draws another order of the same shape and blocks.
  device = np.asarray(jax.jit(lambda e: balanced.device_epoch_order(layout, jax.random.PRNGKey(1), e))(0))
  np.testing.assert_array_equal(dataset.train.domains[device].reshape(4, 3, 2), blocks)
  assert len(set(device)) == 24


def test_the_host_stream_reads_the_balanced_order():
  dataset = toy_environments()
  layout = balanced.make_layout(dataset.train.domains, 6, (0, 2))  # environment 1 held out
  iterator = pipeline.make_train_iterator(dataset, batch_size=6, seed=3, augment=False, normalized=False,
                                          balanced=layout)
  shuffle_seed = int(np.random.SeedSequence(3).generate_state(2)[0])
  expected = np.concatenate([balanced.epoch_order(layout, shuffle_seed, e) for e in range(2)])
  for step in range(2 * layout.steps_per_epoch):
    batch = next(iterator)
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], expected[step * 6:(step + 1) * 6])
    np.testing.assert_array_equal(batch["image"][:, 0, 0, 1], [0, 0, 0, 2, 2, 2])


@pytest.mark.parametrize("batch_size, fragment", [(7, "does not divide over the 3 training environments"),
                                                  (30, "has 9 examples, fewer than the 10")])
def test_bad_balanced_batches_name_the_problem(batch_size, fragment):
  dataset = toy_environments()
  with pytest.raises(UserError, match=fragment):
    balanced.make_layout(dataset.train.domains, batch_size, (0, 1, 2), dataset.domain_names)


@pytest.mark.parametrize("batch_size, environments, devices, fitted", [
    (128, 2, 1, 128),  # fits as it is
    (127, 2, 1, 128),
    (128, 5, 1, 130),  # 130 is 2 away, 125 is 3
    (7, 3, 1, 6),
    (5, 2, 1, 6),  # a tie: the larger
    (64, 3, 2, 66),  # over environments and devices: a multiple of 6
    (1, 3, 1, 3),  # never below one example of each
])
def test_fitting_batch_size_is_the_nearest_balanced_batch(batch_size, environments, devices, fitted):
  assert balanced.fitting_batch_size(batch_size, environments, devices) == fitted


def test_a_batch_that_does_not_divide_over_the_environments_is_fitted_with_a_note(capsys):
  from overfocus_jax.train.experiment import environment_training
  config = tiny_config()
  config.environments.test_envs = (1,)
  config.batch_size = 7
  _, layout = environment_training(config, toy_environments())
  assert layout.batch_size == 8 and layout.per_env == 4  # 6 and 8 are as near: the larger
  err = capsys.readouterr().err.strip()
  assert err == ("overfocus: note: batch_size=7 does not divide over the 2 training environments; using 8 "
                 "(4 of each)")
  config.batch_size = 6
  assert environment_training(config, toy_environments())[1].batch_size == 6
  assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------ the objectives


def linear_logits(weights, x):
  return x @ weights


def closed_form_irm(logits, labels, environments):
  """∂/∂s CE(s·l, y) at s = 1 is Σ_k p_k l_k − l_y: the mean of it over each half, multiplied, averaged."""
  probs = jax.nn.softmax(logits)
  slope = jnp.sum(probs * logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  slope = slope.reshape(environments, -1)
  return jnp.mean(jnp.mean(slope[:, ::2], 1) * jnp.mean(slope[:, 1::2], 1))


def toy_linear_batch(environments=3, per_env=6, features=5, classes=4):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(environments * per_env, features)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(features, classes)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, classes, environments * per_env), jnp.int32)
  return x, weights, labels


def test_irm_penalty_and_its_gradient_match_the_closed_form():
  x, weights, labels = toy_linear_batch()
  penalty = lambda w: invariance.irm_penalty(linear_logits(w, x), labels, 3)
  closed = lambda w: closed_form_irm(linear_logits(w, x), labels, 3)
  np.testing.assert_allclose(penalty(weights), closed(weights), rtol=1e-5)
  # The train step differentiates the penalty in reverse mode through the forward-mode slope.
  np.testing.assert_allclose(jax.grad(penalty)(weights), jax.grad(closed)(weights), rtol=1e-4, atol=1e-6)
  assert abs(float(penalty(weights))) > 1e-3  # a test that can fail: the toy batch is not already invariant


def test_vrex_is_the_mean_risk_plus_the_weighted_variance_of_the_risks():
  x, weights, labels = toy_linear_batch()
  losses = optax.softmax_cross_entropy_with_integer_labels(linear_logits(weights, x), labels)
  risks = np.asarray(losses).reshape(3, -1).mean(1)
  objective = invariance.vrex(3, penalty_weight=10.0, anneal_steps=5, ids=(0, 2, 5))
  for step, weight in ((4, 1.0), (5, 10.0)):  # 1 before the anneal step, λ from it on
    loss, metrics = objective.loss(losses, None, labels, jnp.int32(step))
    np.testing.assert_allclose(loss, risks.mean() + weight * risks.var(), rtol=1e-5)
  np.testing.assert_allclose(metrics["penalty"], risks.var(), rtol=1e-5)
  np.testing.assert_allclose([metrics["risk_env0"], metrics["risk_env2"], metrics["risk_env5"]], risks, rtol=1e-5)
  irm_loss, irm_metrics = invariance.irm(3, penalty_weight=100.0, anneal_steps=0).loss(
      losses, linear_logits(weights, x), labels, jnp.int32(0))
  np.testing.assert_allclose(irm_loss, risks.mean() + 100 * closed_form_irm(linear_logits(weights, x), labels, 3),
                             rtol=1e-5)
  assert set(irm_metrics) == {"nll", "penalty", "risk_env0", "risk_env1", "risk_env2"}


def test_the_optimizer_restarts_at_the_anneal_step(tiny_model_setup):
  """At step ``anneal_steps`` the update is the one a fresh Adam makes (DomainBed re-creates its optimizer)."""
  from overfocus_jax.train import state as state_lib
  from overfocus_jax.train.step import make_train_step
  config, model, _, _, _, batch = tiny_model_setup
  tx = optax.adam(1e-2)
  state = state_lib.create_train_state(model, tx, seed=0, input_shape=(8, 8, 1))
  objective = invariance.vrex(2, penalty_weight=10.0, anneal_steps=2)
  step = jax.jit(make_train_step(model, tx, objective=objective))
  for _ in range(2):
    state, _ = step(state, batch)
  fresh = state.replace(opt_state=tx.init(state.params))  # what the restart should amount to
  restarted, metrics = step(state, batch)
  expected, _ = step(fresh, batch)
  chex.assert_trees_all_close(restarted.params, expected.params, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(restarted.opt_state, expected.opt_state, rtol=1e-6, atol=1e-7)
  assert set(metrics) >= {"nll", "penalty", "risk_env0", "risk_env1"}
  # Without the restart, the third step's update differs (Adam's moments carry two steps of history).
  plain = jax.jit(make_train_step(model, tx, objective=objective._replace(reset_optimizer_at=None)))
  carried, _ = plain(state, batch)
  assert not np.allclose(jax.tree.leaves(carried.params)[0], jax.tree.leaves(expected.params)[0])


def test_erm_is_the_batch_mean_bit_for_bit(tiny_model_setup):
  from overfocus_jax.train.step import make_train_step
  _, model, tx, _, state, batch = tiny_model_setup
  default = jax.jit(make_train_step(model, tx))(state, batch)
  explicit = jax.jit(make_train_step(model, tx, objective=invariance.ERM))(state, batch)
  chex.assert_trees_all_equal(default, explicit)


# ----------------------------------------------------------------------------------------------------- real runs

TINY_ENV_ARGS = ("--config.dataset=colored_mnist", "--config.resnet.stem_features=8",
                 "--config.resnet.stage_widths=(8,16)", "--config.resnet.stage_sizes=(1,1)",
                 "--config.resnet.stage_strides=(2,2)", "--config.augment=false", "--config.optimizer=adam",
                 "--config.learning_rate=1e-3", "--config.schedule=constant", "--config.warmup_epochs=0",
                 "--config.num_epochs=1", "--no-progress")


@pytest.mark.parametrize("data_on_device", ["off", "on"])
def test_a_two_environment_irm_run_logs_every_environment(tmp_path, capsys, data_on_device):
  workdir = tmp_path / "run"
  code, _, err = run_cli(capsys, "train", "--workdir", workdir, *TINY_ENV_ARGS, "--config.batch_size=128",
                         "--config.environments.test_envs=2", "--config.objective.name=irm",
                         "--config.objective.irm.anneal_steps=5", f"--config.data_on_device={data_on_device}")
  assert code == 0, err
  record = read_metrics(workdir)[-1]
  assert record["step"] == 1333 // 64  # the smaller training environment's in-split, 64 rows of each a batch
  for env in range(3):
    for split in ("in", "out"):
      assert 0 <= record[f"env{env}_{split}_acc"] <= 1
  assert record["test_accuracy"] == record["env2_in_acc"]  # the held-out environment's in-split
  assert {"train_nll", "train_penalty", "train_risk_env0", "train_risk_env1"} <= set(record)
  assert "train_risk_env2" not in record
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["test_envs"] == [2] and summary["env2_in_acc"] == record["env2_in_acc"]


@pytest.mark.parametrize("overrides, fragments", [
    (("--config.environments.test_envs=3",), ("has no environment 3", "0 (+90%)")),
    (("--config.environments.test_envs=2", "--config.environments.train_envs=(1,2)"),
     ("both a test environment", "list each environment in one of the two")),
    (("--config.environments.test_envs=(0,1)", "--config.batch_size=2000"), ("fewer than the 2000",)),
    (("--config.dataset=digits", "--config.environments.test_envs=0"), ("has no environments",)),
    (("--config.dataset=digits", "--config.objective.name=vrex"), ("needs a dataset of environments",)),
    (("--config.objective.name=irm", "--config.environments.balanced=false"), ("environment-balanced",)),
    (("--config.objective.name=ganite",), ("unknown objective.name",)),
    (("--config.dataset=digits", "--config.environments.trial_seed=1"),
     ("re-splits the environments", "has none", "--config.environments.trial_seed to 0")),
    (("--config.environments.trial_seed=-1",), ("trial_seed=-1 must be an integer >= 0",)),
])
def test_bad_environment_settings_are_one_line_errors(tmp_path, capsys, overrides, fragments):
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "run", *TINY_ENV_ARGS, *overrides)
  assert_one_line_error(code, err, *fragments)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_config_without_environments_trains_as_before():
  config = tiny_config()
  assert config.environments.test_envs == () and config.objective.name == "erm"
