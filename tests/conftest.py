"""Shared fixtures for the core tests: a tiny residual CNN on scikit-learn's 8x8 digits, and CLI helpers.

Everything here is sized for 2 CPU cores: the model has two stages of one block (widths 8 and 16), so a whole
epoch of ``digits`` (1,438 training images) takes a fraction of a second once compiled.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from overfocus_jax import cli, optimization
from overfocus_jax import config as config_lib
from overfocus_jax import models as models_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _suite_compilation_cache() -> pathlib.Path:
  """One persistent compilation cache for this test run, shared by the xdist workers and every CLI subprocess they
  start: the suite trains the same tiny models in dozens of fresh processes, and each compiles them only once. The
  home directory is left alone (the cache's own tests, test_compilation_cache.py, use their own directories); the
  directory goes at the end of the run (:func:`pytest_sessionfinish`)."""
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
  return pathlib.Path(tempfile.gettempdir()) / f"overfocus-test-xla-{run}"


SUITE_COMPILATION_CACHE = _suite_compilation_cache()
os.environ["OVERFOCUS_COMPILATION_CACHE"] = str(SUITE_COMPILATION_CACHE)

# Most of the suite's time is XLA compiling hundreds of small programs, whose run time is negligible. LLVM at -O0
# compiles them about a third faster (test_convnext.py and test_attention.py on 2 workers: 124 s → 87 s). Tests that
# compare runs (bit-identical resumes, 1 vs 8 devices) compare programs compiled alike, so none depends on the level.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def with_fast_compile(flags: str | None) -> str:
  """``flags`` (an XLA_FLAGS value) with :data:`FAST_COMPILE_FLAG` added."""
  flags = (flags or "").strip()
  return flags if FAST_COMPILE_FLAG in flags else f"{flags} {FAST_COMPILE_FLAG}".strip()


os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS"))  # before JAX starts its backend


def pytest_sessionfinish(session):
  del session
  if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller (or a run without xdist), after every worker
    shutil.rmtree(SUITE_COMPILATION_CACHE, ignore_errors=True)


def has_module_fixture(module_path: pathlib.Path) -> bool:
  """Whether a test module defines a module-scoped fixture (an 8-device run, a trained workdir, a compiled model)."""
  try:
    return 'scope="module"' in module_path.read_text(encoding="utf-8")
  except OSError:
    return False


def pytest_xdist_make_scheduler(config, log):
  """``--dist loadgroup`` (pyproject's addopts): each module with a module-scoped fixture goes whole to one worker,
  which builds the fixture once; every other test is scheduled on its own.

  xdist's own loadgroup (``xdist_group`` marks) no longer groups anything under pytest 9.2: it renames the items'
  node ids, which pytest 9.2 ignores (pytest-dev/pytest-xdist#1386), so every worker that drew one of a module's
  tests built that module's fixtures (test_sharding's 8-device runs: 75 s each, twice). The scopes here come from
  the node id alone, which the controller has; xdist orders scopes by size, so the grouped modules start first.
  """
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top  # only under xdist

  root = config.rootpath

  class ModuleFixtureScheduling(LoadScopeScheduling):

    def __init__(self, config, log=None):
      super().__init__(config, log)
      self.grouped: dict[str, bool] = {}

    def _split_scope(self, nodeid: str) -> str:
      module = nodeid.split("::", 1)[0]
      if module not in self.grouped:
        self.grouped[module] = has_module_fixture(root / module)
      return module if self.grouped[module] else nodeid

  return ModuleFixtureScheduling(config, log)

# The tiny architecture, as --config.FIELD=VALUE pairs.
TINY_FIELDS = (
    ("dataset", "digits"),
    ("resnet.stem_features", "8"),
    ("resnet.stage_widths", "(8,16)"),
    ("resnet.stage_sizes", "(1,1)"),
    ("resnet.stage_strides", "(1,2)"),
    ("batch_size", "64"),
    ("eval_batch_size", "64"),
)
TINY_ARGS = tuple(f"--config.{field}={value}" for field, value in TINY_FIELDS)
DIGITS_TRAIN, DIGITS_TEST = 1438, 359  # sources.py splits 1,797 digits 80/20 with a fixed permutation


def as_overrides(fields: dict) -> list[tuple[str, str]]:
  """``group__field=value`` keyword arguments as ``--config.group.field`` overrides (a string as it is, else its
  repr)."""
  return [(k.replace("__", "."), v if isinstance(v, str) else repr(v)) for k, v in fields.items()]


def tiny_config(**fields):
  """The default config with the tiny architecture and ``fields`` (as strings or values) applied, validated."""
  return config_lib.build_config(None, list(TINY_FIELDS) + as_overrides(fields))


def digits_config(model: str, **fields):
  """The default config for ``model`` on scikit-learn's digits with ``fields`` (``group__field=value``) applied,
  validated: the model test files' configs."""
  return config_lib.build_config(None, [("model", model), ("dataset", "digits")] + as_overrides(fields))


def assert_the_experiment_accepts(model, make_config, input_shape=None):
  """What ``overfocus train`` checks before it builds the state: the image size (when given) and every regularizer's
  split of ``model`` (``make_config(regularizer__name=NAME)`` builds each regularizer's config)."""
  from overfocus_jax.challenge import NAMES
  from overfocus_jax.regularizers import build_regularizer
  from overfocus_jax.train import experiment
  if input_shape is not None:
    experiment.check_input_shape(model, input_shape)
    models_lib.check_fits_images(make_config(), input_shape)
  for name in NAMES:
    experiment.check_regularizer_fits(model, build_regularizer(make_config(regularizer__name=name), 10), name)


def abstract_variables(model, input_shape):
  """``model``'s variables as shapes only (nothing compiled or allocated)."""
  import jax
  return jax.eval_shape(lambda key: model.init(key, input_shape), jax.random.PRNGKey(0))


def run_cli(capsys, *argv):
  """``overfocus ARGV`` in this process: (exit code, stdout, stderr)."""
  capsys.readouterr()  # drop anything printed before
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def run_cli_subprocess(*argv, env=None, timeout=300):
  """``python -m overfocus_jax ARGV`` in a fresh interpreter (for exit codes and what reaches the terminal)."""
  return subprocess.run([sys.executable, "-m", "overfocus_jax", *map(str, argv)], capture_output=True, text=True,
                        env=subprocess_env(env), timeout=timeout, cwd=REPO_ROOT)


def subprocess_env(extra=None):
  """The environment of a CLI subprocess: one CPU device unless ``extra`` sets XLA_FLAGS, compiled as the suite."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"})
  env.update(extra or {})
  env["XLA_FLAGS"] = with_fast_compile(env.get("XLA_FLAGS"))
  return env


def assert_one_line_error(code, err, *fragments):
  """A user error: exit code 2, exactly one stderr line naming the problem, no traceback."""
  lines = err.strip().splitlines()
  assert code == 2, f"exit code {code}, stderr: {err}"
  assert len(lines) == 1, f"stderr is not one line: {err!r}"
  assert "Traceback" not in err
  assert lines[0].startswith("overfocus: error: "), lines[0]
  for fragment in fragments:
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def assert_resume_refused(capsys, trained_workdir, tmp_path, overrides, *fragments):
  """Resuming a copy of ``trained_workdir`` with ``overrides`` is a one-line error that leaves every file as it was."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_workdir, workdir)
  before = snapshot(workdir)
  code, _, err = run_cli(capsys, "train", "--workdir", workdir, *BASE_RUN_ARGS, "--config.num_epochs=2", *overrides)
  assert_one_line_error(code, err, *fragments)
  assert snapshot(workdir) == before


def last_json_line(out):
  return json.loads(out.strip().splitlines()[-1])


def read_metrics(workdir):
  """The run's metrics.jsonl records, read by the library's one reader (a missing file is a test failure here)."""
  from overfocus_jax.train import workdir as workdir_lib
  assert (pathlib.Path(workdir) / workdir_lib.METRICS_FILE).is_file(), f"no metrics.jsonl in {workdir}"
  return workdir_lib.read_metrics(workdir)


def snapshot(directory):
  """Every file under ``directory`` with its bytes (and every folder), to prove nothing was touched."""
  directory = pathlib.Path(directory)
  return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else "<dir>")
          for p in sorted(directory.rglob("*"))}


