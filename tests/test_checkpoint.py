"""Checkpoints: the Checkpointer round trip, what ``overfocus train`` writes, resuming, and checkpoints that must be
refused without being touched."""

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax import optimization
from overfocus_jax import parallel
from overfocus_jax.data import pipeline
from overfocus_jax.data.sources import load_dataset
from overfocus_jax.errors import UserError
from overfocus_jax.models import build_model
from overfocus_jax.train import checkpoint as checkpoint_lib
from overfocus_jax.train import workdir as workdir_lib
from overfocus_jax.train import state as state_lib

from conftest import (BASE_RUN_ARGS, DIGITS_TEST, DIGITS_TRAIN, assert_one_line_error,
                      assert_resume_refused, read_metrics, restore_final_state, run_cli, snapshot, tiny_config)

STEPS_PER_EPOCH = DIGITS_TRAIN // 64  # 22
METRIC_KEYS = {"epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_s",
               "learning_rate"}
COMPARED = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate")


# ----------------------------------------------------------------------------- Checkpointer


def make_state(seed=0, **fields):
  """A train state whose every float leaf is random, so a restore of initial values would not pass."""
  config = tiny_config(**fields)
  model = build_model(config, 10)
  tx = optimization.make_optimizer(config, optimization.make_schedule(config, 10))
  state = state_lib.create_train_state(model, tx, seed=0, input_shape=(8, 8, 1))
  rng = np.random.default_rng(seed)
  noisy = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(a.dtype)
                       if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
  return noisy.replace(step=jnp.asarray(123, jnp.int32))


def abstract(state):
  return checkpoint_lib.abstract_like(state, parallel.replicated(parallel.make_mesh()))


@pytest.fixture(scope="module")
def digits():
  return load_dataset("digits")


def checkpoint_steps(checkpointer):
  return sorted(int(p.name) for p in checkpointer.directory.iterdir() if p.name.isdigit())


def test_checkpointer_round_trip_state_and_data_state(tmp_path, digits):
  state = make_state()
  iterator = pipeline.make_train_iterator(digits, batch_size=32, seed=0, augment=True)
  for _ in range(3):
    next(iterator)
  data_state = iterator.get_state()
  upcoming = [next(iterator) for _ in range(2)]

  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  checkpointer.save(123, state, data_state)
  checkpointer.wait()  # saves are asynchronous: on disk once this returns
  checkpointer.close()

  reader = checkpoint_lib.Checkpointer(tmp_path, read_only=True)
  try:
    assert reader.latest_step() == 123
    restored, restored_data = reader.restore(abstract(state))
  finally:
    reader.close()
  assert type(restored) is type(state)
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
  assert restored_data == data_state
  # The restored data state continues the stream exactly where it was saved.
  resumed = pipeline.make_train_iterator(digits, batch_size=32, seed=0, augment=True)
  resumed.set_state(restored_data)
  for expected, batch in zip(upcoming, [next(resumed) for _ in range(2)]):
    np.testing.assert_array_equal(batch["image"], expected["image"])
    np.testing.assert_array_equal(batch["label"], expected["label"])


def test_checkpointer_keeps_the_latest_and_restores_older_steps(tmp_path):
  states = {step: make_state(seed=step) for step in (1, 2, 3)}
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, max_to_keep=2)
  try:
    for step, state in states.items():
      checkpointer.save(step, state, {"step": step})
    checkpointer.wait()  # saves are asynchronous: on disk once this returns
    assert checkpointer.latest_step() == 3
    assert checkpoint_steps(checkpointer) == [2, 3]
    restored, data_state = checkpointer.restore(abstract(states[1]), step=2)
    chex.assert_trees_all_equal(restored.params, states[2].params)
    assert data_state == {"step": 2}
    latest, _ = checkpointer.restore(abstract(states[1]))
    chex.assert_trees_all_equal(latest.opt_state, states[3].opt_state)
  finally:
    checkpointer.close()


