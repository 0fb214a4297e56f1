"""DomainBed's model selection and tables (overfocus_jax.dg): hand-made sweeps where each rule must pick a known
checkpoint, DomainBed's tie-breaking, the statistics over trial seeds, the markdown text, and bad input.

The main sweep (dataset "toy", 3 environments, test env 0, hparams seeds 0 and 1, steps 100-300) is built so that
the three rules pick three different (hparams_seed, step): training_domain (0, 100), oracle (1, 300), leave_one_out
(1, 200) — a rule swapped for another fails. Pure Python and numpy: no JAX, no training.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from overfocus_jax.dg import selection, tables
from overfocus_jax.dg.selection import Choice, Summary, load_records, select, summarize, trial_summary
from overfocus_jax.errors import UserError

from conftest import REPO_ROOT


def record(test_envs, step, accs=None, *, hparams_seed=0, trial_seed=0, algorithm="ERM", dataset="toy", n_envs=3):
  """A DomainBed record; ``accs``: env → (in_acc, out_acc) or {"in"/"out": acc}; other accuracies are 0.5."""
  rec = {"args": {"algorithm": algorithm, "dataset": dataset, "test_envs": list(test_envs),
                  "hparams_seed": hparams_seed, "trial_seed": trial_seed},
         "hparams": {"lr": 10.0 ** -(hparams_seed + 3)}, "step": step}
  for env in range(n_envs):
    rec[f"env{env}_in_acc"] = rec[f"env{env}_out_acc"] = 0.5
  for env, acc in (accs or {}).items():
    if isinstance(acc, dict):
      rec.update({f"env{env}_{split}_acc": value for split, value in acc.items()})
    else:
      rec[f"env{env}_in_acc"], rec[f"env{env}_out_acc"] = acc
  return rec


def main_run(hparams_seed, step, test_in, test_out, train_out):
  """A one-test-env (test env 0) record: env0 (in, out), env1 and env2 held-out accuracy ``train_out``."""
  return record([0], step, {0: (test_in, test_out), 1: {"out": train_out}, 2: {"out": train_out}},
                hparams_seed=hparams_seed)


def val_run(hparams_seed, step, val_env, val_in):
  """A leave-one-out record: test envs [0, val_env], ``env{val_env}_in_acc`` = ``val_in``."""
  return record([0, val_env], step, {val_env: {"in": val_in}}, hparams_seed=hparams_seed)


def toy_sweep():
  return [
      # hparams 0: training-domain val (mean env1/env2 out) best at 100; test-domain out best at 200, not the last
      main_run(0, 100, 0.61, 0.40, 0.90), main_run(0, 200, 0.62, 0.99, 0.80), main_run(0, 300, 0.63, 0.50, 0.70),
      # hparams 1, the last step first in the file: "last" means the largest step
      main_run(1, 300, 0.73, 0.80, 0.60), main_run(1, 100, 0.71, 0.30, 0.85), main_run(1, 200, 0.72, 0.30, 0.60),
      # leave-one-out runs; hparams 0 at step 300 has env1's run only (its 1.0 would win): the step is skipped
      val_run(0, 100, 1, 0.50), val_run(0, 100, 2, 0.50), val_run(0, 200, 1, 0.55), val_run(0, 200, 2, 0.55),
      val_run(0, 300, 1, 1.00),
      val_run(1, 100, 1, 0.60), val_run(1, 100, 2, 0.60), val_run(1, 200, 1, 0.90), val_run(1, 200, 2, 0.80),
      val_run(1, 300, 1, 0.70), val_run(1, 300, 2, 0.70),
  ]


def only(choices):
  assert len(choices) == 1, choices
  return choices[0]


# ----------------------------------------------------------------------------------------- the three rules


def test_training_domain_picks_the_best_mean_training_held_out_step_and_hparams():
  choice = only(select(toy_sweep(), "training_domain"))
  assert (choice.hparams_seed, choice.step, choice.test_acc) == (0, 100, 0.61)
  assert choice.val_acc == pytest.approx(0.90)
  assert choice == Choice("toy", "ERM", 0, 0, 0, 100, choice.val_acc, 0.61, {"lr": 1e-3})


def test_oracle_takes_each_runs_last_step_then_the_best_test_domain_held_out_accuracy():
  choice = only(select(toy_sweep(), "oracle"))
  # hparams 0 at step 200 has the best env0_out_acc (0.99) of all checkpoints, but oracle does not stop early
  assert (choice.hparams_seed, choice.step, choice.val_acc, choice.test_acc) == (1, 300, 0.80, 0.73)
  assert choice.hparams == {"lr": 1e-4}


def test_leave_one_out_averages_the_held_out_domains_and_skips_incomplete_steps():
  choice = only(select(toy_sweep(), "leave_one_out"))
  assert (choice.hparams_seed, choice.step, choice.test_acc) == (1, 200, 0.72)
  assert choice.val_acc == pytest.approx((0.90 + 0.80) / 2)
  complete = [r for r in toy_sweep() if not (r["args"]["hparams_seed"] == 0 and r["step"] == 300)]
  complete += [val_run(0, 300, 1, 1.00), val_run(0, 300, 2, 1.00), main_run(0, 300, 0.63, 0.50, 0.70)]
  chosen = only(select(complete, "leave_one_out"))
  assert (chosen.hparams_seed, chosen.step) == (0, 300)  # the same step with both validation runs there wins


def test_leave_one_out_step_needs_exactly_one_test_record_and_every_validation_run():
  records = [main_run(0, 100, 0.6, 0.5, 0.5), val_run(0, 100, 1, 0.8), val_run(0, 100, 2, 0.6)]
  assert selection.leave_one_out_pick(records) == (pytest.approx(0.7), 0.6, records[0])
  assert selection.leave_one_out_pick(records[:2]) is None  # env2's run missing
  assert selection.leave_one_out_pick(records[1:]) is None  # no one-test-env record
  assert selection.leave_one_out_pick([records[0], *records]) is None  # two of them
  assert selection.pick_leave_one_out(records[:2]) is None


def test_only_groups_with_a_one_test_env_run_get_a_choice():
  """The leave-one-out runs [0, v] also fall in test env v's group, which has no run of its own: no choice."""
  for method in selection.SELECTION_METHODS:
    assert [(c.test_env, c.trial_seed) for c in select(toy_sweep(), method)] == [(0, 0)]