def restore_final_state(workdir):
  """The latest checkpoint of a CLI run, restored with the config it saved."""
  from overfocus_jax import parallel
  from overfocus_jax.train import checkpoint as checkpoint_lib
  from overfocus_jax.train import experiment
  workdir = pathlib.Path(workdir)
  config = config_lib.config_from_json((workdir / "config.json").read_text())
  exp = experiment.build_experiment(config)
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    state, data_state = checkpointer.restore(checkpoint_lib.abstract_like(exp.state, parallel.replicated(exp.mesh)))
  finally:
    checkpointer.close()
  return state, data_state


# A one-epoch run with a schedule that does not depend on num_epochs, so that extending it to two epochs must
# reproduce an uninterrupted two-epoch run (see test_checkpoint.py).
BASE_RUN_ARGS = (*TINY_ARGS, "--config.schedule=constant", "--config.warmup_epochs=0", "--no-progress")


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A finished one-epoch CLI training run. Read-only for tests: copy it before changing anything."""
  assert jax.device_count() == 1, "the in-process tests expect one device (XLA_FLAGS leaked in?)"
  workdir = tmp_path_factory.mktemp("trained") / "run"
  code = cli.main(["train", "--workdir", str(workdir), *BASE_RUN_ARGS, "--config.num_epochs=1"])
  assert code == 0
  return workdir


@pytest.fixture(scope="session")
def uninterrupted_constant(tmp_path_factory):
  """The base run's config, trained for 2 epochs in one go: what every resumed run must reproduce."""
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  assert cli.main(["train", "--workdir", str(workdir), *BASE_RUN_ARGS, "--config.num_epochs=2"]) == 0
  return workdir