def test_restore_without_a_checkpoint_is_a_user_error(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(tmp_path / "fresh", read_only=True)
  try:
    assert checkpointer.latest_step() is None
    with pytest.raises(UserError, match="no checkpoint"):
      checkpointer.restore(abstract(make_state()))
  finally:
    checkpointer.close()


def test_restore_into_another_model_is_refused_and_leaves_files(tmp_path):
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  checkpointer.save(5, make_state(), {})
  checkpointer.wait()  # saves are asynchronous: on disk once this returns
  before = snapshot(tmp_path)
  other = make_state(resnet__stage_widths=(8, 32))
  with pytest.raises(UserError, match=r"does not match this model/config .*\(16,\).*\(32,\)"):
    checkpointer.restore(abstract(other))
  checkpointer.close()
  assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- what `overfocus train` writes


def legacy_layout(state, extra):
  """The train state as 0.2.x checkpoints stored it: the regularizer's state in a field "extra"."""
  fields = {k: getattr(state, k) for k in ("step", "params", "batch_stats", "opt_state", "rng")}
  return {**fields, "extra": extra}


def test_checkpoint_from_before_regularizers_owned_their_state_restores(tmp_path):
  """Runs without an EMA teacher stored an empty "extra": they restore into the new layout, values intact."""
  state = make_state()
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  checkpointer.save(7, legacy_layout(state, {}), {"position": 3})
  checkpointer.wait()  # saves are asynchronous: on disk once this returns
  restored, data_state = checkpointer.restore(abstract(state))
  checkpointer.close()
  assert isinstance(restored, state_lib.TrainState) and restored.regularizer_state == ()
  chex.assert_trees_all_equal(restored.params, state.params)
  chex.assert_trees_all_equal(restored.opt_state, state.opt_state)
  assert int(restored.step) == 123 and data_state == {"position": 3}


@pytest.mark.parametrize("old, new", [
    ((), {"count": 0}),                                                 # RSC and SGDrop without a teacher
    ({"ema": "variables"}, {"count": 0, "ema": "variables"}),           # SGDrop with its EMA teacher
    (((), ()), ({"count": 0}, ())),                                     # a chain: SGDrop, then DomainBed's RSC
])
def test_checkpoint_from_before_regularizers_counted_their_steps_restores_with_the_count_at_the_step(
    tmp_path, old, new):
  """A regularizer's schedules count its own steps now; a run saved before restores with every counter at the train
  step, which is what the counter counts in a run of the CLI."""
  state = make_state()
  fill = lambda tree: jax.tree.map(lambda leaf: state.variables if leaf == "variables" else leaf, tree,  # noqa: E731
                                   is_leaf=lambda leaf: leaf == "variables")
  old, new = fill(old), jax.tree.map(lambda leaf: jnp.int32(leaf) if isinstance(leaf, int) else leaf, fill(new))
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  checkpointer.save(7, state.replace(regularizer_state=old), {"position": 3})
  checkpointer.wait()
  restored, data_state = checkpointer.restore(abstract(state.replace(regularizer_state=new)))
  checkpointer.close()
  counters = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(restored.regularizer_state)[0]
              if jax.tree_util.keystr(path).endswith("['count']")]
  assert counters and all(int(c) == 123 and c.dtype == jnp.int32 for c in counters)
  chex.assert_trees_all_equal(restored.params, state.params)
  if isinstance(new, dict) and "ema" in new:
    chex.assert_trees_all_equal(restored.regularizer_state["ema"], state.variables)
  assert data_state == {"position": 3}


def test_a_config_json_with_the_earlier_quantile_keeps_the_exact_count_rule(tmp_path, capsys):
  """config.json written before SGDrop's "quantile" meant the formula as written is read with the rule it was
  trained with, "topk"; a resumed run keeps it too. One line on stderr says so; today's config.json is read as is."""
  from overfocus_jax import config as config_lib
  config = config_lib.build_config(None, [("regularizer.name", "sgdrop"), ("regularizer.sgdrop.rule", "quantile")])
  today = config_lib.config_to_json(config)
  assert config_lib.config_from_json(today).regularizer.sgdrop.rule == "quantile"
  assert capsys.readouterr().err == ""
  earlier = json.loads(today)
  del earlier["format"]
  assert config_lib.config_from_json(json.dumps(earlier)).regularizer.sgdrop.rule == "topk"
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "'topk'" in err
  (tmp_path / "config.json").write_text(json.dumps(earlier))
  assert workdir_lib.keep_trained_rule(config, tmp_path).regularizer.sgdrop.rule == "topk"
  assert config.regularizer.sgdrop.rule == "quantile"  # the caller's config is left as it was
  (tmp_path / "config.json").write_text(today)
  assert workdir_lib.keep_trained_rule(config, tmp_path).regularizer.sgdrop.rule == "quantile"
  # The RSCs counted exactly ⌈f·N⌉ before they had a rule field: a run of then keeps that count.
  for name in ("rsc", "rsc_domainbed"):
    rsc_config = config_lib.build_config(None, [("regularizer.name", name)])
    assert rsc_config.regularizer[name].rule == "reference"
    earlier = json.loads(config_lib.config_to_json(rsc_config))
    del earlier["format"], earlier["regularizer"][name]["rule"]
    assert config_lib.config_from_json(json.dumps(earlier)).regularizer[name].rule == "topk"
    (tmp_path / "config.json").write_text(json.dumps(earlier))
    assert workdir_lib.keep_trained_rule(rsc_config, tmp_path).regularizer[name].rule == "topk"
    assert f"{name}'s exact-count rule" in capsys.readouterr().err


