"""Sweeps: jobs from a config file's get_sweep(), the local, parallel and SLURM (submitit's local executor)
launchers on a tiny sweep, the launcher killed midway, status, results, and the bad input."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from overfocus_jax.errors import UserError
from overfocus_jax.sweeps import grid, jobs, launchers, results

from conftest import REPO_ROOT, assert_one_line_error, run_cli, subprocess_env

TINY_SWEEP = '''
from overfocus_jax.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "digits"
  config.resnet.stem_features = 4
  config.resnet.stage_widths = (8,)
  config.resnet.stage_sizes = (1,)
  config.resnet.stage_strides = (2,)
  config.num_epochs = 2
  config.augment = False
  return config


def get_sweep():
  return [{"seed": seed} for seed in range(SEEDS)]
'''


def tiny_sweep(tmp_path, seeds=2) -> pathlib.Path:
  path = tmp_path / "tiny_sweep.py"
  path.write_text(TINY_SWEEP.replace("SEEDS", str(seeds)))
  return path


def sweep_cli(*args, cpus=None, check=True):
  """``overfocus sweep ...`` in a subprocess (optionally pinned to ``cpus``): its exit code and output."""
  command = [sys.executable, "-m", "overfocus_jax", "sweep", *map(str, args)]
  if cpus is not None:
    command = jobs.child_command(command, cpus)
  done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env(), timeout=600)
  if check:
    assert done.returncode == 0, done.stdout + done.stderr
  return done


def epochs(workdir: pathlib.Path) -> list[dict]:
  """metrics.jsonl without its timings: what a run computed."""
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in line.items() if "time" not in k and "per_s" not in k} for line in lines]


# ------------------------------------------------------------------------------------------------------ the jobs


def test_jobs_from_a_sweep_are_named_by_their_fields():
  made = grid.jobs_from_sweep([{"regularizer.name": "sgdrop", "seed": 1}, {"name": "mine", "seed": 2},
                               {"vgg.width": 0.5, "resnet.stage_widths": (8, 16)}], "c.py", [("augment", "false")])
  assert [job.name for job in made] == ["regularizer=sgdrop-seed=1", "mine", "width=0.5-stage_widths=_8_16"]
  assert made[0].overrides == (("regularizer.name", "sgdrop"), ("seed", "1"), ("augment", "false"))
  assert made[2].overrides[1] == ("resnet.stage_widths", "(8,16)")
  assert len(grid.job_name({f"field{i}": i for i in range(40)})) == grid.MAX_NAME


def test_a_run_may_name_another_config_file(tmp_path):
  (tmp_path / "configs").mkdir()
  for name in ("sweep.py", "configs/other.py"):
    (tmp_path / name).write_text("")
  made = grid.jobs_from_sweep([{"seed": 0}, {"config": "configs/other.py", "seed": 0}], str(tmp_path / "sweep.py"))
  assert [job.name for job in made] == ["seed=0", "config=other-seed=0"]
  assert made[0].config == str(tmp_path / "sweep.py") and made[1].config == str(tmp_path / "configs" / "other.py")
  assert ("config", "configs/other.py") not in made[1].overrides
  with pytest.raises(UserError, match="run 1's config 'nope.py' is not a file beside"):
    grid.jobs_from_sweep([{"config": "nope.py"}], str(tmp_path / "sweep.py"))


@pytest.mark.parametrize("sweep, fragment", [
    ({"seed": 1}, "returned dict, not a list of dicts"),
    ([{"seed": 1}, {"seed": 1}], "runs 1 and 2 are both named 'seed=1'"),
    ([{"name": "a b"}], "is not a folder name"),
    ([], "returned no runs"),
])
def test_a_bad_sweep_is_one_line(sweep, fragment):
  with pytest.raises(UserError, match=fragment):
    grid.jobs_from_sweep(sweep, "c.py")


def test_cpu_shares_split_the_cores():
  assert launchers.cpu_shares(2, [0, 1, 2, 3, 4]) == [[0, 1, 2], [3, 4]]
  assert launchers.cpu_shares(3, [0, 1]) == [[0], [1], [0]]
  assert launchers.Slot(gpu="3").env()["CUDA_VISIBLE_DEVICES"] == "3"
  assert launchers.Slot(cores=(0, 1)).env()["OMP_NUM_THREADS"] == "2"


# ------------------------------------------------------------------------------------------------ the launchers


@pytest.mark.slow
def test_parallel_equals_local_at_the_same_core_count_and_a_rerun_skips_what_is_done(tmp_path):
  """Two workers of one core each give the records a local sweep gives on one core, bit for bit (a run's last float
  bits depend on its core count: XLA:CPU splits its reductions over the threads it has)."""
  config = tiny_sweep(tmp_path)
  sweep_cli("run", "--config", config, "--out", tmp_path / "local", cpus=[min(os.sched_getaffinity(0))])
  done = sweep_cli("run", "--config", config, "--out", tmp_path / "parallel", "--launcher", "parallel",
                   "--workers", "2")
  assert "parallel: 2 workers on CPU cores" in done.stdout and "2 done" in done.stdout
  for name in ("seed=0", "seed=1"):
    assert epochs(tmp_path / "local" / name) == epochs(tmp_path / "parallel" / name)
    assert (tmp_path / "parallel" / name / "done").exists()
  again = sweep_cli("run", "--config", config, "--out", tmp_path / "parallel", "--launcher", "parallel")
  assert again.stdout.count("skipped (done)") == 2
  listing = json.loads((tmp_path / "parallel" / "sweep.json").read_text())
  assert [job["name"] for job in listing["jobs"]] == ["seed=0", "seed=1"]
  records = results.read(tmp_path / "parallel")
  assert [(r["job"], r["fields"], r["epochs"]) for r in records] == [("seed=0", {"seed": "0"}, 2),
                                                                     ("seed=1", {"seed": "1"}, 2)]
  status = sweep_cli("status", tmp_path / "parallel").stdout
  assert "seed=0  done" in status and "2 runs: 2 done, 0 running, 0 failed, 0 pending" in status


@pytest.mark.slow
def test_a_killed_launcher_leaves_runs_that_resume_and_none_trains_twice(tmp_path):
  config = tiny_sweep(tmp_path, seeds=3)
  out = tmp_path / "sweep"
  command = [sys.executable, "-m", "overfocus_jax", "sweep", "run", "--config", str(config), "--out", str(out),
             "--launcher", "parallel", "--workers", "2", "--config.num_epochs=6"]
  launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO_ROOT,
                              env=subprocess_env(), start_new_session=True)
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline and not any(
      (path / "metrics.jsonl").exists() and (path / "metrics.jsonl").read_text().count("\n") >= 2
      for path in out.glob("seed=*")):
    time.sleep(0.5)
  os.kill(launcher.pid, signal.SIGKILL)  # the runs get SIGTERM from the kernel: each saves and exits
  launcher.wait()
  while time.monotonic() < deadline and any(jobs.state(path) == "running" for path in out.glob("seed=*")):
    time.sleep(0.5)
  assert not all(jobs.state(out / f"seed={s}") == "done" for s in range(3))  # killed midway
  rerun = sweep_cli("run", "--config", config, "--out", out, "--config.num_epochs=6")
  assert rerun.stdout.count("done (") + rerun.stdout.count("skipped (done)") == 3, rerun.stdout
  for seed in range(3):
    lines = epochs(out / f"seed={seed}")
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4, 5, 6]  # every epoch once: nothing trained twice


@pytest.mark.slow
def test_slurm_through_submitits_local_executor(tmp_path):
  config = tiny_sweep(tmp_path)
  done = sweep_cli("run", "--config", config, "--out", tmp_path / "sweep", "--launcher", "slurm",
                   "--slurm-cluster", "local")
  assert "slurm: submitted 2 tasks" in done.stdout and "2 done" in done.stdout, done.stdout
  assert all(jobs.state(tmp_path / "sweep" / f"seed={s}") == "done" for s in range(2))


def test_slurm_dry_run_prints_the_submission(tmp_path, capsys):
  config = tiny_sweep(tmp_path, seeds=3)
  code, out, _ = run_cli(capsys, "sweep", "run", "--config", config, "--out", tmp_path / "sweep", "--launcher",
                         "slurm", "--slurm-partition", "gpu", "--slurm-time", "90", "--slurm-gpus", "2",
                         "--slurm-array-parallelism", "2", "--dry-run")
  assert code == 0 and not (tmp_path / "sweep").exists()
  for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=2",
               "#SBATCH --signal=USR2@120", "-m submitit.core._submit", "# 3 array tasks, one per run:"):
    assert line in out, line
  assert out.count("-m overfocus_jax train --workdir") == 3


@pytest.mark.parametrize("args, fragments", [
    (("--launcher", "slurm"), ("needs SLURM's sbatch", "--dry-run")),
    (("--workers", "2"), ("--workers is for --launcher parallel",)),
    (("--launcher", "parallel", "--workers", "0"), ("--workers=0 must be at least 1",)),
    (("--slurm-partition", "gpu"), ("--slurm-partition is for --launcher slurm",)),
    (("--config.seed=abc",), ("run seed=0:", "--config.seed='abc'")),
    (("--only", "seed=9*"), ("--only seed=9* matches none of the sweep's 2 runs", "e.g. seed=0")),
])
def test_bad_launches_are_one_line(tmp_path, capsys, args, fragments):
  code, _, err = run_cli(capsys, "sweep", "run", "--config", tiny_sweep(tmp_path), "--out", tmp_path / "sweep", *args)
  assert_one_line_error(code, err, *fragments)
  assert not (tmp_path / "sweep").exists()


def test_only_runs_the_matching_runs(tmp_path, capsys):
  config = tiny_sweep(tmp_path, seeds=3)
  code, out, _ = run_cli(capsys, "sweep", "run", "--config", config, "--out", tmp_path / "sweep", "--only", "seed=1",
                         "seed=2", "--dry-run")
  assert code == 0 and out.count("-m overfocus_jax train --workdir") == 2 and "seed=0" not in out


def test_a_launch_of_part_of_a_sweep_lists_the_whole_sweep(tmp_path, capsys, monkeypatch):
  """--only runs part of the sweep; sweep.json still lists every run, so status and the results see them all."""
  writes_summary = "import pathlib, sys; (pathlib.Path(sys.argv[1]) / 'summary.json').write_text('{}')"
  monkeypatch.setattr(jobs.Job, "command", lambda self, out: [sys.executable, "-c", writes_summary, str(out / self.name)])
  config, out = tiny_sweep(tmp_path, seeds=3), tmp_path / "sweep"
  code, _, _ = run_cli(capsys, "sweep", "run", "--config", config, "--out", out, "--only", "seed=1")
  assert code == 0
  assert [job["name"] for job in json.loads((out / "sweep.json").read_text())["jobs"]] == ["seed=0", "seed=1",
                                                                                          "seed=2"]
  code, text, _ = run_cli(capsys, "sweep", "status", out)
  assert code == 0 and "seed=1  done" in text and "2 pending" in text, text


def test_status_of_no_sweep_and_a_config_without_get_sweep(tmp_path, capsys):
  code, _, err = run_cli(capsys, "sweep", "status", tmp_path / "nothing")
  assert_one_line_error(code, err, "no sweep folder")
  plain = tmp_path / "plain.py"
  plain.write_text("from overfocus_jax.configs.default import get_config\n")
  code, _, err = run_cli(capsys, "sweep", "run", "--config", plain, "--out", tmp_path / "sweep")
  assert_one_line_error(code, err, "defines no get_sweep()")


def test_a_failed_job_is_marked_and_shown(tmp_path, capsys, monkeypatch):
  fail = [sys.executable, "-c", "import sys; sys.exit('boom')"]
  monkeypatch.setattr(jobs.Job, "command", lambda self, out: fail)
  code, out, _ = run_cli(capsys, "sweep", "run", "--config", tiny_sweep(tmp_path), "--out", tmp_path / "sweep")
  assert code == 1 and out.count("failed, exit 1: boom") == 2
  code, out, _ = run_cli(capsys, "sweep", "status", tmp_path / "sweep")
  assert code == 0 and "seed=0  failed  exit 1: boom" in out and "2 failed, 0 pending" in out


REQUEUE = '''
import pathlib, sys, threading, time
from overfocus_jax.sweeps import jobs, launchers
config, out = sys.argv[1], pathlib.Path(sys.argv[2])
job = jobs.Job(name="run", overrides=(("num_epochs", "6"),), config=config)
task = launchers.SlurmTask(job, out)
outcome = []
thread = threading.Thread(target=lambda: outcome.append(task()))
thread.start()
metrics = out / "run" / "metrics.jsonl"
while not (metrics.exists() and metrics.read_text().count("\\n") >= 1):
  time.sleep(0.2)
requeued = task.checkpoint()  # what submitit calls on SLURM's signal
thread.join()
print("first:", outcome[0])
print("second:", requeued.function())
'''


@pytest.mark.slow
def test_a_slurm_task_saves_its_run_on_the_signal_and_its_requeued_copy_resumes_it(tmp_path):
  script = tmp_path / "requeue.py"
  script.write_text(REQUEUE)
  done = subprocess.run([sys.executable, str(script), str(tiny_sweep(tmp_path)), str(tmp_path / "out")],
                        capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env(), timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "first: stopped before its last epoch" in done.stdout and "second: done" in done.stdout, done.stdout
  assert [line["epoch"] for line in epochs(tmp_path / "out" / "run")] == [1, 2, 3, 4, 5, 6]


def test_a_dry_run_piped_into_a_reader_that_stops_early_ends_without_a_traceback(tmp_path):
  """``overfocus sweep run ... --dry-run | head -1``: the closed pipe is a quiet exit 141, not a traceback."""
  reader = subprocess.Popen([sys.executable, "-m", "overfocus_jax", "sweep", "run", "--config",
                             str(tiny_sweep(tmp_path, seeds=3)), "--out", str(tmp_path / "sweep"), "--dry-run"],
                            cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  reader.stdout.close()  # the reader is gone before the first line is written
  _, err = reader.communicate(timeout=120)
  assert reader.returncode == 141 and b"Traceback" not in err, err.decode()
