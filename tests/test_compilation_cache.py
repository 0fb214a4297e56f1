"""The CLI's persistent compilation cache: a second identical run compiles nothing new, ``off`` turns it off, and an
unwritable location is a warning, not a failure."""

import os

from overfocus_jax import compilation_cache

from conftest import BASE_RUN_ARGS, run_cli_subprocess


# One residual stage: each of these runs compiles from nothing (its own cache, not the suite's).
ONE_STAGE = ("--config.resnet.stage_widths=(8,)", "--config.resnet.stage_sizes=(1,)",
             "--config.resnet.stage_strides=(1,)")


def _train(tmp_path, name, cache):
  return run_cli_subprocess("train", "--workdir", tmp_path / name, *BASE_RUN_ARGS, *ONE_STAGE,
                            "--config.num_epochs=1", env={compilation_cache.ENV: str(cache)})


def _entries(directory):
  return {path.name for path in directory.iterdir() if path.name.endswith("-cache")}


def test_a_second_run_reuses_the_first_runs_programs(tmp_path):
  cache = tmp_path / "cache"
  first = _train(tmp_path, "a", cache)
  assert first.returncode == 0, first.stderr
  written = _entries(cache)
  assert any(name.startswith("jit_train_chunk") for name in written), sorted(written)[:5]
  second = _train(tmp_path, "b", cache)  # same config, another workdir: every program is a cache hit
  assert second.returncode == 0, second.stderr
  assert _entries(cache) == written


def test_off_writes_no_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(compilation_cache.ENV, "off")
  assert compilation_cache.location() is None and compilation_cache.enable() is None
  result = _train(tmp_path, "a", "off")
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / "off").exists()


def test_default_location_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert compilation_cache.location() == tmp_path / "overfocus_jax" / "xla"


def test_unwritable_location_is_one_warning_and_the_run_goes_on(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  result = _train(tmp_path, "a", blocker / "cache")
  assert result.returncode == 0, result.stderr
  warnings = [line for line in result.stderr.splitlines() if "compilation cache" in line]
  assert len(warnings) == 1 and warnings[0].startswith("overfocus: warning:") and os.fspath(blocker) in warnings[0]


def test_a_jax_without_the_options_runs_uncached(tmp_path, monkeypatch, capsys):
  def refuse(name, value):
    raise AttributeError(f"Unrecognized config option: {name}")
  monkeypatch.setattr(compilation_cache.jax.config, "update", refuse)
  assert compilation_cache.enable(tmp_path / "cache") is None
  assert "compiling without it" in capsys.readouterr().err
