"""Runs that cannot hurt each other or themselves: one writer per workdir (a second writer stops in one line, a lock
left by a dead process is taken over, readers work alongside), a full or read-only disk (one line, exit code 2,
nothing half-written, an exact resume once there is room), and a damaged checkpoint (moved aside, the run resumes
from the one before it)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from overfocus_jax.errors import UserError, WriteError
from overfocus_jax.train import lock as lock_lib
from overfocus_jax.train import workdir as workdir_lib

from conftest import (BASE_RUN_ARGS, DIGITS_TRAIN, REPO_ROOT, assert_one_line_error, read_metrics, run_cli, snapshot,
                      subprocess_env)

DIGITS_RUN = (*BASE_RUN_ARGS, "--config.checkpoint_every_steps=5")
STEPS_PER_EPOCH = DIGITS_TRAIN // 64  # 22


# ----------------------------------------------------------------------------- one writer per workdir


def test_a_second_writer_meets_the_lock_in_one_line_and_writes_nothing(trained_workdir, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  with lock_lib.WorkdirLock(workdir, "overfocus train"):
    before = snapshot(workdir)
    assert f"pid {os.getpid()}" in lock_lib.holder(workdir)
    for command in (["train", "--workdir", workdir, *BASE_RUN_ARGS, "--config.num_epochs=2"],
                    ["explain", "--workdir", workdir, "--n", "2", "--images", "8", "--methods", "latent"]):
      code, _, err = run_cli(capsys, *command)
      assert_one_line_error(code, err, f"workdir {workdir} is in use by overfocus train", f"pid {os.getpid()}",
                            "since", "pass another --workdir")
      assert snapshot(workdir) == before
    code, out, err = run_cli(capsys, "eval", "--workdir", workdir)  # a reader: no lock
    assert code == 0, err
  assert lock_lib.holder(workdir) is None and not (workdir / lock_lib.LOCK_FILE).exists()  # nothing left behind


HOLDER = """
import sys, time
from overfocus_jax.train.lock import WorkdirLock
WorkdirLock(sys.argv[1], "overfocus train").acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_line(tmp_path, capsys):
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=REPO_ROOT)
  assert holder.stdout.readline().strip() == "locked"
  assert f"pid {holder.pid}" in lock_lib.holder(tmp_path)
  with pytest.raises(UserError, match=f"in use by overfocus train .*pid {holder.pid}"):
    lock_lib.WorkdirLock(tmp_path).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=30)
  assert lock_lib.holder(tmp_path) is None  # the kernel released it; its record is still in the file
  capsys.readouterr()
  with lock_lib.WorkdirLock(tmp_path, "overfocus train"):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"took over the workdir lock of overfocus train, pid {holder.pid}" in err
  with lock_lib.WorkdirLock(tmp_path):  # released properly: nothing to take over
    assert capsys.readouterr().err == ""


def test_a_sweep_skips_a_job_whose_workdir_is_in_use(tmp_path, capsys):
  from overfocus_jax.dg import sweep
  jobs = sweep.make_jobs({"colored_mnist": 3}, ["erm"], n_hparams=1, n_trials=1, test_envs=[0])
  workdir = tmp_path / jobs[0].name
  workdir.mkdir(parents=True)
  with lock_lib.WorkdirLock(workdir, "overfocus train"):
    code = sweep.main(["--out", str(tmp_path), "--datasets", "colored_mnist", "--algorithms", "erm",
                       "--test-envs", "0", "--config", str(REPO_ROOT / "experiments" / "configs" / "mnist_cnn.py")])
  out = capsys.readouterr().out
  assert code == 0 and "skipped (its workdir is in use by overfocus train" in out and "1 in use elsewhere" in out
  assert not (workdir / "out.txt").exists()  # never launched


# ----------------------------------------------------------------------------- a full or read-only disk