def test_groups_are_per_trial_dataset_algorithm_and_test_env():
  records = [record([0], 1, {0: (0.1, 0.1)}), record([1], 1, {1: (0.2, 0.2)}),
             record([0], 1, {0: (0.3, 0.3)}, trial_seed=1), record([0], 1, {0: (0.4, 0.4)}, algorithm="IRM"),
             record([0], 1, {0: (0.5, 0.5)}, dataset="other")]
  choices = select(records, "oracle")
  assert [(c.dataset, c.algorithm, c.test_env, c.trial_seed, c.test_acc) for c in choices] == [
      ("toy", "ERM", 0, 0, 0.1), ("toy", "ERM", 1, 0, 0.2), ("toy", "ERM", 0, 1, 0.3), ("toy", "IRM", 0, 0, 0.4),
      ("other", "ERM", 0, 0, 0.5)]


# ----------------------------------------------------------------------------------------- DomainBed's ties


def test_ties_across_hparams_go_to_the_largest_hparams_seed():
  records = [record([0], 1, {0: (0.1 * seed, 0.9)}, hparams_seed=seed) for seed in (2, 0, 1)]
  for method in ("training_domain", "oracle"):
    assert only(select(records, method)).hparams_seed == 2


def test_ties_within_a_run_go_to_the_first_record_for_training_domain_and_the_earliest_step_for_leave_one_out():
  iid = [main_run(0, 200, 0.2, 0.5, 0.8), main_run(0, 100, 0.1, 0.5, 0.8)]
  assert only(select(iid, "training_domain")).step == 200  # first in record order, not the earliest step
  loo = [main_run(0, step, step / 1000, 0.5, 0.5) for step in (200, 100)]
  loo += [val_run(0, step, env, 0.7) for step in (200, 100) for env in (1, 2)]
  assert only(select(loo, "leave_one_out")).step == 100


def test_oracle_takes_the_last_record_of_the_largest_step():
  records = [main_run(0, 300, 0.1, 0.5, 0.5), main_run(0, 100, 0.9, 0.9, 0.9), main_run(0, 300, 0.2, 0.5, 0.5)]
  assert only(select(records, "oracle")).test_acc == 0.2


def test_a_nan_validation_accuracy_ranks_lowest_across_runs():
  records = [record([0], 1, {0: (0.1, 0.2)}, hparams_seed=0), record([0], 1, {0: (0.9, float("nan"))}, hparams_seed=1)]
  assert only(select(records, "oracle")).hparams_seed == 0


# ----------------------------------------------------------------------------------------- over trial seeds


def test_trial_summary_is_domainbeds_mean_and_standard_error_in_percent():
  summary = trial_summary([0.5, 0.7, 0.9])
  assert summary.n == 3 and summary.mean == pytest.approx(70.0)
  assert summary.std == pytest.approx(100 * np.std([0.5, 0.7, 0.9], ddof=0))  # population std, 16.33
  assert summary.stderr == pytest.approx(summary.std / np.sqrt(3))  # what DomainBed prints after the ±
  assert trial_summary([0.8]) == Summary(1, 80.0, 0.0, 0.0)
  assert trial_summary([]) is None