def assert_split_is_exact(model, variables, x):
  """``classify(encode(x)) == apply(x)`` in inference and in training; returns the train-mode
  ``(apply_state, z, encode_state, classify_state)`` so the caller can check which batch-norm statistics each
  half kept."""
  import chex
  for train in (False, True):
    logits, apply_state = model.apply(variables, x, train=train)
    z, encode_state = model.encode(variables, x, train=train)
    split_logits, classify_state = model.classify(variables, z, train=train)
    chex.assert_trees_all_equal(split_logits, logits)
  return apply_state, z, encode_state, classify_state


def fit_one_batch(config, steps: int, dataset_name: str = "digits", batch_size: int = 64):
  """``(losses, state)`` after ``steps`` jitted train steps on one fixed batch: a model that learns fits it."""
  import jax.numpy as jnp
  from overfocus_jax.data import pipeline
  from overfocus_jax.data.sources import load_dataset
  from overfocus_jax.models import build_model
  from overfocus_jax.train import state as state_lib
  from overfocus_jax.train.step import make_train_step
  dataset = load_dataset(dataset_name)
  model = build_model(config, dataset.num_classes)
  tx = optimization.make_optimizer(config, optimization.make_schedule(config, 10))
  state = state_lib.create_train_state(model, tx, seed=0, input_shape=dataset.image_shape)
  batch = next(pipeline.make_train_iterator(dataset, batch_size=batch_size, seed=0, augment=False))
  batch = jax.tree.map(jnp.asarray, batch)
  step = jax.jit(make_train_step(model, tx))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, state


@pytest.fixture(scope="module")
def tiny_model_setup():
  """(config, model, tx, schedule, state, batch): a two-stage residual CNN on random 8×8×1 images, batch 16."""
  import jax.numpy as jnp
  from overfocus_jax.models import build_model
  from overfocus_jax.train import state as state_lib
  config = config_lib.resolved(config_lib.load_config_file(config_lib.default_config_path()))
  config.resnet.update(dict(stem_features=8, stage_widths=(8, 16), stage_sizes=(1, 1), stage_strides=(1, 2)))
  model = build_model(config, 10)
  schedule = optimization.make_schedule(config, 10)
  tx = optimization.make_optimizer(config, schedule)
  state = state_lib.create_train_state(model, tx, seed=0, input_shape=(8, 8, 1))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  return config, model, tx, schedule, state, batch
