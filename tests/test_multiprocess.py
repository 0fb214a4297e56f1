"""Several processes (overfocus_jax/parallel.py, the CLI's --coordinator/--num-processes/--process-id): two local
processes with two CPU devices each train the same run as one process with four devices, each feeding only its own
rows; a run's workdir is read back from one process; bad settings end in one line."""

import json
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from overfocus_jax import parallel
from overfocus_jax.data import pipeline
from overfocus_jax.data.sources import load_dataset

from conftest import (BASE_RUN_ARGS, REPO_ROOT, assert_one_line_error, read_metrics, restore_final_state, run_cli,
                      subprocess_env)

COMPARED = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# One residual stage: the three processes of a comparison compile less.
ONE_STAGE = ("--config.resnet.stage_widths=(8,)", "--config.resnet.stage_sizes=(1,)",
             "--config.resnet.stage_strides=(1,)")


def train_command(workdir, *extra):
  return [sys.executable, "-m", "overfocus_jax", "train", "--workdir", str(workdir), *BASE_RUN_ARGS, *ONE_STAGE,
          *extra]


def launch(command, devices: int):
  env = subprocess_env({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)


def start_processes(workdir, num_processes: int, *extra):
  """``num_processes`` processes with 2 CPU devices each, joined on one coordinator."""
  port = free_port()
  return [launch(train_command(workdir, *extra, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                               str(num_processes), "--process-id", str(i)), devices=2)
          for i in range(num_processes)]


def finish(processes, timeout=300):
  """Each process's (exit code, stdout, stderr)."""
  results = []
  for process in processes:
    out, err = process.communicate(timeout=timeout)
    results.append((process.returncode, out, err))
  return results


def run_processes(workdir, num_processes: int, *extra):
  return finish(start_processes(workdir, num_processes, *extra))


def stop_one_process_with_sigterm(workdir, *extra) -> int:
  """Starts the two processes, sends SIGTERM to process 1 alone once a few steps are saved, and returns the step
  at which both stopped: they agree on it, save it together and exit 0."""
  processes = start_processes(workdir, 2, *extra)
  deadline = time.monotonic() + 240
  while not [p for p in (workdir / "checkpoints").glob("*") if p.name.isdigit() and int(p.name) >= 3]:
    assert time.monotonic() < deadline and all(p.poll() is None for p in processes), finish(processes)
    time.sleep(0.01)
  processes[1].send_signal(signal.SIGTERM)
  results = finish(processes)
  steps = set()
  for code, _, err in results:
    assert code == 0, err
    steps.add(int(err.split("stopped by SIGTERM at step ")[1].split(";")[0]))
  assert len(steps) == 1, results
  return steps.pop()


@pytest.mark.parametrize("stream", ["off", "on"])
def test_two_processes_train_the_run_of_one_process_with_four_devices(tmp_path, stream):
  """The global batch of 64 is 2 × 32 rows, one share per process (the host stream reads only its rows; the device
  stream builds them on its devices). Had both processes fed the same rows, the global batch would differ from the
  one-process run's, and so would every number."""
  args = ("--config.num_epochs=1", f"--config.data_on_device={stream}", "--config.checkpoint_every_steps=8")
  reference = launch(train_command(tmp_path / "one", *args), devices=4)
  if stream == "off":  # a preemption too: SIGTERM reaches one process; both save the same step and stop
    stopped = stop_one_process_with_sigterm(tmp_path / "two", *args)
    assert 3 <= stopped < 22
  two = run_processes(tmp_path / "two", 2, *args)
  out, err = reference.communicate(timeout=300)
  assert reference.returncode == 0, err
  for code, _, err in two:
    assert code == 0, err
  summary = json.loads(two[0][1].strip().splitlines()[-1])
  assert summary["processes"] == 2 and summary["devices"] == 4 and summary["data_on_device"] == (stream == "on")
  assert "epoch" not in two[1][1] and "{" not in two[1][1]  # process 0 alone speaks for the run
  for got, want in zip(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"), strict=True):
    for key in COMPARED:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
  two_state, two_data = restore_final_state(tmp_path / "two")  # read back from this one-device process
  one_state, one_data = restore_final_state(tmp_path / "one")
  chex.assert_trees_all_close(two_state.params, one_state.params, rtol=1e-4, atol=1e-6)
  assert two_data == one_data and int(two_state.step) == 22


def test_each_process_reads_only_its_rows_of_every_batch():
  """Process i of P reads rows [i·B/P, (i+1)·B/P) of each global batch, augmented as in the whole stream."""
  dataset = load_dataset("digits")
  make = lambda rows=None: pipeline.make_train_iterator(dataset, batch_size=64, seed=3, augment=True,
                                                        normalized=False, rows=rows)
  whole, shares = make(), [make(slice(0, 16)), make(slice(16, 48)), make(slice(48, 64))]
  for _ in range(25):  # past the end of the first epoch (22 batches)
    batch = next(whole)
    parts = [next(share) for share in shares]
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
  assert shares[1].get_state() == whole.get_state()
  assert parallel.process_rows(64, parallel.make_mesh()) == slice(0, 64)


def test_cluster_environments_are_detected_only_with_several_processes():
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
  assert parallel.detected_cluster({**slurm, "SLURM_NTASKS": "2"}) == "SLURM"
  assert parallel.detected_cluster({**slurm, "SLURM_NTASKS": "1"}) is None
  assert parallel.detected_cluster({"TPU_WORKER_HOSTNAMES": "a,b,c,d", "TPU_WORKER_ID": "1"}) == "TPU pod"
  assert parallel.detected_cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4",
                                    "JAX_PROCESS_ID": "0"}) == "JAX"
  assert parallel.detected_cluster({}) is None


@pytest.mark.parametrize("flags, fragments", [
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "5"], ["--process-id 5",
                                                                                         "from 0 to 1"]),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], ["go together", "--process-id"]),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], ["HOST:PORT"]),
    (["--num-processes", "0", "--coordinator", "h:1", "--process-id", "0"], ["--num-processes 0"]),
    (["--distributed-timeout", "0"], ["--distributed-timeout"]),
])
def test_bad_process_settings_are_one_line(tmp_path, capsys, flags, fragments):
  code, _, err = run_cli(capsys, "train", "--workdir", tmp_path / "run", *BASE_RUN_ARGS, *flags)
  assert_one_line_error(code, err, *fragments)
  assert not (tmp_path / "run").exists()


def test_a_coordinator_that_never_answers_is_one_line_after_the_timeout(tmp_path):
  start = time.monotonic()
  process = launch(train_command(tmp_path / "run", "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes",
                                 "2", "--process-id", "1", "--distributed-timeout", "3"), devices=2)
  _, err = process.communicate(timeout=120)
  assert_one_line_error(process.returncode, err, "not every process joined coordinator", "within 3 s",
                        "--distributed-timeout")
  assert time.monotonic() - start < 60


def test_a_batch_that_does_not_divide_over_every_process_s_devices_is_one_line(tmp_path):
  for code, _, err in run_processes(tmp_path / "run", 2, "--config.batch_size=66"):
    ours = "".join(line for line in err.splitlines(keepends=True) if "overfocus" in line)  # gloo prints too
    assert_one_line_error(code, ours, "batch_size=66", "4 devices")
    assert "Traceback" not in err
