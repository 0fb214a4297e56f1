"""DomainBed's sweep (overfocus_jax.dg.sweep): the job list and the hparams draws against DomainBed's own
computation written out here, the overrides as ``overfocus train`` reads them, one real tiny sweep (one run of a
small residual CNN on colored_mnist for one epoch) that the tables read, resuming, failed runs, and bad input.
"""

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from overfocus_jax import config as config_lib
from overfocus_jax.dg import sweep, tables
from overfocus_jax.sweeps import jobs as sweep_jobs

from conftest import REPO_ROOT, assert_one_line_error, subprocess_env

TINY = ("--config.model=resnet", "--config.resnet.stem_features=8", "--config.resnet.stage_widths=(8,16)",
        "--config.resnet.stage_sizes=(1,1)", "--config.resnet.stage_strides=(2,2)", "--config.optimizer=adam",
        "--config.learning_rate=1e-3", "--config.augment=false")


def domainbed_seed_hash(*args):
  """DomainBed's misc.seed_hash, written out."""
  return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def domainbed_random_hparams(algorithm, dataset, seed):
  """DomainBed's hparams_registry.random_hparams for these algorithms, its registry's lines in its order."""
  small_images = ["Debug28", "RotatedMNIST", "ColoredMNIST"]
  hparams = {}

  def _hparam(name, random_val_fn):
    hparams[name] = random_val_fn(np.random.RandomState(domainbed_seed_hash(seed, name)))

  _hparam("resnet_dropout", lambda r: r.choice([0., 0.1, 0.5]))  # drawn there, unused here: changes no other draw
  if algorithm == "RSC":
    _hparam("rsc_f_drop_factor", lambda r: r.uniform(0, 0.5))
    _hparam("rsc_b_drop_factor", lambda r: r.uniform(0, 0.5))
  elif algorithm == "IRM":
    _hparam("irm_lambda", lambda r: 10**r.uniform(-1, 5))
    _hparam("irm_penalty_anneal_iters", lambda r: int(10**r.uniform(0, 4)))
  elif algorithm == "VREx":
    _hparam("vrex_lambda", lambda r: 10**r.uniform(-1, 5))
    _hparam("vrex_penalty_anneal_iters", lambda r: int(10**r.uniform(0, 4)))
  if dataset in small_images:
    _hparam("lr", lambda r: 10**r.uniform(-4.5, -2.5))
    _hparam("weight_decay", lambda r: 0.)
    _hparam("batch_size", lambda r: int(2**r.uniform(3, 9)))
  else:
    _hparam("lr", lambda r: 10**r.uniform(-5, -3.5))
    _hparam("weight_decay", lambda r: 10**r.uniform(-6, -2))
    _hparam("batch_size", lambda r: int(2**r.uniform(3, 5.5)))
  return hparams


def all_test_env_combinations(n):
  """DomainBed's sweep.all_test_env_combinations."""
  for i in range(n):
    yield [i]
    for j in range(i + 1, n):
      yield [i, j]


# ------------------------------------------------------------------------------------------------ jobs and draws


def test_test_environments_as_domainbed():
  assert sweep.test_env_sets(3, None, False) == [(0,), (1,), (2,)]  # --single_test_envs
  assert sweep.test_env_sets(3, None, True) == [tuple(c) for c in all_test_env_combinations(3)]
  assert sweep.test_env_sets(3, [2], True) == [(2,), (0, 2), (1, 2)]
  assert sweep.test_env_sets(6, [4, 1], False) == [(4,), (1,)]