def test_summarize_groups_chosen_test_accuracies_over_trial_seeds():
  records = [record([0], 1, {0: (acc, 0.5)}, trial_seed=trial) for trial, acc in enumerate((0.6, 0.8))]
  records.append(record([1], 1, {1: (0.4, 0.5)}))
  summaries = summarize(select(records, "training_domain"))
  assert summaries.keys() == {("toy", "ERM", 0), ("toy", "ERM", 1)}
  assert summaries["toy", "ERM", 0].mean == pytest.approx(70.0)
  assert summaries["toy", "ERM", 0].stderr == pytest.approx(10.0 / np.sqrt(2))
  assert summaries["toy", "ERM", 1] == Summary(1, 40.0, 0.0, 0.0)


# ----------------------------------------------------------------------------------------- tables


def small_table_records():
  """ERM: test env 0 over two trials (70%, 80%), test env 1 once (60%); SGDrop: test env 0 only (90%)."""
  return [record([0], 1, {0: (0.7, 0.5)}, n_envs=2), record([0], 1, {0: (0.8, 0.5)}, trial_seed=1, n_envs=2),
          record([1], 1, {1: (0.6, 0.5)}, n_envs=2), record([0], 1, {0: (0.9, 0.5)}, algorithm="SGDrop", n_envs=2)]


def test_markdown_table_text_with_a_missing_cell_and_the_average_column():
  assert tables.markdown_table(small_table_records(), "toy", "training_domain") == (
      "| Algorithm | env0 | env1 | Avg |\n"
      "| --- | --- | --- | --- |\n"
      "| ERM | 75.0 ± 3.5 | 60.0 ± 0.0 | 67.5 |\n"
      "| SGDrop | 90.0 ± 0.0 | X | X |")
  named = tables.markdown_table(small_table_records(), "toy", "oracle", environments=["+90%", "-90%"])
  assert named.splitlines()[0] == "| Algorithm | +90% | -90% | Avg |"


def test_columns_are_the_datasets_environment_names_and_the_spread_can_be_the_std():
  colored = [{**r, "args": {**r["args"], "dataset": "colored_mnist:idx:/data"}} for r in toy_sweep()]
  assert tables.markdown_table(colored, "colored_mnist:idx:/data", "oracle").splitlines()[0] == (
      "| Algorithm | +90% | +80% | -90% | Avg |")
  assert tables.environment_names("rotated_mnist", 6) == ["0°", "15°", "30°", "45°", "60°", "75°"]
  assert tables.environment_names("rotated_mnist", 3) == ["env0", "env1", "env2"]  # not DomainBed's six
  assert tables.environment_names("imagefolder:/x:domains", 2) == ["env0", "env1"]
  std = tables.markdown_table(small_table_records(), "toy", "training_domain", spread="std")
  assert "| ERM | 75.0 ± 5.0 | 60.0 ± 0.0 | 67.5 |" in std  # np.std([70, 80]) = 5, its stderr 3.5
  assert "| ERM | X | 72.5 ± 7.5 | X |" in tables.averages_markdown_table(
      [*small_table_records(), record([0], 1, algorithm="IRM", dataset="other", n_envs=2)], "oracle", "std")


def test_table_rows_are_every_algorithm_of_the_records():
  records = [*small_table_records(), record([0], 1, algorithm="IRM", dataset="other", n_envs=2)]
  assert tables.markdown_table(records, "toy", "oracle").splitlines()[-1] == "| IRM | X | X | X |"
  assert tables.averages_markdown_table(records, "oracle") == (
      "| Algorithm | other | toy | Avg |\n"
      "| --- | --- | --- | --- |\n"
      "| ERM | X | 72.5 ± 5.3 | X |\n"  # trial 0: mean of 70 and 60 (not both needed); trial 1: 80 alone
      "| SGDrop | X | 90.0 ± 0.0 | X |\n"
      "| IRM | 50.0 ± 0.0 | X | X |")


def test_unknown_dataset_or_method_is_a_user_error():
  with pytest.raises(UserError, match="no records of dataset 'nope'.*pick one of: toy"):
    tables.markdown_table(small_table_records(), "nope", "oracle")
  with pytest.raises(UserError, match="unknown selection method 'best'.*training_domain, leave_one_out, oracle"):
    select(small_table_records(), "best")


# ----------------------------------------------------------------------------------------- files and the command


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_load_records_reads_a_file_or_a_sweep_directory(tmp_path):
  path = write_jsonl(tmp_path / "results.jsonl", toy_sweep())
  assert load_records(path) == toy_sweep()
  for i, part in enumerate((toy_sweep()[:5], toy_sweep()[5:])):
    (tmp_path / "sweep" / f"run{i}").mkdir(parents=True)
    write_jsonl(tmp_path / "sweep" / f"run{i}" / "results.jsonl", part)
  assert load_records(tmp_path / "sweep") == toy_sweep()


