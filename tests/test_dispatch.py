"""Many steps per dispatch (overfocus_jax/train/dispatch.py) and the train loop on both streams (train/streams.py):
a chunk equals its steps one by one, compiles once, names the first non-finite step; runs resume exactly on the
device stream and on the host stream; asynchronous checkpoints are complete when a run returns."""

import json
import re
import shutil

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overfocus_jax import parallel
from overfocus_jax.data import pipeline
from overfocus_jax.errors import UserError
from overfocus_jax.train import checkpoint as checkpoint_lib
from overfocus_jax.train import dispatch, experiment, loop, streams
from overfocus_jax.train.step import make_train_step

from conftest import (BASE_RUN_ARGS, DIGITS_TRAIN, assert_resume_refused, read_metrics, restore_final_state, run_cli,
                      tiny_config)

STEPS_PER_EPOCH = DIGITS_TRAIN // 64  # 22


def host_chunk(exp, count, seed=0):
  """``count`` uint8 batches of the host pipeline, stacked as a host stream sends them, and the same normalized."""
  iterator = pipeline.make_train_iterator(exp.dataset, batch_size=64, seed=seed, augment=True, normalized=False)
  raw = [next(iterator) for _ in range(count)]
  stacked = {k: np.stack([b[k] for b in raw]) for k in ("image", "label")}
  normalized = [{"image": pipeline.normalize(b["image"], exp.dataset.mean, exp.dataset.std), "label": b["label"]}
                for b in raw]
  return stacked, normalized