def test_job_list_order_names_and_seeds():
  jobs = sweep.make_jobs({"colored_mnist": 3}, ["erm", "irm"], n_hparams=2, n_trials=2, leave_one_out=True)
  assert jobs == sweep.make_jobs({"colored_mnist": 3}, ["erm", "irm"], n_hparams=2, n_trials=2, leave_one_out=True)
  assert len(jobs) == 2 * 2 * 6 * 2 and len({job.name for job in jobs}) == len(jobs)
  # DomainBed's loops: trial seed, dataset, algorithm, test envs, hparams seed
  assert [job.name for job in jobs[:5]] == ["colored_mnist-erm-te0-h0-t0", "colored_mnist-erm-te0-h1-t0",
                                            "colored_mnist-erm-te0_1-h0-t0", "colored_mnist-erm-te0_1-h1-t0",
                                            "colored_mnist-erm-te0_2-h0-t0"]
  assert jobs[12].name == "colored_mnist-irm-te0-h0-t0" and jobs[24].name == "colored_mnist-erm-te0-h0-t1"
  for job in jobs:
    assert job.seed == domainbed_seed_hash("colored_mnist", job.algorithm, list(job.test_envs), job.hparams_seed,
                                           job.trial_seed)
    assert dict(job.overrides)["seed"] == job.seed and dict(job.overrides)["environments.test_envs"] == job.test_envs
    assert dict(job.overrides)["environments.trial_seed"] == job.trial_seed  # each trial splits the data anew
  job = next(j for j in jobs if j.name == "colored_mnist-irm-te1_2-h1-t1")
  assert job.seed == int(hashlib.md5(b"('colored_mnist', 'irm', [1, 2], 1, 1)").hexdigest(), 16) % 2**31
  spec_job = sweep.make_jobs({"colored_mnist:idx:/data/mnist": 3}, ["erm"], 1, 1, [0])[0]
  assert re.fullmatch(r"colored_mnist_idx_data_mnist-[0-9a-f]{8}-erm-te0-h0-t0", spec_job.name)


def test_hparams_seed_zero_overrides_nothing():
  for algorithm in sweep.ALGORITHMS:
    assert sweep.hparam_overrides(algorithm, "colored_mnist", 0, 2, 2) == {}
  job = sweep.make_jobs({"colored_mnist": 3}, ["irm"], 1, 1, [0])[0]
  assert dict(job.overrides) == {"dataset": "colored_mnist", "objective.name": "irm", "regularizer.name": "none",
                                 "environments.test_envs": (0,), "environments.trial_seed": 0, "seed": job.seed}


@pytest.mark.parametrize("algorithm, theirs", [("irm", "IRM"), ("vrex", "VREx"), ("rsc_domainbed", "RSC"),
                                               ("erm", "ERM")])
def test_draws_are_domainbeds(algorithm, theirs):
  fields = {"irm_lambda": "objective.irm.penalty_weight", "irm_penalty_anneal_iters": "objective.irm.anneal_steps",
            "vrex_lambda": "objective.vrex.penalty_weight", "vrex_penalty_anneal_iters": "objective.vrex.anneal_steps",
            "rsc_f_drop_factor": "regularizer.rsc_domainbed.feature_drop",
            "rsc_b_drop_factor": "regularizer.rsc_domainbed.batch_drop", "lr": "learning_rate",
            "weight_decay": "weight_decay"}
  for dataset, theirs_dataset in (("colored_mnist", "ColoredMNIST"), ("imagefolder:/data/pacs:domains", "PACS")):
    for hparams_seed, trial_seed in ((1, 0), (3, 2)):
      expected = domainbed_random_hparams(theirs, theirs_dataset, domainbed_seed_hash(hparams_seed, trial_seed))
      ours = sweep.hparam_overrides(algorithm, dataset, hparams_seed, trial_seed, train_envs=2)
      assert ours == {**{fields[k]: v for k, v in expected.items() if k in fields},
                      "batch_size": 2 * expected["batch_size"]}
  assert sweep.hparam_overrides("irm", "colored_mnist", 1, 0, 2) != sweep.hparam_overrides("irm", "colored_mnist", 1,
                                                                                          1, 2)


def test_our_own_draws_are_in_their_ranges():
  for hparams_seed in range(1, 30):
    rsc = sweep.hparam_overrides("rsc", "rotated_mnist", hparams_seed, 0, 5)
    mass = sweep.hparam_overrides("sgdrop", "rotated_mnist", hparams_seed, 0, 5)["regularizer.sgdrop.mass"]
    assert 0 <= rsc["regularizer.rsc.spatial_fraction"] < 0.5 and 0 <= rsc["regularizer.rsc.channel_fraction"] < 0.5
    assert 0.2 <= mass < 0.8 and rsc["batch_size"] % 5 == 0


