"""Preemption-safe training (overfocus_jax/train/preemption.py): checkpoints inside an epoch, a clean stop on
SIGTERM/SIGUSR1/SIGINT, and runs killed with SIGKILL at random steps — during a save too — that resume to the bits
of an uninterrupted run."""

import math
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from overfocus_jax import cli
from overfocus_jax.train import loop, preemption

from conftest import (BASE_RUN_ARGS, DIGITS_TRAIN, REPO_ROOT, assert_one_line_error, read_metrics,
                      restore_final_state, run_cli, subprocess_env)

STEPS_PER_EPOCH = DIGITS_TRAIN // 64  # 22
TOTAL_STEPS = 2 * STEPS_PER_EPOCH
EXACT = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate", "generalization_gap")


def assert_bit_identical_run(workdir, reference):
  """The same final train state, bit for bit, and one metrics record per epoch with the same numbers."""
  chex.assert_trees_all_equal(restore_final_state(workdir)[0], restore_final_state(reference)[0])
  got, want = read_metrics(workdir), read_metrics(reference)
  assert [r["step"] for r in got] == [r["step"] for r in want] == [STEPS_PER_EPOCH, TOTAL_STEPS]
  for record, expected in zip(got, want):
    assert {k: record[k] for k in EXACT} == {k: expected[k] for k in EXACT}


# ----------------------------------------------------------------------------- pieces


def test_epoch_progress_keeps_each_sum_bit_for_bit_through_json():
  import json
  sums = {"loss": np.float32(1) / np.float32(3), "hits": np.int32(7), "share": np.float32(np.pi)}
  record = json.loads(json.dumps(preemption.EpochProgress(5, sums, 1.5).to_json(22)))
  restored = preemption.EpochProgress.from_json(record)
  assert restored.steps == 5 and restored.seconds == 1.5 and record["steps_per_epoch"] == 22
  for name, value in sums.items():
    assert restored.sums[name].dtype == value.dtype and restored.sums[name] == value, name


def test_the_schedule_saves_by_steps_and_by_minutes(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
  due = lambda schedule, step: schedule.due_by_steps(step) or schedule.due_by_time()
  by_steps = preemption.CheckpointSchedule(every_steps=5)
  assert not due(by_steps, 4) and due(by_steps, 5) and due(by_steps, 7)
  by_steps.saved(7)
  assert not due(by_steps, 11) and due(by_steps, 12)
  by_time = preemption.CheckpointSchedule(every_minutes=2.0)
  assert not due(by_time, 1000)
  clock[0] += 119.0
  assert not due(by_time, 1001)
  clock[0] += 1.0
  assert due(by_time, 1002)
  assert not due(preemption.CheckpointSchedule(), 10**6)  # both off


def test_a_progress_record_of_another_epoch_length_is_refused():
  record = preemption.EpochProgress(5, None, 0.0).to_json(22)
  assert loop.check_resume_point(27, 22, record).steps == 5
  for step, length in ((27, 44), (28, 22)):
    with pytest.raises(Exception, match=f"step {step}, not at an epoch end"):
      loop.check_resume_point(step, length, record)


def test_a_second_signal_exits_at_once(monkeypatch, capsys):
  """The first signal asks for a save and a stop; the second ends the process on the spot (no unwinding), with
  128 + the signal's number. (Driven through the handler: a real second signal would end pytest.)"""
  exits = []
  monkeypatch.setattr(preemption.os, "_exit", exits.append)
  watch = preemption.SignalWatch()
  watch._handle(signal.SIGTERM, None)
  assert watch.received == "SIGTERM" and not exits
  watch._handle(signal.SIGUSR1, None)
  assert exits == [128 + signal.SIGUSR1]
  err = capsys.readouterr().err.splitlines()
  assert err[0].startswith("overfocus: SIGTERM: saving a checkpoint") and "SIGUSR1 again: exiting now" in err[1]


@pytest.mark.parametrize("field, value", [("checkpoint_every_steps", "-1"), ("checkpoint_every_minutes", "-0.5"),
                                          ("checkpoint_every_minutes", "nan")])
def test_a_bad_checkpoint_interval_is_one_line(tmp_path, capsys, field, value):
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "run", *BASE_RUN_ARGS, f"--config.{field}={value}")
  assert_one_line_error(code, err, f"config.{field}", f"--config.{field}")
  assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- real processes, real signals