def test_a_chunk_of_k_steps_equals_the_k_steps_one_by_one():
  exp = experiment.build_experiment(tiny_config(schedule="constant", warmup_epochs=0))
  stacked, batches = host_chunk(exp, 3)
  step = jax.jit(make_train_step(exp.model, exp.tx, schedule=exp.schedule))
  state, sums = exp.state, None
  for batch in batches:
    state, metrics = step(state, batch)
    sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
  chunk = jax.jit(dispatch.make_train_chunk(step, dispatch.host_feed(exp.dataset.mean, exp.dataset.std)),
                  static_argnums=2)
  chunked, chunk_sums, first_bad = chunk(exp.state, stacked, 3)
  assert int(chunked.step) == 3 and int(first_bad) == -1
  chex.assert_trees_all_close(chunked.params, state.params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(chunk_sums, sums, rtol=1e-5, atol=1e-6)


def test_the_chunk_compiles_once_for_every_call():
  exp = experiment.build_experiment(tiny_config())
  step = make_train_step(exp.model, exp.tx, schedule=exp.schedule)
  traced = chex.assert_max_traces(dispatch.make_train_chunk(step, dispatch.host_feed(exp.dataset.mean,
                                                                                      exp.dataset.std)), n=1)
  chunk = jax.jit(traced, static_argnums=2, donate_argnums=0)
  state = exp.state
  for seed in range(3):  # new data and a new state each call: no retrace
    state, _, _ = chunk(state, host_chunk(exp, 2, seed=seed)[0], 2)
  assert int(state.step) == 6


@flax.struct.dataclass
class Counter:
  step: jax.Array
  value: jax.Array


def test_the_chunk_reports_the_first_non_finite_step():
  """A step function whose loss is NaN from step 5 on (counting steps taken, 1-based) and whose learning-rate
  metric is always NaN, as a step without a schedule reports it: the chunk names step 5, not 1."""
  def toy_step(state, batch):
    new = state.replace(step=state.step + 1, value=state.value + jnp.sum(batch))
    loss = jnp.where(new.step >= 5, jnp.nan, 1.0)
    return new, {"loss": loss, "learning_rate": jnp.nan}

  feed = lambda data, step, i: data[i]
  chunk = jax.jit(dispatch.make_train_chunk(toy_step, feed), static_argnums=2)
  state = Counter(step=jnp.int32(2), value=jnp.float32(0))
  state, sums, first_bad = chunk(state, jnp.ones((6, 3)), 6)
  assert int(state.step) == 8 and int(first_bad) == 5 and float(state.value) == 18
  clean = chunk(Counter(step=jnp.int32(0), value=jnp.float32(0)), jnp.ones((6, 3)), 3)
  assert int(clean[2]) == -1 and float(clean[1]["loss"]) == 3


def test_default_steps_per_dispatch_is_one_on_cpu_only():
  assert dispatch.default_steps_per_dispatch("cpu") == 1
  assert dispatch.default_steps_per_dispatch("gpu") == dispatch.default_steps_per_dispatch("tpu") > 1
  config = tiny_config(steps_per_dispatch=100)
  assert loop.steps_per_dispatch(config, STEPS_PER_EPOCH) == STEPS_PER_EPOCH  # at most an epoch


def test_a_nan_inside_a_chunk_names_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
  """Epoch 1 trains normally; epoch 2 resumes at a learning rate that overflows the weights within a few steps.
  Run one step per dispatch and in chunks of 3, both name the same first non-finite step, and the epoch-1
  checkpoint stays the latest. (The host stream reads the same chunk results: the loop's check is shared.)"""
  mode = "on"
  trained = tmp_path / "epoch1"
  loop.train_and_evaluate(tiny_config(num_epochs=1, schedule="constant", warmup_epochs=0, data_on_device=mode),
                          trained, progress=False)
  named = {}
  for k in (1, 3):
    workdir = tmp_path / f"k{k}"
    shutil.copytree(trained, workdir)
    config = tiny_config(num_epochs=2, schedule="constant", warmup_epochs=0, data_on_device=mode,
                         steps_per_dispatch=k, learning_rate=1e37)
    with pytest.raises(UserError, match=r"train \w+ became nan at step \d+; .*the last good checkpoint is kept") as e:
      loop.train_and_evaluate(config, workdir, progress=False)
    named[k] = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
    try:
      assert checkpointer.latest_step() == STEPS_PER_EPOCH
    finally:
      checkpointer.close()
    chex.assert_tree_all_finite(restore_final_state(workdir)[0].params)
    assert len(read_metrics(workdir)) == 1
  assert named[1] == named[3] and STEPS_PER_EPOCH < named[3] < 2 * STEPS_PER_EPOCH, named


# The device stream resumes exactly in test_checkpoint.py (K = 1) and runs chunks of K > 1 in the NaN test above.
@pytest.mark.parametrize("mode, k", [("off", 4)])
def test_a_run_in_chunks_resumes_exactly(tmp_path, capsys, mode, k):
  """Chunks of K (22 steps an epoch; K = 4: 4, 4, 4, 4, 4, 2): stop after epoch 1, rerun, and match an
  uninterrupted run."""
  args = (*BASE_RUN_ARGS, f"--config.data_on_device={mode}", f"--config.steps_per_dispatch={k}")
  reference, workdir = tmp_path / "reference", tmp_path / "resumed"
  assert run_cli(capsys, "train", "--workdir", reference, *args, "--config.num_epochs=2")[0] == 0
  # The reference as it stood after epoch 1: its epoch-1 checkpoint and line.
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(2 * STEPS_PER_EPOCH))
  (workdir / "metrics.jsonl").write_text((reference / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
  code, out, err = run_cli(capsys, "train", "--workdir", workdir, *args, "--config.num_epochs=2")
  assert code == 0, err
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["data_on_device"] == (mode == "on") and summary["steps_per_dispatch"] == k
  for got, want in zip(read_metrics(workdir), read_metrics(reference), strict=True):
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  resumed_state, resumed_data = restore_final_state(workdir)
  reference_state, reference_data = restore_final_state(reference)
  chex.assert_trees_all_close(resumed_state, reference_state, rtol=1e-5, atol=1e-6)
  assert resumed_data == reference_data


def test_resuming_on_the_other_stream_is_refused_and_leaves_the_run(trained_workdir, tmp_path, capsys):
  # trained with data_on_device=auto: on (the device stream, which auto picks for resnet on a CPU)
  assert_resume_refused(capsys, trained_workdir, tmp_path, ["--config.data_on_device=off"], "data_on_device=on",
                        "--config.data_on_device=on")


def test_auto_resumes_on_the_stream_the_checkpoint_was_written_with(tmp_path):
  config = tiny_config(num_epochs=1, data_on_device="off")
  loop.train_and_evaluate(config, tmp_path, progress=False)
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, read_only=True)
  try:
    exp = experiment.build_experiment(tiny_config(data_on_device="auto"))
    _, data_state = checkpointer.restore(checkpoint_lib.abstract_like(exp.state, parallel.replicated(exp.mesh)))
  finally:
    checkpointer.close()
  assert streams.saved_on_device(data_state) is False
  assert streams.choose_on_device(exp, data_state) is False  # auto alone chooses the device stream (resnet, CPU)
  assert streams.choose_on_device(exp, None) is True


def test_an_asynchronous_save_survives_the_next_step_donating_the_state(tmp_path):
  """The save returns before the files are written; the next step then overwrites the state's buffers in place.
  The checkpoint must still hold the state as it was at the save."""
  exp = experiment.build_experiment(tiny_config())
  expected = jax.device_get(exp.state)
  train_step = experiment.jit_train_step(exp)
  batch = parallel.shard_batch(host_chunk(exp, 1)[1][0], exp.mesh)
  checkpointer = checkpoint_lib.Checkpointer(tmp_path)
  try:
    checkpointer.save(0, exp.state, {"position": 0})
    state = exp.state
    for _ in range(3):
      state, _ = train_step(state, batch)
    jax.block_until_ready(state)
    checkpointer.wait()
    restored, data = checkpointer.restore(checkpoint_lib.abstract_like(exp.state, parallel.replicated(exp.mesh)),
                                          step=0)
  finally:
    checkpointer.close()
  chex.assert_trees_all_equal(jax.device_get(restored), expected)
  assert data == {"position": 0} and int(state.step) == 3


def test_every_checkpoint_is_complete_when_the_run_returns(tmp_path):
  config = tiny_config(num_epochs=3, keep_checkpoints=3)
  loop.train_and_evaluate(config, tmp_path, progress=False)
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]  # no half-written step
  for step in steps:
    assert (tmp_path / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").is_file()
  state, _ = restore_final_state(tmp_path)
  assert int(state.step) == 3 * STEPS_PER_EPOCH


def test_a_resume_off_an_epoch_end_is_refused_and_leaves_the_run(trained_workdir, tmp_path, capsys):
  """Batch 32 makes the epoch 44 steps: the checkpoint of step 22 is mid-epoch, the stream would not line up."""
  assert_resume_refused(capsys, trained_workdir, tmp_path, ["--config.batch_size=32"],
                        f"step {STEPS_PER_EPOCH}, not at an epoch end", "batch_size")


def test_weights_that_become_non_finite_at_an_epochs_end_are_not_checkpointed(tmp_path, monkeypatch):
  """The last step's update can make the weights NaN while that step's metrics were finite: the test loss shows
  it, and the epoch is not saved."""
  real = loop.make_evaluator
  monkeypatch.setattr(loop, "make_evaluator", lambda *a, **k: (lambda state: {**real(*a, **k)(state),
                                                                              "loss": float("nan")}))
  with pytest.raises(UserError, match=rf"test loss became nan at step {STEPS_PER_EPOCH}\b"):
    loop.train_and_evaluate(tiny_config(num_epochs=1), tmp_path, progress=False)
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, read_only=True)
  try:
    assert checkpointer.latest_step() is None
  finally:
    checkpointer.close()


def test_a_resumed_run_drops_the_lines_of_epochs_it_trains_again(tmp_path):
  """A crash after an epoch's line was written but before its asynchronous checkpoint was complete: the resumed
  run trains that epoch again and keeps one line per step."""
  config = tiny_config(num_epochs=1)
  loop.train_and_evaluate(config, tmp_path, progress=False)
  first = read_metrics(tmp_path)
  with (tmp_path / "metrics.jsonl").open("a") as f:  # the orphan line of an epoch 2 whose save never completed
    f.write(json.dumps({**first[0], "epoch": 2, "step": 2 * STEPS_PER_EPOCH, "train_loss": -1.0}) + "\n")
  loop.train_and_evaluate(tiny_config(num_epochs=2), tmp_path, progress=False)
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  assert records[0] == first[0] and records[1]["train_loss"] > 0


def test_a_data_state_grain_cannot_read_is_one_user_error():
  exp = experiment.build_experiment(tiny_config(data_on_device="off"))
  with pytest.raises(UserError, match="not one the grain pipeline can resume"):
    streams.make_stream(exp, {"unexpected": 1})