def test_overrides_read_back_as_the_job_set_them():
  job = next(j for j in sweep.make_jobs({"colored_mnist": 3}, ["irm"], 2, 1, [1], leave_one_out=True, epochs=3)
             if j.test_envs == (0, 1) and j.hparams_seed == 1)
  config = config_lib.build_config(str(sweep.default_config_path()), sweep.config_pairs(job, [("augment", "false")]))
  overrides = dict(job.overrides)
  assert config.environments.test_envs == (0, 1) and config.seed == job.seed and config.num_epochs == 3
  assert config.learning_rate == overrides["learning_rate"] and config.batch_size == overrides["batch_size"]
  assert config.objective.irm.penalty_weight == overrides["objective.irm.penalty_weight"]
  assert config.objective.name == "irm" and config.dataset == "colored_mnist" and config.augment is False


# ------------------------------------------------------------------------------------------------ running


@pytest.fixture
def cpu_children(monkeypatch):
  """The runs' subprocesses on one CPU device, like the other CLI tests' (conftest.subprocess_env)."""
  for name, value in subprocess_env().items():
    monkeypatch.setenv(name, value)


def run_main(capsys, *argv):
  capsys.readouterr()
  code = sweep.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_tiny_sweep_resumes_and_makes_a_table(tmp_path, capsys, cpu_children):
  out_dir = (tmp_path / "sweep").resolve()  # as the sweep names it
  argv = ("--out", out_dir, "--algorithms", "erm", "--test-envs", "1", "--epochs", "1", *TINY)
  code, out, err = run_main(capsys, *argv)
  run = out_dir / "colored_mnist-erm-te1-h0-t0"
  assert code == 0, out + err + (run / "err.txt").read_text()
  assert re.search(r"\[1/1\] colored_mnist-erm-te1-h0-t0: done \(\d+ s\)", out), out
  assert f"python -m overfocus_jax.dg.tables {out_dir}" in out
  assert (run / "done").is_file()
  records = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
  seed = domainbed_seed_hash("colored_mnist", "erm", [1], 0, 0)
  assert len(records) == 1 and records[0]["step"] > 0 and records[0]["epoch"] == 1
  assert records[0]["args"] == {"algorithm": "erm", "dataset": "colored_mnist", "test_envs": [1], "hparams_seed": 0,
                                "trial_seed": 0, "seed": seed, "output_dir": str(run)}
  hparams = records[0]["hparams"]
  default = config_lib.load_config_file(sweep.default_config_path())
  assert hparams["learning_rate"] == 1e-3 and hparams["model"] == "resnet"
  assert hparams["batch_size"] == default.batch_size and hparams["num_epochs"] == 1  # seed 0: the config's
  assert hparams["objective.name"] == "erm" and hparams["resnet.stage_widths"] == [8, 16]
  assert json.loads((run / "config.json").read_text())["seed"] == seed
  assert all(0 <= records[0][f"env{i}_{s}_acc"] <= 1 for i in range(3) for s in ("in", "out"))

  log = (run / "out.txt").read_text()
  code, out, _ = run_main(capsys, *argv)
  assert code == 0 and "colored_mnist-erm-te1-h0-t0: skipped (done)" in out
  assert (run / "out.txt").read_text() == log  # not launched again
  code, out, _ = run_main(capsys, *argv, "--dry-run")
  assert code == 0 and out == ""  # nothing left to run

  capsys.readouterr()
  assert tables.main([str(out_dir), "--selection", "training_domain"]) == 0
  table = capsys.readouterr().out
  cell = f"{100 * records[0]['env1_in_acc']:.1f} ± 0.0"
  assert f"| erm | X | {cell} | X | X |" in table, table