@pytest.mark.parametrize("line, problem", [
    ('{"args": ', "results.jsonl:2: not JSON"),
    ('[1, 2]', "results.jsonl:2: not a JSON object"),
    ('{"args": {"algorithm": "ERM"}}', "results.jsonl:2: args.dataset is missing"),
    (json.dumps({**record([0], 1), "env1_in_acc": "high"}), 'results.jsonl:2: "env1_in_acc" is missing or not a'),
    (json.dumps(record([3], 1)), "results.jsonl:2: test env 3 is not one of the record's 3 environments"),
])
def test_a_malformed_line_names_the_file_and_line(tmp_path, line, problem):
  path = tmp_path / "results.jsonl"
  path.write_text(json.dumps(record([0], 1)) + "\n" + line + "\n")
  with pytest.raises(UserError, match="each line must hold one DomainBed record") as caught:
    load_records(path)
  assert problem in str(caught.value) and "\n" not in str(caught.value)


def run_tables(capsys, *argv):
  code = tables.main([str(arg) for arg in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_main_prints_every_methods_tables(tmp_path, capsys):
  path = write_jsonl(tmp_path / "results.jsonl", small_table_records())
  code, out, err = run_tables(capsys, path)
  assert code == 0 and err == ""
  assert out.splitlines()[0] == ("Test-environment accuracy (%) of the selected model: mean ± standard error "
                                 "(DomainBed's) over trial seeds.")
  titles = [title for _, title, _ in selection.SELECTION_METHODS.values()]
  assert [line for line in out.splitlines() if line.startswith("# ")] == [f"# Model selection: {t}" for t in titles]
  assert f"## Dataset: toy, model selection method: {titles[0]}\n\n" + tables.markdown_table(
      small_table_records(), "toy", "training_domain") in out
  assert out.count("## Averages") == 3
  code, out, _ = run_tables(capsys, path, "--selection", "oracle", "--dataset", "toy")
  assert code == 0 and "oracle" in out and "training-domain" not in out and "Averages" not in out


def assert_one_line_error(code, err, *words):
  assert code == 2
  assert err.startswith("overfocus: error: ") and err.count("\n") == 1, err
  for word in words:
    assert word in err


@pytest.mark.parametrize("argv, words", [
    (["{missing}"], ["no results file", "missing.jsonl", "pass an existing results.jsonl"]),
    (["{good}", "--selection", "best"], ["unknown --selection 'best'", "training_domain, leave_one_out, oracle, all"]),
    (["{good}", "--dataset", "nope"], ["no records of dataset 'nope'", "pick one of: toy"]),
    (["{bad}"], ["bad.jsonl:2: not JSON", "each line must hold"]),
    (["{good}", "--frobnicate"], ["unrecognized arguments: --frobnicate", "--help"]),
    (["{good}", "--spread", "var"], ["unknown --spread 'var'", "stderr, std"]),
])
def test_bad_input_is_one_line_on_stderr_and_exit_code_2(tmp_path, capsys, argv, words):
  good = write_jsonl(tmp_path / "good.jsonl", small_table_records())
  (tmp_path / "bad.jsonl").write_text(good.read_text().splitlines()[0] + "\n{oops\n")
  paths = {"good": good, "bad": tmp_path / "bad.jsonl", "missing": tmp_path / "missing.jsonl"}
  code, out, err = run_tables(capsys, *(arg.format(**paths) for arg in argv))
  assert out == ""
  assert_one_line_error(code, err, *words)


def test_python_dash_m_prints_only_the_one_error_line(tmp_path):
  """The real entry point: no traceback reaches the terminal."""
  result = subprocess.run([sys.executable, "-m", "overfocus_jax.dg.tables", str(tmp_path / "missing.jsonl")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
  assert result.stdout == ""
  assert_one_line_error(result.returncode, result.stderr, "no results file")


def test_tables_piped_into_a_reader_that_stops_early_end_without_a_traceback(tmp_path):
  """``python -m overfocus_jax.dg.tables FILE | head -1``: the closed pipe is a quiet exit 141, not a traceback."""
  path = write_jsonl(tmp_path / "results.jsonl", small_table_records())
  reader = subprocess.Popen([sys.executable, "-m", "overfocus_jax.dg.tables", str(path)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  reader.stdout.close()  # the reader is gone before the first line is written
  _, err = reader.communicate(timeout=60)
  assert reader.returncode == 141 and b"Traceback" not in err, err.decode()