def tensorboard_events(workdir) -> list:
  """Every event of the run's TensorBoard files, file by file in the order they were written (TFRecord framing:
  length, its CRC, the serialized Event, its CRC)."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def assert_tensorboard_keeps_one_value_per_step(workdir):
  """What TensorBoard shows: a SessionLog START at step s drops the earlier events of steps >= s; then each scalar
  has one value per step, at the epoch ends."""
  from tensorboardX.proto import event_pb2
  shown = {}
  for event in tensorboard_events(workdir):
    if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
      shown = {key: value for key, value in shown.items() if key[1] < event.step}
    for value in event.summary.value:
      assert (value.tag, event.step) not in shown, f"{value.tag} twice at step {event.step}"
      shown[value.tag, event.step] = value.simple_value
  assert {step for _, step in shown} == {STEPS_PER_EPOCH, TOTAL_STEPS}


def test_a_resumed_writer_drops_the_records_and_events_of_steps_trained_again(tmp_path):
  """Epoch 2 (step 44) was logged, then the run died before its checkpoint was complete; the rerun resumes at step
  22 and logs step 44 again: one line and one TensorBoard value per step remain."""
  import time as time_lib
  from overfocus_jax.train.workdir import MetricWriter
  first = MetricWriter(tmp_path)
  for step, loss in ((STEPS_PER_EPOCH, 2.0), (TOTAL_STEPS, 1.5)):
    first.write(step, {"epoch": step // STEPS_PER_EPOCH, "step": step, "train_loss": loss})
  first.close()
  time_lib.sleep(1.1)  # TensorBoard names its files by the second
  again = MetricWriter(tmp_path, resumed_at=STEPS_PER_EPOCH)
  again.write(TOTAL_STEPS, {"epoch": 2, "step": TOTAL_STEPS, "train_loss": 1.25})
  again.close()
  assert [r["train_loss"] for r in read_metrics(tmp_path)] == [2.0, 1.25]
  assert_tensorboard_keeps_one_value_per_step(tmp_path)


def checkpoint_steps(workdir) -> set[int]:
  """Every step with a checkpoint directory, complete or still being written (``STEP.orbax-checkpoint-tmp-…``)."""
  directory = pathlib.Path(workdir) / "checkpoints"
  names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
  return {int(name.split(".")[0]) for name in names if name.split(".")[0].isdigit()}


def start_training(workdir, cache):
  args = [sys.executable, "-m", "overfocus_jax", "train", "--workdir", str(workdir), *BASE_RUN_ARGS,
          "--config.num_epochs=2", "--config.checkpoint_every_steps=1"]
  # One compilation cache for the chain: each restart loads the programs instead of compiling them again.
  env = subprocess_env({"OVERFOCUS_COMPILATION_CACHE": str(cache)})
  return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)


def wait_for_a_save_at_or_after(process, workdir, target: int, timeout: float = 240.0) -> int:
  """Polls until the run starts saving a step ≥ ``target`` that was not there before; returns that step."""
  before = checkpoint_steps(workdir)
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    new = {s for s in checkpoint_steps(workdir) - before if s >= target}
    if new:
      return min(new)
    assert process.poll() is None, f"the run ended before step {target}: {process.communicate()}"
    time.sleep(0.005)
  process.kill()
  raise AssertionError(f"no save at or after step {target} in {timeout} s")


def test_sigkill_at_three_random_steps_and_sigterm_resume_bit_identically(uninterrupted_constant, tmp_path):
  """``kill -9`` at three random steps (a save every step, so a kill often lands inside one), then SIGTERM (saves,
  exits 0); the last rerun finishes the run. Every restart resumes from the last complete checkpoint, and the end
  is the uninterrupted run's, bit for bit."""
  workdir, cache = tmp_path / "run", tmp_path / "xla-cache"
  kills = sorted(random.Random(os.getpid()).sample(range(2, TOTAL_STEPS - 8), 3))
  for target in kills:
    process = start_training(workdir, cache)
    wait_for_a_save_at_or_after(process, workdir, target)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL

  process = start_training(workdir, cache)
  reached = wait_for_a_save_at_or_after(process, workdir, 0)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=60)
  assert process.returncode == 0, err
  stopped_at = int(err.split("stopped by SIGTERM at step ")[1].split(";")[0])
  assert stopped_at >= reached and "Traceback" not in err
  assert max(checkpoint_steps(workdir)) == stopped_at  # complete: the stop waited for it

  assert cli.main(["train", "--workdir", str(workdir), *BASE_RUN_ARGS, "--config.num_epochs=2",
                   "--config.checkpoint_every_steps=1"]) == 0
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  assert_bit_identical_run(workdir, uninterrupted_constant)
  assert_tensorboard_keeps_one_value_per_step(workdir)
  assert math.isfinite(read_metrics(workdir)[-1]["images_per_s"])