def test_checkpoint_with_an_old_layout_ema_teacher_is_refused_in_one_line_and_kept(tmp_path):
  state = make_state()
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  checkpointer.save(7, legacy_layout(state, {"ema": state.variables}), {})
  checkpointer.wait()  # saves are asynchronous: on disk once this returns
  before = snapshot(tmp_path)
  new_state = state.replace(regularizer_state={"ema": state.variables})  # what an SGDrop run with a teacher needs
  with pytest.raises(UserError, match=r"written before regularizers kept their own state.*retrain in a new "
                     r"--workdir") as caught:
    checkpointer.restore(abstract(new_state))
  checkpointer.close()
  assert "\n" not in str(caught.value)
  assert snapshot(tmp_path) == before


def test_train_writes_checkpoint_config_metrics_events_and_summary(trained_workdir):
  names = {p.name for p in trained_workdir.iterdir()}
  assert {"checkpoints", "config.json", "metrics.jsonl", "summary.json"} <= names
  assert not any(name.startswith(".write_test") for name in names)
  assert [p.name for p in (trained_workdir / "checkpoints").iterdir() if p.name.isdigit()] == [str(STEPS_PER_EPOCH)]

  saved = json.loads((trained_workdir / "config.json").read_text())
  assert saved["dataset"] == "digits" and saved["num_epochs"] == 1 and saved["schedule"] == "constant"
  assert saved["resnet"]["stage_widths"] == [8, 16] and saved["batch_size"] == 64

  (record,) = read_metrics(trained_workdir)  # one line per epoch
  assert METRIC_KEYS <= set(record)
  assert record["epoch"] == 1 and record["step"] == STEPS_PER_EPOCH
  assert np.isclose(record["learning_rate"], 0.1)  # the default rate, constant
  assert 0 <= record["train_accuracy"] <= 1 and 0 <= record["test_accuracy"] <= 1
  assert record["images_per_s"] > 0 and np.isfinite(record["train_loss"]) and np.isfinite(record["test_loss"])

  events = sorted(trained_workdir.glob("events.out.tfevents*"))
  assert len(events) == 1
  content = events[0].read_bytes()
  for tag in (b"train_loss", b"test_accuracy", b"learning_rate"):
    assert tag in content

  summary = json.loads((trained_workdir / "summary.json").read_text())
  assert summary["epochs"] == 1 and summary["steps"] == STEPS_PER_EPOCH and summary["devices"] == 1
  assert summary["dataset"] == "digits" and summary["model"] == "resnet"
  assert summary["test_accuracy"] == record["test_accuracy"] and summary["test_loss"] == record["test_loss"]


def test_checkpoint_holds_the_state_and_iterator_position(trained_workdir):
  state, data_state = restore_final_state(trained_workdir)
  assert int(state.step) == STEPS_PER_EPOCH
  assert isinstance(data_state, dict) and data_state
  chex.assert_tree_all_finite(state.params)


# ----------------------------------------------------------------------------- resuming


def assert_same_run(resumed, reference):
  resumed_metrics, reference_metrics = read_metrics(resumed), read_metrics(reference)
  assert [m["epoch"] for m in resumed_metrics] == [m["epoch"] for m in reference_metrics] == [1, 2]
  assert [m["step"] for m in resumed_metrics] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  for got, want in zip(resumed_metrics, reference_metrics):
    for key in COMPARED:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  resumed_state, resumed_data = restore_final_state(resumed)
  reference_state, reference_data = restore_final_state(reference)
  chex.assert_trees_all_close(resumed_state, reference_state, rtol=1e-5, atol=1e-6)
  assert resumed_data == reference_data


def test_resume_continues_and_equals_an_uninterrupted_run(trained_workdir, uninterrupted_constant, tmp_path,
                                                          capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  first_line = (workdir / "metrics.jsonl").read_text().splitlines()[0]
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, *BASE_RUN_ARGS, "--config.num_epochs=2")
  assert code == 0, err
  assert "epoch 1/2" not in out and "epoch 2/2" in out  # only the missing epoch ran
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 2 and lines[0] == first_line  # epoch 2 appended, epoch 1 untouched
  assert json.loads(out.strip().splitlines()[-1])["steps"] == 2 * STEPS_PER_EPOCH
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
      STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  assert_same_run(workdir, uninterrupted_constant)