# The CLI in a fresh interpreter with orbax's save failing as a full disk (or a read-only one) from the N-th save on:
# what TensorStore reports when a write finds no space.
FAILING_SAVES = """
import errno, os, sys
import orbax.checkpoint as ocp
from overfocus_jax import cli
after, kind = int(os.environ["FAIL_AFTER_SAVES"]), os.environ["FAIL_KIND"]
original, calls = ocp.CheckpointManager.save, []
def save(self, step, *args, **kwargs):
  calls.append(step)
  if len(calls) > after:
    if kind == "full":
      raise ValueError(f"RESOURCE_EXHAUSTED: Error writing in OCDBT database at local file "
                       f"\\"{self.directory}/{step}.orbax-checkpoint-tmp/\\": Failed to write 1590995 bytes to file "
                       "17: No space left on device [os_error_code='28']")
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.directory))
  return original(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kind, reason", [("full", "No space left on device"), ("read-only", "Read-only file system")])
def test_a_failed_checkpoint_write_stops_in_one_line_and_a_rerun_resumes_exactly(
    kind, reason, tmp_path, uninterrupted_constant):
  workdir = tmp_path / "run"
  args = ["train", "--workdir", str(workdir), *DIGITS_RUN, "--config.num_epochs=2"]
  done = subprocess.run([sys.executable, "-c", FAILING_SAVES, *args], capture_output=True, text=True, timeout=300,
                        cwd=REPO_ROOT, env=subprocess_env({"FAIL_AFTER_SAVES": "3", "FAIL_KIND": kind}))
  assert_one_line_error(done.returncode, done.stderr, "saving a checkpoint in", reason,
                        "the last complete checkpoint is step 15", "rerun the same command")
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [5, 10, 15]
  metrics = workdir / "metrics.jsonl"
  for line in (metrics.read_text().splitlines() if metrics.exists() else []):  # whole lines only
    json.loads(line)
  assert lock_lib.holder(workdir) is None  # the process is gone, and its lock with it
  resumed = subprocess.run([sys.executable, "-m", "overfocus_jax", *args], capture_output=True, text=True,
                           timeout=300, cwd=REPO_ROOT, env=subprocess_env())
  assert resumed.returncode == 0, resumed.stderr
  got, want = read_metrics(workdir), read_metrics(uninterrupted_constant)
  assert [m["step"] for m in got] == [m["step"] for m in want] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  for a, b in zip(got, want):
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
      assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), key


def test_a_failed_metrics_write_leaves_no_half_line(tmp_path, monkeypatch):
  writer = workdir_lib.MetricWriter(tmp_path)
  writer.write(1, {"epoch": 1, "step": 1, "train_loss": 1.0})
  before = (tmp_path / workdir_lib.METRICS_FILE).read_bytes()

  class Full:  # a file that takes part of the line, then finds the disk full
    def __init__(self, f):
      self.f = f

    def write(self, data):
      self.f.write(data[:7])
      self.f.flush()
      raise OSError(28, "No space left on device")

    def __getattr__(self, name):
      return getattr(self.f, name)

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

  real_open = type(writer.jsonl).open
  monkeypatch.setattr(type(writer.jsonl), "open", lambda path, *a, **k: Full(real_open(path, *a, **k)))
  with pytest.raises(WriteError, match=r"writing the epoch's metrics to .*metrics.jsonl failed \(No space left"):
    writer.write(2, {"epoch": 2, "step": 2, "train_loss": 0.5})
  monkeypatch.undo()
  writer.close()
  assert (tmp_path / workdir_lib.METRICS_FILE).read_bytes() == before


def test_a_failed_file_write_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  path.write_text("old")
  monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
  with pytest.raises(WriteError, match="writing the run's config to .*config.json failed \\(Read-only file system"):
    workdir_lib.write_file(path, "new", "the run's config")
  assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# ----------------------------------------------------------------------------- a damaged checkpoint


def damage(checkpoint):
  for path in checkpoint.rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(os.urandom(64))


def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(tmp_path, capsys,
                                                                                           uninterrupted_constant):
  workdir = tmp_path / "run"
  code, _, err = run_cli(capsys, "train", "--workdir", workdir, *DIGITS_RUN, "--config.num_epochs=1")
  assert code == 0, err
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == STEPS_PER_EPOCH and len(steps) >= 2
  damage(workdir / "checkpoints" / str(steps[-1]))
  code, _, err = run_cli(capsys, "train", "--workdir", workdir, *DIGITS_RUN, "--config.num_epochs=2")
  assert code == 0, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and f"checkpoint {steps[-1]} (moved to " in lines[0], err
  assert f"resuming from checkpoint {steps[-2]}" in lines[0] and "Traceback" not in err
  moved = list((workdir / "checkpoints.damaged").iterdir())
  assert len(moved) == 1 and moved[0].name.startswith(f"{steps[-1]}-") and any(moved[0].rglob("*"))
  got, want = read_metrics(workdir), read_metrics(uninterrupted_constant)
  assert [m["step"] for m in got] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  for a, b in zip(got, want):
    for key in ("train_loss", "test_loss", "test_accuracy"):
      assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), key
