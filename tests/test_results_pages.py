"""experiments/results_pages.py: the results pages (docs/results) are what the records give, and a table is the
records' mean ± std over seeds followed by its command and the commit that recorded its file."""

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "results_pages.py"


def load_pages_module():
  spec = importlib.util.spec_from_file_location("results_pages", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def git(cwd, *args) -> str:
  return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def full_history() -> bool:
  """A git checkout with its history: the pages cite each record's commit, which a shallow clone cannot tell."""
  if shutil.which("git") is None:
    return False
  try:
    return git(ROOT, "rev-parse", "--is-shallow-repository") == "false"
  except subprocess.CalledProcessError:  # not a git checkout (an sdist, an export)
    return False


@pytest.mark.skipif(not full_history(), reason="needs the repository's git history (the pages cite commits)")
def test_the_results_pages_are_current():
  # Fails after a record is added or changed: commit the record, then `python experiments/results_pages.py` and
  # commit the pages.
  proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr


def test_check_fails_on_a_missing_page(tmp_path):
  assert load_pages_module().main(["--check", "--out", str(tmp_path)]) == 1


def write_records(root: pathlib.Path) -> str:
  relpath = "experiments/results/tiny.jsonl"
  (root / "experiments" / "results").mkdir(parents=True)
  rows = [{"method": "erm", "seed": 0, "decorrelated_accuracy": 0.60, "first_epoch_masked_accuracy": None},
          {"method": "erm", "seed": 1, "decorrelated_accuracy": 0.70, "first_epoch_masked_accuracy": None},
          {"method": "erm", "seed": 2, "decorrelated_accuracy": 0.80, "first_epoch_masked_accuracy": None},
          {"method": "sgdrop", "seed": 0, "decorrelated_accuracy": 0.9, "first_epoch_masked_accuracy": 0.5},
          {"method": "other", "seed": 0, "decorrelated_accuracy": 0.1, "first_epoch_masked_accuracy": 0.1}]
  (root / relpath).write_text("".join(json.dumps(row) + "\n" for row in rows))
  return relpath


def tiny_section(pages, relpath: str):
  spec = pages.Runs((("erm", "ERM"), ("sgdrop", "SGDrop"), ("missing", "never run")),
                    (pages.Col("decorrelated acc.", "decorrelated_accuracy"),
                     pages.Col("masked acc.", "first_epoch_masked_accuracy")))
  return pages.Section("tiny", "A tiny result", (relpath,), (spec,), command="python make_tiny.py --seeds 0 1 2",
                       text="What the cells are.")


def test_a_section_is_mean_and_std_over_seeds_then_its_command_and_commit(tmp_path):
  pages = load_pages_module()
  relpath = write_records(tmp_path)
  text = pages.render_section(tiny_section(pages, relpath), tmp_path)
  lines = text.splitlines()
  assert lines[0] == "## A tiny result" and "What the cells are." in lines
  # 60, 70, 80: mean 70.0, sample standard deviation 10.0; one seed alone shows its value; ERM masks nothing
  assert "| ERM | 3 | 70.0 ± 10.0 | – |" in lines
  assert "| SGDrop | 1 | 90.0 | 50.0 |" in lines
  assert not any("never run" in line or "other" in line for line in lines)
  table_end = max(i for i, line in enumerate(lines) if line.startswith("|"))
  after = "\n".join(lines[table_end + 1:])
  assert "```bash\npython make_tiny.py --seeds 0 1 2\n```" in after
  assert f"Records: `{relpath}` (commit unknown)." in after  # no git repository here


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_commit_is_the_one_that_recorded_the_file(tmp_path):
  pages = load_pages_module()
  relpath = write_records(tmp_path)
  identity = ("-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false")
  git(tmp_path, "init", "-q")
  git(tmp_path, "add", relpath)
  git(tmp_path, *identity, "commit", "-q", "-m", "records")
  recorded = git(tmp_path, "log", "-1", "--format=%H")[:7]
  (tmp_path / "unrelated.txt").write_text("a later commit that does not touch the records\n")
  git(tmp_path, "add", "unrelated.txt")
  git(tmp_path, *identity, "commit", "-q", "-m", "later")
  assert f"Records: `{relpath}` (commit {recorded})." in pages.render_section(tiny_section(pages, relpath), tmp_path)
  with (tmp_path / relpath).open("a") as f:  # a record not committed yet is not cited with an older commit
    f.write(json.dumps({"method": "erm", "seed": 3, "decorrelated_accuracy": 0.7}) + "\n")
  pages.commit_of.cache_clear()
  assert f"Records: `{relpath}` (commit uncommitted)." in pages.render_section(tiny_section(pages, relpath), tmp_path)


def test_a_readme_block_is_rewritten_from_its_records_and_the_rest_kept(tmp_path):
  pages = load_pages_module()
  relpath = write_records(tmp_path)
  section = tiny_section(pages, relpath)
  text = "# Title\n\nbefore\n\n<!-- results_pages: tiny -->\nstale table\n<!-- /results_pages: tiny -->\n\nafter\n"
  original = (pages.SECTIONS, pages.README_BLOCKS)
  pages.SECTIONS, pages.README_BLOCKS = (section,), {"tiny": "A tiny result"}
  try:
    written = pages.render_readme(text, tmp_path)
    with pytest.raises(ValueError, match="README.md has no block"):
      pages.render_readme("# no block\n", tmp_path)
  finally:
    pages.SECTIONS, pages.README_BLOCKS = original
  assert written.startswith("# Title\n\nbefore\n\n<!-- results_pages: tiny -->\n\n| method |")
  assert written.endswith("<!-- /results_pages: tiny -->\n\nafter\n")
  assert "stale table" not in written and "## A tiny result" not in written and "What the cells are." not in written
  assert "python make_tiny.py --seeds 0 1 2" in written