def test_an_interrupt_outside_the_signal_watch_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
  """A KeyboardInterrupt that escapes the loop (raised here right after epoch 1's line is written): exit 130, one
  line, the epoch-1 checkpoint and line kept. (Real signals, and resuming after them: tests/test_preemption.py.)"""
  write = workdir_lib.MetricWriter.write

  def write_then_interrupt(self, step, record):
    write(self, step, record)
    raise KeyboardInterrupt

  monkeypatch.setattr(workdir_lib.MetricWriter, "write", write_then_interrupt)
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path, *BASE_RUN_ARGS, "--config.num_epochs=2")
  assert code == 130 and err.strip() == "overfocus: interrupted; the last checkpoint is kept"
  assert len(read_metrics(tmp_path)) == 1
  assert int(restore_final_state(tmp_path)[0].step) == STEPS_PER_EPOCH


def test_rerun_of_a_finished_run_trains_nothing(trained_workdir, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  before = snapshot(workdir / "checkpoints")
  metrics = (workdir / "metrics.jsonl").read_text()
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, *BASE_RUN_ARGS, "--config.num_epochs=1")
  assert code == 0, err
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["steps"] == STEPS_PER_EPOCH and summary["epochs"] == 1
  np.testing.assert_allclose(summary["test_accuracy"], read_metrics(workdir)[0]["test_accuracy"], atol=1e-9)
  assert (workdir / "metrics.jsonl").read_text() == metrics
  assert snapshot(workdir / "checkpoints") == before


# ----------------------------------------------------------------------------- refusing checkpoints


def corrupt_chunks(state_dir):
  chunks = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert chunks
  for path in chunks:
    path.write_bytes(path.read_bytes()[:10])


def corrupt_metadata(state_dir):
  (state_dir / "_METADATA").write_text("{not json")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's closed event loop
@pytest.mark.parametrize("corrupt", [corrupt_chunks, corrupt_metadata], ids=["truncated-chunks", "bad-metadata"])
def test_a_run_whose_only_checkpoint_is_damaged_stops_in_one_line_and_keeps_it(trained_workdir, tmp_path, capsys,
                                                                                corrupt):
  """Eval (a reader) leaves everything as it is; train moves the damaged checkpoint aside (never deletes it) and,
  with none left that restores, stops in one line naming it. Test_faults.py covers the fallback to an earlier one."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  damaged = workdir / "checkpoints" / str(STEPS_PER_EPOCH)
  corrupt(damaged / "state")
  before = snapshot(workdir)
  code, _, err = run_cli(capsys, "eval", "--workdir", workdir)
  assert_one_line_error(code, err, "no checkpoint", "can be read", f"checkpoints/{STEPS_PER_EPOCH}")
  assert snapshot(workdir) == before
  code, _, err = run_cli(capsys, "train", "--workdir", workdir, *BASE_RUN_ARGS, "--config.num_epochs=2")
  assert_one_line_error(code, err, "no checkpoint", "can be read", "checkpoints.damaged")
  moved = list((workdir / "checkpoints.damaged").iterdir())
  assert [m.name.split("-")[0] for m in moved] == [str(STEPS_PER_EPOCH)] and not damaged.exists()
  after = snapshot(workdir)  # every file kept, byte for byte, the damaged checkpoint's under its new folder
  old, new = f"checkpoints/{STEPS_PER_EPOCH}/", f"checkpoints.damaged/{moved[0].name}/"
  assert {k[len(new):]: v for k, v in after.items() if k.startswith(new)} == \
      {k[len(old):]: v for k, v in before.items() if k.startswith(old)}
  assert all(after[k] == v for k, v in before.items() if not k.startswith(old) and k != old.rstrip("/"))


def test_incompatible_checkpoint_is_refused_and_left_alone(trained_workdir, tmp_path, capsys):
  # every file, config.json too: the old run's config is kept
  assert_resume_refused(capsys, trained_workdir, tmp_path, ["--config.resnet.stage_widths=(8,32)"], "does not match",
                        "--workdir")


def test_eval_reports_the_same_numbers_as_training(trained_workdir, capsys):
  before = snapshot(trained_workdir)
  code, out, err = run_cli(capsys, "eval", "--workdir", trained_workdir)
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  record = read_metrics(trained_workdir)[0]
  assert result["n"] == DIGITS_TEST and result["step"] == STEPS_PER_EPOCH
  np.testing.assert_allclose(result["accuracy"], record["test_accuracy"], atol=1e-9)
  np.testing.assert_allclose(result["loss"], record["test_loss"], rtol=1e-5)
  assert snapshot(trained_workdir) == before  # eval is read-only