def test_dry_run_prints_the_commands_only(tmp_path, capsys):
  out_dir = (tmp_path / "sweep").resolve()
  code, out, _ = run_main(capsys, "--out", out_dir, "--algorithms", "erm", "irm", "--test-envs", "0",
                          "--n-hparams", "2", "--dry-run", "--config.augment=false")
  lines = out.strip().splitlines()
  assert code == 0 and len(lines) == 4 and not out_dir.exists()
  assert all(line.startswith(f"{sys.executable} -m overfocus_jax train --workdir {out_dir}/") for line in lines)
  assert "--config.objective.name=irm" in lines[3] and "--config.learning_rate=" in lines[3]
  assert "--config.learning_rate=" not in lines[0] and lines[0].endswith("--config.augment=false")
  assert f"--config.seed={domainbed_seed_hash('colored_mnist', 'erm', [0], 1, 0)}" in lines[1]


def test_steps_become_the_fewest_whole_epochs_of_each_runs_layout(tmp_path, capsys):
  """colored_mnist on mnist5k: 1,334 in-split digits per environment. Two training environments share a batch of
  128 (64 each): 20 steps an epoch; a leave-one-out run's one environment takes all 128: 10 steps an epoch."""
  code, out, _ = run_main(capsys, "--out", tmp_path / "sweep", "--algorithms", "erm", "--test-envs", "0",
                          "--leave-one-out", "--steps", "101", "--dry-run")
  epochs = [re.search(r"--config\.num_epochs=(\d+)", line).group(1) for line in out.strip().splitlines()]
  assert code == 0 and epochs == ["6", "11", "11"]  # ⌈101/20⌉, then ⌈101/10⌉ for te0_1 and te0_2
  code, out, _ = run_main(capsys, "--out", tmp_path / "sweep", "--algorithms", "erm", "--test-envs", "0",
                          "--steps", "101", "--dry-run", "--config.environments.balanced=false")
  assert code == 0 and "--config.num_epochs=6" in out  # unbalanced: 2,668 digits // 128 = 20 steps an epoch


def test_a_failed_run_does_not_stop_the_sweep(tmp_path, capsys, monkeypatch):
  fail = [sys.executable, "-c", "import sys; print('first', file=sys.stderr); sys.exit('boom: the last line')"]
  monkeypatch.setattr(sweep_jobs.Job, "command", lambda self, out: fail)
  out_dir = tmp_path / "sweep"
  code, out, _ = run_main(capsys, "--out", out_dir, "--algorithms", "erm", "vrex", "--test-envs", "0")
  assert code == 1
  assert out.count("failed, exit 1: boom: the last line") == 2, out
  assert "0 done, 0 skipped (done before), 2 failed" in out
  assert not list(out_dir.glob("*/done")) and not list(out_dir.glob("*/results.jsonl"))
  assert sorted(p.parent.name for p in out_dir.glob("*/failed")) == ["colored_mnist-erm-te0-h0-t0",
                                                                      "colored_mnist-vrex-te0-h0-t0"]
  code, out, _ = run_main(capsys, "--out", out_dir, "--algorithms", "erm", "--test-envs", "0")
  assert code == 1 and "skipped (failed before: exit 1: boom: the last line" in out  # not launched again
  code, out, _ = run_main(capsys, "--out", out_dir, "--algorithms", "erm", "--test-envs", "0", "--retry-failed")
  assert code == 1 and "[1/1] colored_mnist-erm-te0-h0-t0: failed, exit 1" in out  # launched again when asked


def test_a_stopped_run_is_not_done_and_an_interrupted_one_stops_the_sweep(tmp_path, capsys, monkeypatch):
  """Exit 0 without summary.json (SIGTERM/SIGUSR1 before the last epoch): not done, the sweep goes on; exit 130
  (SIGINT, however it reached the run): the sweep stops, to be resumed."""
  stopped = [sys.executable, "-c", "import sys; print('overfocus: stopped by SIGTERM at step 7', file=sys.stderr)"]
  monkeypatch.setattr(sweep_jobs.Job, "command", lambda self, out: stopped)
  out_dir = tmp_path / "sweep"
  code, out, _ = run_main(capsys, "--out", out_dir, "--algorithms", "erm", "vrex", "--test-envs", "0")
  assert code == 1 and out.count("stopped before its last epoch") == 2, out
  assert "stopped by SIGTERM at step 7" in out and not list(out_dir.glob("*/done"))
  interrupted = [sys.executable, "-c", "import sys; sys.exit(130)"]
  monkeypatch.setattr(sweep_jobs.Job, "command", lambda self, out: interrupted)
  code, out, err = run_main(capsys, "--out", out_dir, "--algorithms", "erm", "vrex", "--test-envs", "0")
  assert code == 130 and "[2/2]" not in out and "interrupted" in err


@pytest.mark.parametrize("args, fragments", [
    (("--algorithms", "erm", "dann"), ("unknown algorithm 'dann'", "erm, irm, vrex")),
    (("--datasets", "digits"), ("dataset 'digits' has no environments", "colored_mnist")),
    (("--test-envs", "3"), ("--test-envs 3 is not an environment of 'colored_mnist'", "0 to 2")),
    (("--config.no_such_field=1",), ("unknown config field 'config.no_such_field'",)),
    (("--config.learning_rate=abc",), ("--config.learning_rate='abc'",)),
    (("--config.seed=3",), ("--config.seed is set by the sweep", "--n-trials")),
    (("--config.environments.test_envs=0",), ("set by the sweep", "--test-envs")),
    (("--epochs", "2", "--config.num_epochs=3"), ("both --epochs and --config.num_epochs",)),
    (("--n-hparams", "0"), ("--n-hparams=0 must be at least 1",)),
    (("--steps", "0"), ("--steps=0 must be at least 1",)),
    (("--steps", "100", "--epochs", "2"), ("both --epochs and --steps",)),
    (("--steps", "100", "--config.num_epochs=3"), ("both --steps and --config.num_epochs",)),
    (("--bogus",), ("unknown argument '--bogus'",)),
    (("--config", "no/such/config.py"), ("not found",)),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, fragments):
  code, out, err = run_main(capsys, "--out", tmp_path / "sweep", *args)
  assert_one_line_error(code, err, *fragments)
  assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("args, fragments", [
    # each of colored_mnist's environments holds 1,334 in-split examples of mnist5k's 5,000 digits
    (("--config.batch_size=4000",), ("has 1334 examples, fewer than the 2000", "--config.batch_size to at most 2668")),
])
def test_batches_that_do_not_fit_the_environments_fail_before_the_first_run(tmp_path, capsys, args, fragments):
  code, out, err = run_main(capsys, "--out", tmp_path / "sweep", "--algorithms", "erm", *args)
  assert_one_line_error(code, err, *fragments)
  assert out == "" and not (tmp_path / "sweep").exists()
  code, out, err = run_main(capsys, "--out", tmp_path / "sweep", "--algorithms", "erm", *args, "--dry-run")
  assert_one_line_error(code, err, *fragments)


def test_leave_one_out_needs_three_environments(tmp_path, capsys, monkeypatch):
  two_envs = type("TwoEnvs", (), {"domain_names": ("a", "b")})()
  monkeypatch.setattr(sweep, "environment_datasets", lambda datasets, config: {"two_envs": two_envs})
  code, _, err = run_main(capsys, "--out", tmp_path / "sweep", "--leave-one-out")
  assert_one_line_error(code, err, "--leave-one-out needs 3 or more environments and 'two_envs' has 2")


def test_module_entry_point_errors_without_traceback(tmp_path):
  result = subprocess.run([sys.executable, "-m", "overfocus_jax.dg.sweep", "--out", str(tmp_path), "--algorithms",
                           "foo"], capture_output=True, text=True, cwd=REPO_ROOT, env=subprocess_env(), timeout=60)
  assert_one_line_error(result.returncode, result.stderr, "unknown algorithm 'foo'")
