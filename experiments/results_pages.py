r"""The results pages (docs/results/*.md), generated from the records in experiments/results and benchmarks/results.

    python experiments/results_pages.py            # writes every page, and README.md's tables of results
    python experiments/results_pages.py --check    # exit 1 if a page on disk differs from what it would write

``SECTIONS`` below is the whole content: for each result, its page, its title, the record files it reads, how to
tabulate them (a spec: which fields are rows and columns, mean ± spread over seeds, the number of seeds), the command
that produced the records and, where the runs' code is older than the commit that added their file, that commit.
Every table is followed by its command and by the commit that recorded each file (``git log -1 -- FILE``; "unknown"
without git, "uncommitted" while the file differs from the last commit), so a number on a page is the recorded
number. Record a result by committing its file first and then the regenerated pages: a page cites its files'
commits. The interpretation of the results lives in experiments/README.md and BENCHMARKS.md, which link here.

Only the standard library and NumPy (DomainBed's selection rules come from ``overfocus_jax.dg``, which imports no
JAX); nothing is trained or timed.
"""

import argparse
import dataclasses
import difflib
import functools
import json
import pathlib
import re
import statistics
import subprocess
import sys
import textwrap
from typing import Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python experiments/results_pages.py` puts experiments/ first, not the root
  sys.path.insert(0, str(ROOT))

from overfocus_jax.dg import selection as dg_selection  # noqa: E402  (NumPy only)
from overfocus_jax.dg import tables as dg_tables  # noqa: E402

PAGES_DIR = ROOT / "docs" / "results"
RECORD_DIRS = ("experiments/results", "benchmarks/results")
E = "experiments/results/"
B = "benchmarks/results/"
GENERATOR = "experiments/results_pages.py"


# ------------------------------------------------------------------------------------------------ records and commits


def read_records(path: pathlib.Path) -> list:
  """A ``.jsonl`` file's records, or a ``.json`` file's one object (in a list)."""
  text = path.read_text()
  if path.suffix == ".jsonl":
    return [json.loads(line) for line in text.splitlines() if line.strip()]
  return [json.loads(text)]


def _git(root: pathlib.Path, *args: str) -> str | None:
  try:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
  except (OSError, subprocess.CalledProcessError):
    return None
  return proc.stdout


@functools.lru_cache(maxsize=None)
def commit_of(root: pathlib.Path, relpath: str) -> str:
  """The commit that last recorded ``relpath`` (7 hex digits); "uncommitted" if the working tree differs from it,
  "unknown" without git or history."""
  status = _git(root, "status", "--porcelain", "--", relpath)
  if status is None:
    return "unknown"
  if status.strip():
    return "uncommitted"
  log = _git(root, "log", "-1", "--format=%H", "--", relpath)
  return log.strip()[:7] if log and log.strip() else "unknown"


def field(record, path):
  """``record[path[0]][path[1]]...``; None where a key is missing."""
  value = record
  for key in (path,) if isinstance(path, str) else path:
    if not isinstance(value, dict) or key not in value:
      return None
    value = value[key]
  return value


def mean_spread(values: Sequence[float], digits: int = 1, scale: float = 100.0, sign: bool = False) -> str:
  """``mean ± std`` (the sample standard deviation, n − 1) of ``values`` × ``scale``; one value alone, without ±."""
  values = [scale * v for v in values]
  spec = f"{'+' if sign else ''}.{digits}f"
  if len(values) == 1:
    return format(values[0], spec)
  return f"{format(statistics.mean(values), spec)} ± {statistics.stdev(values):.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = [list(header), ["---"] * len(header), *rows]
  return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def slug(title: str) -> str:
  """The heading's anchor, as MyST (``myst_heading_anchors``) and GitHub make it."""
  return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def matches(record: dict, where: dict) -> bool:
  return all(record.get(key) == value for key, value in where.items())


# ------------------------------------------------------------------------------------------------ table specs
# Each spec's render(files) gets {relpath: records} for its section's files, in the section's order.


@dataclasses.dataclass(frozen=True)
class Col:
  """A column: its header, the record field (a key, or a tuple of keys into nested objects), and its scale."""
  header: str
  path: str | tuple
  scale: float = 100.0
  digits: int = 1


@dataclasses.dataclass(frozen=True)
class Runs:
  """One row per value of ``row_field`` (``rows``: (value, label) in order), one column per ``Col``: mean ± std over
  the matching records (seeds), "–" where a record lacks the field; a "seeds" column counts them."""
  rows: tuple
  columns: tuple
  row_field: str = "method"
  where: tuple = ()  # (key, value) pairs every record must match
  seeds: tuple | None = None
  row_header: str = "method"
  caption: str = ""

  def render(self, files: dict) -> str:
    records = [r for rs in files.values() for r in rs if matches(r, dict(self.where))
               and (self.seeds is None or r.get("seed") in self.seeds)]
    lines = []
    for value, label in self.rows:
      rows = [r for r in records if r.get(self.row_field) == value]
      if not rows:
        continue
      cells = []
      for col in self.columns:
        values = [field(r, col.path) for r in rows]
        cells.append("–" if None in values else mean_spread(values, col.digits, col.scale))
      lines.append([label, str(len(rows)), *cells])
    return markdown([self.row_header, "seeds", *(col.header for col in self.columns)], lines)


@dataclasses.dataclass(frozen=True)
class PerFile:
  """One row per method, one column per file (``columns``: (header, relpath)); a cell joins ``fields`` with " / ",
  each mean ± std in % over the method's records (seeds), "–" where a record lacks it, and the number of seeds."""
  methods: tuple
  columns: tuple
  fields: tuple = ("decorrelated_accuracy", "clean_accuracy", "first_epoch_masked_accuracy")
  seeds: tuple | None = None
  show_seeds: bool = True
  row_header: str = "method"
  caption: str = ""

  def render(self, files: dict) -> str:
    lines = []
    for method in self.methods:
      cells = []
      for _, relpath in self.columns:
        rows = [r for r in files[relpath] if r["method"] == method and (self.seeds is None or r["seed"] in self.seeds)]
        if not rows:
          cells.append("–")
          continue
        parts = []
        for key in self.fields:
          values = [r.get(key) for r in rows]
          parts.append("–" if None in values else mean_spread(values))
        cells.append(" / ".join(parts) + (f" ({len(rows)})" if self.show_seeds else ""))
      lines.append([f"`{method}`", *cells])
    return markdown([self.row_header, *(header for header, _ in self.columns)], lines)


@dataclasses.dataclass(frozen=True)
class NoCollapse:
  """experiments/no_collapse.py's table: per config (and dataset, epochs) and method, the epoch-1 accuracy on the
  masked samples (chance), the test accuracy (mean ± std over seeds) and the mean gap to ERM paired by seed."""
  configs: tuple
  methods: tuple
  caption: str = ""

  def render(self, files: dict) -> str:
    results = [r for rs in files.values() for r in rs]
    lines = []
    for config in self.configs:
      settings = sorted({(r.get("dataset_override") or "", r["epochs"]) for r in results if r["config"] == config})
      for dataset, epochs in settings:
        def rows_of(method):
          return sorted((r for r in results if (r["config"], r.get("dataset_override") or "", r["epochs"], r["method"])
                         == (config, dataset, epochs, method)), key=lambda r: r["seed"])
        erm = {r["seed"]: r["test_accuracy"] for r in rows_of("erm")}
        for method in self.methods:
          rows = rows_of(method)
          if not rows:
            continue
          paired = [100 * (r["test_accuracy"] - erm[r["seed"]]) for r in rows if r["seed"] in erm]
          delta = f"{statistics.mean(paired):+.1f}" if paired and method != "erm" else "–"
          masked = [r.get("first_epoch_masked_accuracy") for r in rows]
          first = "–" if None in masked else mean_spread(masked)
          label = f"{config} on {dataset}" if dataset else config
          lines.append([label, str(epochs), f"`{method}`", str(len(rows)), f"{first} ({100 * rows[0]['chance']:.0f})",
                        mean_spread([r["test_accuracy"] for r in rows]), delta])
    return markdown(["config", "epochs", "method", "seeds", "epoch-1 masked train acc. (chance)", "test acc.",
                     "Δ vs ERM"], lines)


@dataclasses.dataclass(frozen=True)
class AttributionMass:
  """Per unit (element, position, channel), the share of the positive latent attribution its top units hold."""
  rates: tuple = ("0.03", "0.1", "0.3")
  caption: str = ""

  def render(self, files: dict) -> str:
    records = [r for rs in files.values() for r in rs]
    lines = []
    for unit, label in (("element", "element"), ("channel", "channel"), ("spatial", "spatial position")):
      units = records[0][unit]["units"]
      lines.append([f"{label} ({units:,})", str(len(records)),
                    *(mean_spread([r[unit][f"top_{rate}"] for r in records], 2, 1.0) for rate in self.rates)])
    return markdown(["unit (units)", "runs", *(f"top {float(rate):.0%}" for rate in self.rates)], lines)


@dataclasses.dataclass(frozen=True)
class PatchAttribution:
  """experiments/patch_attribution.py's table, per method over its seeds."""
  labels: tuple
  only: tuple = ()  # the section's files this table reads (default: all)
  caption: str = ""

  def render(self, files: dict) -> str:
    records = [r for rs in files.values() for r in rs]
    columns = (("decorrelated acc.", ("decorrelated", "accuracy")),
               ("follows patch", ("decorrelated", "follows_patch")),
               ("IG share, aligned", ("aligned", "integrated_gradients_patch_share")),
               ("input-gradient share, aligned", ("aligned", "input_gradient_patch_share")),
               ("Grad-CAM share, aligned", ("aligned", "grad_cam_patch_share")),
               ("IG share, decorrelated", ("decorrelated", "integrated_gradients_patch_share")))
    lines = []
    for method, label in self.labels:
      rows = [r for r in records if r["method"] == method]
      if not rows:
        continue
      cells = [mean_spread([field(r, path) for r in rows]) for _, path in columns]
      ratio = mean_spread([r["attribution_ratio_by_epoch"][-1] for r in rows], 3, 1.0)
      lines.append([label, str(len(rows)), *cells, ratio])
    return markdown(["method", "seeds", *(header for header, _ in columns), "latent attribution ratio, last epoch"],
                    lines)


@dataclasses.dataclass(frozen=True)
class FeatureUsage:
  """An ``overfocus explain --compare`` folder's explain.json: each run's effective channels."""
  only: tuple = ()
  caption: str = ""

  def render(self, files: dict) -> str:
    (record,), = files.values()
    lines = [[name, f"{usage['effective_channels']:.1f} of {usage['channels']}", f"{usage['top10pct_share']:.3f}"]
             for name, usage in record["feature_usage"].items()]
    return markdown(["run", "effective channels", "share of the top 10% of channels"], lines)


@dataclasses.dataclass(frozen=True)
class Figure:
  """An image of a record folder or file, shown on the page."""
  path: str
  alt: str
  caption: str = ""

  def render(self, files: dict) -> str:
    return f"![{self.alt}](../../{self.path})"


@dataclasses.dataclass(frozen=True)
class DataPaths:
  """experiments/data_paths.py's table: per config, epochs, dtype and stream, the test accuracy (mean ± std over seeds)
  and the median train images/s."""
  caption: str = ""

  def render(self, files: dict) -> str:
    results = [r for rs in files.values() for r in rs]
    dtype = lambda r: r.get("dtype", "float32")  # noqa: E731  (the first records predate --dtype)
    lines = []
    for key in sorted({(r["config"], r["epochs"], dtype(r)) for r in results}, key=lambda k: (k[1] == 1, k)):
      for mode in ("on", "off"):
        rows = [r for r in results if (r["config"], r["epochs"], dtype(r), r["data_on_device"]) == (*key, mode)]
        if rows:
          speed = statistics.median(r["images_per_s"] for r in rows)
          lines.append([key[0], str(key[1]), key[2], mode, str(len(rows)),
                        ", ".join(f"{100 * r['test_accuracy']:.1f}" for r in sorted(rows, key=lambda r: r["seed"])),
                        mean_spread([r["test_accuracy"] for r in rows], 2), f"{speed:,.0f}"])
    return markdown(["config", "epochs", "dtype", "data_on_device", "seeds", "test acc. by seed",
                     "test acc.", "train img/s (median)"], lines)


@dataclasses.dataclass(frozen=True)
class StreamSpeed:
  """Per config, the train images/s with the data on the device and from the host stream, and their ratio."""
  caption: str = ""

  def render(self, files: dict) -> str:
    results = [r for rs in files.values() for r in rs]
    lines = []
    for config in dict.fromkeys(r["config"] for r in results):
      on, off = ([r for r in results if r["config"] == config and r["data_on_device"] == mode][0]
                 for mode in ("on", "off"))
      lines.append([config, f"{on['images_per_s']:,.0f}", f"{off['images_per_s']:,.0f}",
                    f"{on['images_per_s'] / off['images_per_s']:.2f}"])
    return markdown(["config", "device img/s", "host img/s", "device / host"], lines)


@dataclasses.dataclass(frozen=True)
class Efficiency:
  """experiments/efficiency.py's table: parameters, FLOPs, train images/s and test accuracy per model and dataset."""
  datasets: tuple = ("mnist5k", "digits")
  caption: str = ""

  def render(self, files: dict) -> str:
    results = [r for rs in files.values() for r in rs]
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
      rows = {r["dataset"]: r for r in results if r["model"] == model}
      ref = rows.get("mnist5k", {})  # FLOPs and speed are per 28×28 image: "–" without an mnist5k record
      params = next(iter(rows.values()))["params"]
      flops = f"{ref['flops_per_image'] / 1e6:.2f}" if ref.get("flops_per_image") is not None else "–"
      speed = f"{ref['images_per_s']:,.0f}" if ref.get("images_per_s") is not None else "–"
      accs = [f"{100 * rows[d]['test_accuracy']:.1f} ({rows[d]['epochs']})" if d in rows else "–"
              for d in self.datasets]
      lines.append([f"`{model}`", f"{params:,}", flops, speed, *accs])
    return markdown(["model", "params", "MFLOPs / image (mnist5k)", "train img/s (mnist5k)",
                     *(f"{d} test acc. (epochs)" for d in self.datasets)], lines)


SELECTION_TITLES = {"training_domain": "training-domain", "leave_one_out": "leave-one-out", "oracle": "oracle"}
DG_LABELS = {"erm": "ERM", "irm": "IRM", "vrex": "V-REx", "rsc_domainbed": "RSC (DomainBed's)",
             "sgdrop": "SGDrop (default)", "rsc": "RSC (official)"}


def dg_cell(summary) -> str:
  """One trial: its accuracy; several: mean ± standard deviation over trials (np.std, DomainBed's ddof=0)."""
  if summary is None:
    return "X"
  return f"{summary.mean:.1f}" if summary.n == 1 else f"{summary.mean:.1f} ± {summary.std:.1f}"


@dataclasses.dataclass(frozen=True)
class DomainBed:
  """DomainBed's tables (overfocus_jax.dg.selection): per selection rule and algorithm, the test environment's
  in-split accuracy of the selected checkpoint. ``sources``: (label, relpath) pairs whose algorithms are rows of
  their own (default: every file of the section, one source); ``envs``: the test environments shown (default all,
  with their average); ``by_selection``: the selection rules as columns (for one environment)."""
  dataset: str
  selections: tuple = ("training_domain", "oracle")
  sources: tuple = ()
  envs: tuple | None = None
  by_selection: bool = False
  only: tuple = ()
  caption: str = ""

  def render(self, files: dict) -> str:
    sources = [(label, files[relpath]) for label, relpath in self.sources] or \
        [("", [r for rs in files.values() for r in rs])]
    records = [r for _, rs in sources for r in rs if r["args"]["dataset"] == self.dataset]
    n_envs = max(map(dg_selection.env_count, records))
    names = dg_tables.environment_names(self.dataset, n_envs)
    envs = list(range(n_envs)) if self.envs is None else list(self.envs)
    summaries = {}  # (source label, selection) -> {(dataset, algorithm, env): Summary}
    for label, rs in sources:
      own = [r for r in rs if r["args"]["dataset"] == self.dataset]
      for method in self.selections:
        summaries[label, method] = dg_selection.summarize(dg_selection.select(own, method))
    rows = []
    if self.by_selection:
      for label, rs in sources:
        for algorithm in dg_tables.algorithms_in(rs):
          name = DG_LABELS.get(algorithm, algorithm) + (f", {label}" if label else "")
          rows.append([name, *(dg_cell(summaries[label, m].get((self.dataset, algorithm, envs[0])))
                               for m in self.selections)])
      return markdown([f"{names[envs[0]]} held out", *(SELECTION_TITLES[m] for m in self.selections)], rows)
    for method in self.selections:
      for label, rs in sources:
        for algorithm in dg_tables.algorithms_in(rs):
          cells = [summaries[label, method].get((self.dataset, algorithm, env)) for env in envs]
          name = DG_LABELS.get(algorithm, algorithm) + (f", {label}" if label else "")
          average = [dg_tables.format_average(cells)] if self.envs is None else []
          rows.append([SELECTION_TITLES[method], name, *map(dg_cell, cells), *average])
    return markdown(["selection", "algorithm", *(names[env] for env in envs), *(["avg"] if self.envs is None else [])],
                    rows)


@dataclasses.dataclass(frozen=True)
class DomainBedTrials:
  """Per source, algorithm and trial seed, the checkpoint each selection rule picks for one test environment: its
  test-environment in-split accuracy (%) and its step."""
  dataset: str
  sources: tuple
  env: int = 0
  selections: tuple = ("training_domain", "oracle")
  caption: str = ""

  def render(self, files: dict) -> str:
    rows = []
    for label, relpath in self.sources:
      records = [r for r in files[relpath] if r["args"]["dataset"] == self.dataset]
      choices = {method: {(c.algorithm, c.trial_seed): c for c in dg_selection.select(records, method)
                          if c.test_env == self.env} for method in self.selections}
      for algorithm in dg_tables.algorithms_in(records):
        trials = sorted({trial for (a, trial) in choices[self.selections[0]] if a == algorithm})
        for trial in trials:
          cells = [choices[m].get((algorithm, trial)) for m in self.selections]
          rows.append([f"{DG_LABELS.get(algorithm, algorithm)}, {label}", str(trial),
                       *("X" if c is None else f"{100 * c.test_acc:.1f} (step {c.step})" for c in cells)])
    return markdown(["algorithm, rule", "trial", *(SELECTION_TITLES[m] for m in self.selections)], rows)


@dataclasses.dataclass(frozen=True)
class ColourEvidence:
  """experiments/colour_attribution.py's records: per network and environment (out-splits), its accuracy and with the
  colour flipped, the two-leg integrated-gradients split of the true class's margin, and (``tools``) the share of the
  regularizers' own scores on colour-dependent units."""
  tools: bool = False
  only: tuple = ()
  caption: str = ""

  def render(self, files: dict) -> str:
    records = [r for rs in files.values() for r in rs]
    envs = sorted(key for key in records[0] if re.fullmatch(r"env\d+", key))
    names = [records[0][env]["name"] for env in envs]
    label = lambda r: DG_LABELS.get(r["workdir"].rsplit("/", 1)[-1].split("-")[1], r["workdir"])  # noqa: E731

    def joined(r, key, spec):
      return " / ".join(format(r[env]["out"][key], spec) for env in envs)

    rows = []
    if self.tools:
      for r in records:
        keys = ("input_colour_mass", "sgdrop_colour_mass", "rsc_colour_mass", "unit_colour_dependence")
        rows.append([label(r), *(joined(r, key, ".2f") for key in keys)])
      return markdown(["network", "input", "SGDrop's attribution", "RSC's gradient", "units (mean `s`)"], rows)
    for r in records:
      accuracy = [f"{100 * r[env]['out']['accuracy']:.1f} / {100 * r[env]['out']['accuracy_colour_flipped']:.1f}"
                  for env in envs]
      residual = max(r[env]["out"]["max_completeness_residual"] for env in envs)
      rows.append([label(r), *accuracy, joined(r, "mean_colour_evidence", "+.2f"),
                   joined(r, "mean_digit_evidence", "+.2f"), joined(r, "colour_share", ".2f"), f"{residual:.2f}"])
    return markdown(["network", *(f"{name}: acc. / colour flipped (%)" for name in names), "colour evidence (logits)",
                     "digit evidence (logits)", "colour share", "largest IG residual"], rows)


@dataclasses.dataclass(frozen=True)
class Static:
  """A table quoted from a publication (not a record of this repository): ``source`` says where from."""
  table: str
  source: str
  caption: str = ""

  def render(self, files: dict) -> str:
    return self.table


# --- benchmarks


def _fmt(value, spec: str) -> str:
  return "—" if value is None else format(value, spec)


@dataclasses.dataclass(frozen=True)
class EndToEnd:
  """benchmarks.gpu_protocol's steps and end-to-end records, one row per file and dtype: the package's step and the
  PyTorch eager peer's (interleaved, medians), and ``overfocus bench``'s whole loop."""
  caption: str = ""

  def render(self, files: dict) -> str:
    rows = []
    for relpath, (record,) in files.items():
      e2e = {row["dtype"]: row for row in record.get("end_to_end", [])}
      for group in record["steps"]:
        jax_ips = group["cases"]["jax"]["images_per_s"]
        torch_ips = group["cases"]["torch eager"]["images_per_s"]
        loop = e2e.get(group["dtype"], {}).get("end_to_end_images_per_s")
        rows.append([f"`{pathlib.Path(relpath).name}`", group["model"], str(group["batch_size"]), group["dtype"],
                     f"{jax_ips:,.0f}", f"{torch_ips:,.0f}", f"{jax_ips / torch_ips:.2f}", _fmt(loop, ",.0f"),
                     _fmt(loop / torch_ips if loop else None, ".2f")])
    return markdown(["record", "model", "batch", "dtype", "JAX step img/s", "PyTorch eager img/s", "JAX / eager",
                     "`overfocus bench` end to end img/s", "end to end / eager"], rows)


@dataclasses.dataclass(frozen=True)
class HostMemory:
  caption: str = ""

  def render(self, files: dict) -> str:
    (record,), = files.values()
    rows = [[name, f"{row['step_ms']:.1f}", f"{row['over_torch_eager']:.2f}", f"{row['minor_faults_per_step']:,.0f}"]
            for group in record["groups"] for name, row in group["rows"].items()]
    return markdown(["case (default model, batch 128)", "step ms", "× PyTorch eager (speed)",
                     "minor page faults / step"], rows)


@dataclasses.dataclass(frozen=True)
class OneDNNModels:
  """benchmarks.onednn_models: per shipped config, the train step with the package's oneDNN convolutions and with
  XLA's, built from the same state and batch, timed interleaved."""
  caption: str = ""

  def render(self, files: dict) -> str:
    rows = []
    for relpath, (record,) in files.items():
      for row in record["rows"]:
        rows.append([row["config"], row["model"], row.get("dtype", "float32"), str(row["batch_size"]),
                     f"{row['onednn_step_ms']:.1f}", f"{row['xla_step_ms']:.1f}", f"{row['speedup']:.2f}×",
                     f"{row['params_max_abs_diff']:.1e}"])
    return markdown(["config", "model", "dtype", "batch", "oneDNN step ms", "XLA step ms", "speedup",
                     "largest parameter difference after a step"], rows)


@dataclasses.dataclass(frozen=True)
class Overhead:
  """Each regularizer's step time relative to the plain step, per file (framework)."""
  caption: str = ""

  def render(self, files: dict) -> str:
    rows = []
    for relpath, records in files.items():
      framework = "PyTorch eager" if records[0].get("framework") == "torch" else "JAX"
      for r in records:
        rows.append([framework, r["regularizer"], f"{r['step_ms']:.1f}", f"{r['ratio_to_none']:.3f}"])
    return markdown(["framework", "regularizer", "step ms", "× none"], rows)


@dataclasses.dataclass(frozen=True)
class Float32Accuracy:
  """benchmarks.float32_accuracy: the largest |g32 − g64| of the loss gradients (``speed``: the step's cost)."""
  speed: bool = False
  caption: str = ""

  def render(self, files: dict) -> str:
    (record,), = files.values()
    if self.speed:
      return markdown(["config", "library's norms ms", "flax's ms", "ratio"],
                      [[r["config"], f"{r['library_ms']:.0f}", f"{r['flax_ms']:.0f}", f"{r['library_over_flax']:.2f}×"]
                       for r in record["speed"]])
    rows = [[g["case"], str(g["seed"]), f"{g['library']['max_abs_error']:.1e} ({g['library']['max_abs_gradient']:.2g})",
             f"{g['flax']['max_abs_error']:.1e}", _fmt(g.get("torch_max_abs_error"), ".1e")]
            for g in record["gradients"]]
    return markdown(["case", "seed", "library (largest gradient)", "flax", "PyTorch"], rows)


@dataclasses.dataclass(frozen=True)
class ReferencePeers:
  caption: str = ""

  def render(self, files: dict) -> str:
    (records,), = files.values()
    rows = []
    for r in records:
      errors = "—" if r.get("torch_float32_error") is None else \
          f"{r['torch_float32_error']:.1e} / {r['our_float32_error']:.1e}"
      rows.append([r["variant"], r["case"], "yes" if r["masks_equal"] else "**no**", f"{r['loss_difference']:.1e}",
                   f"{r['gradient_difference']:.1e} ({r['largest_gradient']:.2g})", errors])
    return markdown(["variant", "case", "masks equal", "loss diff", "gradient diff (largest gradient)",
                     "float32 vs float64: PyTorch / ours"], rows)


@dataclasses.dataclass(frozen=True)
class LibraryFlags:
  caption: str = ""

  def render(self, files: dict) -> str:
    (record,), = files.values()
    rows = [[name, ", ".join(row["forward_kernels"]), f"{row['forward_ms']:.1f}",
             f"{row['forward_and_gradients_ms']:.1f}", f"{row['weight_gradient_ms']:.1f}",
             f"{row['weight_gradient_as_matmul_ms']:.0f}"]
            for name, row in record["rows"].items()]
    return markdown(["setting", "forward runs on", "forward ms", "forward + both gradients ms", "weight gradient ms",
                     "weight gradient as im2col matmul ms"], rows)


@dataclasses.dataclass(frozen=True)
class ConvSplit:
  caption: str = ""

  def render(self, files: dict) -> str:
    (record,), = files.values()
    cases = ("ynnpack", "ynnpack_slices_2", "ynnpack_slices_4", "eigen")
    rows = []
    for shape, row in record["ms_forward_and_both_gradients"].items():
      b, h, w, cin, cout = shape.split("x")
      rows.append([f"{h}×{w}, {cin} → {cout} (batch {b})", *(f"{row[case]:.1f}" for case in cases)])
    return markdown(["layer, 3×3", "YNNPACK, one call", "2 slices", "4 slices", "Eigen"], rows)


@dataclasses.dataclass(frozen=True)
class StepTime:
  """benchmarks.step_time's record: the package's step (and the same step at the earlier settings) against PyTorch."""
  caption: str = ""

  def render(self, files: dict) -> str:
    (record,), = files.values()
    rows = []
    for result in record["results"]:
      config, cases = result["config"], result["cases"]
      torch_best = max(cases["torch_nchw"]["images_per_s"], cases["torch_cl"]["images_per_s"])
      rows.append([config["model"], "×".join(map(str, config["image_shape"])), str(config["batch_size"]),
                   *(f"{cases[name]['images_per_s']:,.0f} ({cases[name]['images_per_s'] / torch_best:.2f})"
                     for name in ("jax", "jax+xla_dw", "jax+xla_defaults")),
                   f"{torch_best:,.0f}", f"{cases['torch_cl_1t']['images_per_s']:,.0f}"])
    return markdown(["model", "input", "batch", "JAX as recorded, img/s (/ PyTorch)", "JAX, XLA's weight gradients",
                     "JAX, XLA's defaults", "PyTorch eager, faster format, img/s", "PyTorch, 1 thread"], rows)


@dataclasses.dataclass(frozen=True)
class ProfileOps:
  """benchmarks.profile_cpu's ``ops`` section: CPU time per kind of HLO op, summed over threads."""
  case: str = "jax (package as is)"
  caption: str = ""

  def render(self, files: dict) -> str:
    (record,), = files.values()
    ops = record["sections"]["ops"][self.case]
    total = ops["cpu_ms_per_step"]
    rows = [[kind, f"{ms:.0f}", f"{ms / total:.0%}"] for kind, ms in ops["categories_ms"].items() if ms >= 0.5]
    return markdown(["kind", "CPU ms / step", "share of CPU time"], rows)


@dataclasses.dataclass(frozen=True)
class WeightGradSlices:
  slices: tuple = ("1", "8", "16")
  caption: str = ""

  def render(self, files: dict) -> str:
    (record,), = files.values()
    rows = []
    for model, layers in record["rows"].items():
      for layer in layers:
        b, h, w, cin, cout, k, s = layer["layer"]
        one = layer["ms"]["1"]
        rows.append([model, f"{b}, {h}×{w}, {cin} → {cout}, {k}×{k}/{s}", f"{one:.1f}",
                     *(f"{layer['ms'][n]:.1f} ({one / layer['ms'][n]:.2f}×)" for n in self.slices[1:]),
                     str(layer["package_slices"])])
    return markdown(["model", "batch, H×W, C_in → C_out, kernel/stride", "one call ms",
                     *(f"{n} slices ms" for n in self.slices[1:]), "slices the rule picks"], rows)


@dataclasses.dataclass(frozen=True)
class GPUProtocol:
  """benchmarks.gpu_protocol's own tables of a GPU record; the limitation stated where there is none."""
  relpath: str
  caption: str = ""

  def render(self, files: dict) -> str:
    if not (ROOT / self.relpath).is_file():
      return ""  # the section states the limitation
    from benchmarks import gpu_protocol  # noqa: PLC0415  (standard library only)
    return gpu_protocol.markdown(read_records(ROOT / self.relpath)[0])


# ------------------------------------------------------------------------------------------------ the sections


@dataclasses.dataclass(frozen=True)
class Alone:
  """experiments/efficiency.py --alone: each model named alone (``--config.model=NAME``), test accuracy (epochs) and
  the training loop's time per dataset, and the code each ran (its record's ``commit``; for records written before
  they carried one, ``code_commits``: model → commit, else ``code_commit``)."""
  datasets: tuple = ("mnist5k", "digits")
  code_commit: str = ""
  code_commits: tuple = ()
  caption: str = ""

  def render(self, files: dict) -> str:
    results = [r for rs in files.values() for r in rs]
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
      rows = {r["dataset"]: r for r in results if r["model"] == model}
      code = dict(self.code_commits).get(model, self.code_commit)
      commits = dict.fromkeys(rows[d].get("commit", code) for d in self.datasets if d in rows)
      lines.append([f"`{model}`", *(f"{100 * rows[d]['test_accuracy']:.1f} ({rows[d]['epochs']}), "
                                    f"{rows[d]['train_wall_time_s']:.0f} s" if d in rows else "–"
                                    for d in self.datasets), ", ".join(commits)])
    return markdown(["model", *(f"{d}: test acc. % (epochs), train time" for d in self.datasets), "code"], lines)


def _mean_of_means(rows: list, key: str) -> float:
  return statistics.mean(statistics.mean(r[key]) for r in rows)


@dataclasses.dataclass(frozen=True)
class Keypoints:
  """experiments/focus_keypoints.py: per glimpse setting and keypoint variant, per dataset, the test accuracy (mean ±
  std over seeds) and the keypoints' spread over the test images and movement from their start (pixels, the mean
  over keypoints and seeds)."""
  datasets: tuple = ("mnist5k", "mnist5k_shortcut", "mnist5k_glyph")
  variants: tuple = (("learned", "learned"), ("learned_x10", "learned, 10× faster"),
                     ("learned_x100", "learned, 100× faster"), ("frozen", "frozen at the grid"),
                     ("corner", "Harris corners"))
  settings: tuple = (("seed", "K = 3 of 5×5"), ("shipped", "K = 4 of 12×12"))
  caption: str = ""

  def render(self, files: dict) -> str:
    records = [r for rs in files.values() for r in rs]
    lines = []
    for setting, setting_label in self.settings:
      for variant, label in self.variants:
        cells = []
        for dataset in self.datasets:
          rows = [r for r in records if (r["setting"], r["variant"], r["dataset"]) == (setting, variant, dataset)]
          cells.append("–" if not rows else
                       f"{mean_spread([r['test_accuracy'] for r in rows])} / {_mean_of_means(rows, 'spread_px'):.1f}"
                       f" / {_mean_of_means(rows, 'moved_px'):.1f} ({len(rows)})")
        lines.append([setting_label, label, *cells])
    return markdown(["glimpses", "keypoints", *(f"{d}: test acc. % / spread px / moved px (seeds)"
                                                for d in self.datasets)], lines)


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """experiments/saliency_reconstruction.py: per selector, the reconstruction MSE on the test split, the keypoints'
  spread over the test images (pixels, mean over keypoints) and, where recorded, the patch classifier's accuracy."""
  selectors: tuple = (("learned", "learned saliency"), ("seed_as_written", "the seed's code as written"),
                      ("random", "random cells"), ("harris", "Harris corners"))
  caption: str = ""
  only: tuple = ()  # the section's files this table reads (default: all)

  def render(self, files: dict) -> str:
    records = [r for rs in files.values() for r in rs]
    lines = []
    for selector, label in self.selectors:
      rows = [r for r in records if r["selector"] == selector]
      if not rows:
        continue
      accuracy = [r.get("classify_accuracy") for r in rows]
      lines.append([label, str(len(rows)), mean_spread([r["test_mse"] for r in rows], 4, 1.0),
                    f"{_mean_of_means(rows, 'spread_px'):.1f}",
                    "–" if None in accuracy else mean_spread(accuracy)])
    return markdown(["keypoints from", "seeds", "test MSE", "spread px", "patch classifier test acc. %"], lines)


@dataclasses.dataclass(frozen=True)
class LauncherSpeed:
  """benchmarks/sweep_launchers.py: one sweep run by the local and the parallel launcher, wall time of each."""
  caption: str = ""

  def render(self, files: dict) -> str:
    rows = [[str(r["runs"]), str(r["workers"]), str(r["cores"]), f"{r['local_s']:.0f}", f"{r['parallel_s']:.0f}",
             f"{r['speedup']:.2f}×"] for rs in files.values() for r in rs]
    return markdown(["runs", "workers", "cores", "local (s)", "parallel (s)", "local / parallel"], rows)


@dataclasses.dataclass(frozen=True)
class Section:
  page: str
  title: str
  files: tuple  # relpaths, read in this order
  tables: tuple  # specs, rendered in this order
  command: str = ""
  text: str = ""  # what the cells are; the interpretation lives in experiments/README.md and BENCHMARKS.md
  code_commit: str = ""  # the code the runs used, where it is older than the commit that recorded their file
  missing: str = ""  # where its files may not exist yet: what the page says then, before the command


def sh(text: str) -> str:
  """A command as written in the source: the block's common indentation and its first and last newline removed."""
  return textwrap.dedent(text).strip("\n")


SC = "experiments/results/sgdrop_rule_{}_{}.jsonl"
CELL = ("Each cell: decorrelated test accuracy / clean test accuracy / epoch-1 train accuracy on the masked samples "
        "(seeds), %.")
FOUR = ("erm", "sgdrop", "sgdrop_paper", "rsc")
SCREEN = ("erm", "sgdrop_paper", "sgdrop_paper_ramp2", "sgdrop_paper_half", "sgdrop_mass_0.1", "sgdrop_mass_0.25",
          "sgdrop_mass_0.25_ramp2", "sgdrop_mass_0.5", "sgdrop_mass_0.5_ramp1", "sgdrop_mass_0.5_ramp2",
          "sgdrop_mass_0.5_half", "sgdrop_mass_0.75", "sgdrop_mass_0.75_ramp2", "sgdrop_mass_0.75_half",
          "sgdrop_mass_0.9", "sgdrop_mass_spatial_0.25", "sgdrop_mass_spatial_0.25_ramp2", "sgdrop_mass_spatial_0.5",
          "sgdrop_mass_spatial_0.5_ramp2", "sgdrop_mass_spatial_0.75", "sgdrop_mass_channel_0.25",
          "sgdrop_mass_channel_0.5", "sgdrop_channel_0.1", "sgdrop_channel_0.3", "rsc")
SCREEN_FILES = (("patch, shortcut config (6 epochs)", SC.format("patch", "shortcut")),
                ("patch, default config (4 epochs)", SC.format("patch", "default")),
                ("colour, shortcut config (6 epochs)", SC.format("color", "shortcut")))
KINDS = (("patch", "patch"), ("glyph", "glyph"), ("colour", "color"))
DECORRELATED = (Col("decorrelated test acc.", "decorrelated_accuracy"), Col("clean test acc.", "clean_accuracy"))

DOMAINBED_CM = markdown(
    ["selection", "algorithm", "+90%", "+80%", "-90%", "avg"],
    [["training-domain", "ERM", "71.7 ± 0.1", "72.9 ± 0.2", "10.0 ± 0.1", "51.5"],
     ["training-domain", "IRM", "72.5 ± 0.1", "73.3 ± 0.5", "10.2 ± 0.3", "52.0"],
     ["training-domain", "V-REx", "72.4 ± 0.3", "72.9 ± 0.4", "10.2 ± 0.0", "51.8"],
     ["training-domain", "RSC", "71.9 ± 0.3", "73.1 ± 0.2", "10.0 ± 0.2", "51.7"],
     ["oracle", "ERM", "71.8 ± 0.4", "72.9 ± 0.1", "28.7 ± 0.5", "57.8"],
     ["oracle", "IRM", "72.0 ± 0.1", "72.5 ± 0.3", "58.5 ± 3.3", "67.7"],
     ["oracle", "V-REx", "72.8 ± 0.3", "73.0 ± 0.3", "55.2 ± 4.0", "67.0"],
     ["oracle", "RSC", "72.0 ± 0.1", "73.2 ± 0.1", "30.2 ± 1.6", "58.5"]])
DOMAINBED_RM = markdown(
    ["selection", "algorithm", "0°", "15°", "30°", "45°", "60°", "75°", "avg"],
    [["training-domain", "ERM", "95.9 ± 0.1", "98.9 ± 0.0", "98.8 ± 0.0", "98.9 ± 0.0", "98.9 ± 0.0", "96.4 ± 0.0",
      "98.0"],
     ["training-domain", "IRM", "95.5 ± 0.1", "98.8 ± 0.2", "98.7 ± 0.1", "98.6 ± 0.1", "98.7 ± 0.0", "95.9 ± 0.2",
      "97.7"],
     ["training-domain", "V-REx", "95.9 ± 0.2", "99.0 ± 0.1", "98.9 ± 0.1", "98.9 ± 0.1", "98.7 ± 0.1", "96.2 ± 0.2",
      "97.9"],
     ["training-domain", "RSC", "94.8 ± 0.5", "98.7 ± 0.1", "98.8 ± 0.1", "98.8 ± 0.0", "98.9 ± 0.1", "95.9 ± 0.2",
      "97.6"],
     ["oracle", "ERM", "95.3 ± 0.2", "98.7 ± 0.1", "98.9 ± 0.1", "98.7 ± 0.2", "98.9 ± 0.0", "96.2 ± 0.2", "97.8"],
     ["oracle", "IRM", "94.9 ± 0.6", "98.7 ± 0.2", "98.6 ± 0.1", "98.6 ± 0.2", "98.7 ± 0.1", "95.2 ± 0.3", "97.5"],
     ["oracle", "V-REx", "95.5 ± 0.2", "99.0 ± 0.0", "98.7 ± 0.2", "98.8 ± 0.1", "98.8 ± 0.0", "96.4 ± 0.0", "97.9"],
     ["oracle", "RSC", "95.4 ± 0.1", "98.6 ± 0.1", "98.6 ± 0.1", "98.9 ± 0.0", "98.8 ± 0.1", "95.4 ± 0.3", "97.6"]])
DOMAINBED_SOURCE = ("DomainBed's published table (facebookresearch/DomainBed, "
                    "`domainbed/results/2020_10_06_7df6f06/results.tex`: 70,000 digits, 5,000 steps, 20 hyperparameter "
                    "draws × 3 trials, mean ± standard error over trials; SGDrop is not in it), quoted, not a record "
                    "of this repository.")
RM_FILES = tuple(f"{E}dg_rotated_mnist_100steps_{a}.jsonl"
                 for a in ("erm", "rsc_domainbed", "irm", "rsc", "sgdrop", "vrex"))

SECTIONS = (
    # ------------------------------------------------------------------------------------------ shortcuts
    Section(
        "shortcuts", "Shortcuts of three kinds",
        tuple(SC.format(kind, config) for _, kind in KINDS for config in ("shortcut", "default")),
        tuple(PerFile(FOUR + (("sgdrop_element_0.1_ema",) if kind == "color" else ()),
                      ((f"{name}, shortcut config (6 epochs)", SC.format(kind, "shortcut")),
                       (f"{name}, default config (4 epochs)", SC.format(kind, "default"))))
              for name, kind in KINDS),
        sh(r"""
    M="erm sgdrop sgdrop_paper rsc"
    for kind in patch glyph color; do
      python experiments/shortcut.py --kind $kind --runs-dir runs/sg_${kind}_short \
          --out experiments/results/sgdrop_rule_${kind}_shortcut.jsonl --methods $M --seeds 0 1 2
      python experiments/shortcut.py --kind $kind --config overfocus_jax/configs/default.py --epochs 4 \
          --runs-dir runs/sg_${kind}_default --out experiments/results/sgdrop_rule_${kind}_default.jsonl \
          --methods $M --seeds 0 1 2
    done
    for kind in patch glyph; do   # two more seeds of ERM and the default on the default config
      python experiments/shortcut.py --kind $kind --config overfocus_jax/configs/default.py --epochs 4 \
          --runs-dir runs/sg_${kind}_default --out experiments/results/sgdrop_rule_${kind}_default.jsonl \
          --methods erm sgdrop --seeds 3 4
    done
    python experiments/shortcut.py --kind color --runs-dir runs/sg_color_short \
        --out experiments/results/sgdrop_rule_color_shortcut.jsonl --methods sgdrop_element_0.1_ema --seeds 0 1 2
    python experiments/shortcut.py --methods $M --columns experiments/results/sgdrop_rule_patch_{shortcut,default}.jsonl
"""),
        "The residual CNN with the shortcut config (`experiments/configs/shortcut.py`: all stages at stride 2, no "
        "augmentation, 6 epochs) and with the default config (random crops, 4 epochs), on each kind of cue. " + CELL +
        " \"–\": no value (ERM masks nothing; records older than the masked-sample metric have none) or not run. "
        "`sgdrop_element_0.1_ema` is the paper's whole design, its rule with its EMA teacher."),
    Section(
        "shortcuts", "Every model config on the three kinds",
        tuple(SC.format(kind, config) for config in ("focus", "corner", "attention") for _, kind in KINDS),
        tuple(PerFile(FOUR, tuple((name, SC.format(kind, config)) for name, kind in KINDS), row_header=f"`{config}`")
              for config in ("focus", "corner", "attention")),
        sh(r"""
    M="erm sgdrop sgdrop_paper rsc"
    for kind in patch glyph color; do for cfg in focus corner attention; do
      python experiments/shortcut.py --kind $kind --config experiments/configs/$cfg.py \
          --runs-dir runs/sc_${kind}_${cfg} \
          --out experiments/results/sgdrop_rule_${kind}_${cfg}.jsonl --methods $M --seeds 0 1 2
    done; done
    for cfg in focus corner attention; do
      python experiments/shortcut.py --methods $M \
          --columns experiments/results/sgdrop_rule_{patch,glyph,color}_$cfg.jsonl
    done
"""),
        "The focus, corner and attention models as shipped (10 epochs, random crops), on each shortcut dataset. "
        + CELL),
    Section(
        "shortcuts", "ResNet-18 on the local cues",
        (SC.format("patch", "resnet18"), SC.format("glyph", "resnet18")),
        (PerFile(FOUR, (("patch", SC.format("patch", "resnet18")), ("glyph", SC.format("glyph", "resnet18"))),
                 show_seeds=False),),
        sh(r"""
    for kind in patch glyph; do
      python experiments/shortcut.py --kind $kind --config experiments/configs/resnet18.py --epochs 3 \
          --runs-dir runs/sc_r18 --out experiments/results/sgdrop_rule_${kind}_resnet18.jsonl \
          --methods erm sgdrop sgdrop_paper rsc --seeds 0
    done
"""),
        "`experiments/configs/resnet18.py` at 3 of its 10 epochs, seed 0. Each cell: decorrelated / clean / epoch-1 "
        "masked train accuracy, %."),
    Section(
        "shortcuts", "The paper's EMA teacher on longer runs",
        (f"{E}sgdrop_ema_long_patch_shortcut.jsonl", f"{E}sgdrop_ema_long_color_shortcut.jsonl"),
        (PerFile(("erm", "sgdrop", "sgdrop_ema", "sgdrop_paper", "sgdrop_element_0.1_ema",
                  "sgdrop_mass_0.5_ramp1_half"),
                 (("patch", f"{E}sgdrop_ema_long_patch_shortcut.jsonl"),
                  ("colour", f"{E}sgdrop_ema_long_color_shortcut.jsonl"))),),
        sh(r"""
    M="erm sgdrop sgdrop_ema sgdrop_paper sgdrop_element_0.1_ema"
    for kind in patch color; do
      python experiments/shortcut.py --kind $kind --epochs 30 --runs-dir runs/ema_long_$kind \
          --out experiments/results/sgdrop_ema_long_${kind}_shortcut.jsonl --methods $M --seeds 0 1 2
    done
    python experiments/shortcut.py --kind color --epochs 30 --runs-dir runs/ema_long_color \
        --out experiments/results/sgdrop_ema_long_color_shortcut.jsonl --methods sgdrop_mass_0.5_ramp1_half \
        --seeds 0 1 2
"""),
        "The shortcut config trained 30 epochs (930 steps) instead of 6. `sgdrop_ema` is the default with the EMA "
        "teacher (decay 0.99); `sgdrop_element_0.1_ema` the paper's whole design, its rule with the teacher. " + CELL),
    Section(
        "shortcuts", "Sensitivity of the default to its own parameters",
        (SC.format("patch", "shortcut"),),
        (Runs((("erm", "ERM"), ("sgdrop_mass_spatial_0.25_ramp1_half", "m = 0.25, half batch, ramp 1"),
               ("sgdrop", "m = 0.5, half batch, ramp 1 (`sgdrop`, the default)"),
               ("sgdrop_mass_spatial_0.75_ramp1_half", "m = 0.75, half batch, ramp 1"),
               ("sgdrop_mass_spatial_0.5_ramp1", "m = 0.5, whole batch, ramp 1"),
               ("sgdrop_mass_spatial_0.5_half", "m = 0.5, half batch, no ramp")),
              (*DECORRELATED, Col("epoch-1 acc. on masked samples", "first_epoch_masked_accuracy")),
              row_header="setting (spatial units, cap 0.5)"),),
        sh(r"""
    python experiments/shortcut.py --kind patch --runs-dir runs/sg_patch_short \
        --out experiments/results/sgdrop_rule_patch_shortcut.jsonl --methods erm sgdrop_mass_spatial_0.25_ramp1_half \
        sgdrop sgdrop_mass_spatial_0.75_ramp1_half sgdrop_mass_spatial_0.5_ramp1 sgdrop_mass_spatial_0.5_half \
        --seeds 0 1 2
"""),
        "The mass share `m` and the batch fraction of the default's rule, on the planted patch with the shortcut "
        "config; mean ± std over seeds, %."),
    Section(
        "shortcuts", "SGDrop's rules screened on one seed",
        tuple(relpath for _, relpath in SCREEN_FILES),
        (PerFile(SCREEN, SCREEN_FILES, ("decorrelated_accuracy", "clean_accuracy", "first_epoch_train_accuracy"),
                 seeds=(0,), show_seeds=False),),
        'M="' + " \\\n   ".join(" ".join(SCREEN[i:i + 4]) for i in range(0, len(SCREEN), 4)) + '"\n'
        "python experiments/shortcut.py --kind patch --runs-dir runs/sg_patch_short \\\n"
        "    --out experiments/results/sgdrop_rule_patch_shortcut.jsonl --methods $M --seeds 0\n"
        "python experiments/shortcut.py --kind patch --config overfocus_jax/configs/default.py --epochs 4 \\\n"
        "    --runs-dir runs/sg_patch_default --out experiments/results/sgdrop_rule_patch_default.jsonl --methods $M "
        "--seeds 0\n"
        "python experiments/shortcut.py --kind color --runs-dir runs/sg_color_short \\\n"
        "    --out experiments/results/sgdrop_rule_color_shortcut.jsonl --methods $M --seeds 0",
        "Seed 0. `mass_M`: `rule=mass`, `mass=M`, cap `rate=0.5`, element units unless `spatial` or `channel` is "
        "named; `rampR`: `ramp_epochs=R`; `half`: `batch_fraction=0.5`; `sgdrop_paper`: the paper's rule (element, "
        "ρ = 0.1); `sgdrop_{unit}_{ρ}` the same rule at other units and rates (`experiments/methods.py`). Each cell: "
        "decorrelated / clean test accuracy / epoch-1 train accuracy of the whole batch, %; \"–\": not run on that "
        "setting."),
    Section(
        "shortcuts", "The leading candidates on three seeds",
        tuple(relpath for _, relpath in SCREEN_FILES),
        (PerFile(("erm", "sgdrop_mass_spatial_0.25", "sgdrop_mass_0.5_ramp2", "rsc"), SCREEN_FILES,
                 ("decorrelated_accuracy", "clean_accuracy", "first_epoch_train_accuracy"), seeds=(0, 1, 2)),),
        sh(r"""
    M="erm sgdrop_mass_spatial_0.25 sgdrop_mass_0.5_ramp2 rsc"
    python experiments/shortcut.py --kind patch --runs-dir runs/sg_patch_short \
        --out experiments/results/sgdrop_rule_patch_shortcut.jsonl --methods $M --seeds 0 1 2
    python experiments/shortcut.py --kind patch --config overfocus_jax/configs/default.py --epochs 4 \
        --runs-dir runs/sg_patch_default --out experiments/results/sgdrop_rule_patch_default.jsonl \
        --methods $M --seeds 0 1 2
    python experiments/shortcut.py --kind color --runs-dir runs/sg_color_short \
        --out experiments/results/sgdrop_rule_color_shortcut.jsonl --methods $M --seeds 0 1 2
"""),
        "Seeds 0, 1 and 2. Each cell: decorrelated / clean test accuracy / epoch-1 train accuracy of the whole batch, "
        "mean ± std, % (seeds)."),
    Section(
        "shortcuts", "The paper's rule by unit and rate",
        (f"{E}shortcut.jsonl",),
        (Runs((("erm", "ERM"), ("rsc", "RSC (official)"), ("sgdrop_spatial_0.3", "SGDrop, spatial, ρ = 0.3"),
               ("sgdrop_element_0.03", "SGDrop, element, ρ = 0.03"), ("sgdrop_element_0.1", "SGDrop, element, ρ = 0.1"),
               ("sgdrop_element_0.1_ema", "SGDrop, element, ρ = 0.1, EMA teacher"),
               ("sgdrop_spatial_0.3_ema", "SGDrop, spatial, ρ = 0.3, EMA teacher"),
               ("sgdrop_spatial_0.1", "SGDrop, spatial, ρ = 0.1"), ("sgdrop_channel_0.1", "SGDrop, channel, ρ = 0.1"),
               ("rsc_domainbed", "RSC (DomainBed's)"), ("sgdrop_element_0.3", "SGDrop, element, ρ = 0.3"),
               ("sgdrop_channel_0.3", "SGDrop, channel, ρ = 0.3")),
              (*DECORRELATED, Col("train acc.", "train_accuracy"))),),
        sh(r"""
    python experiments/shortcut.py --seeds 0 1 2 --methods erm sgdrop_element_0.1 sgdrop_spatial_0.3 rsc rsc_domainbed \
        sgdrop_element_0.03 sgdrop_element_0.3 sgdrop_spatial_0.1 sgdrop_channel_0.1 sgdrop_channel_0.3 \
        sgdrop_element_0.1_ema sgdrop_spatial_0.3_ema
"""),
        "The planted patch, shortcut config (latent map 4×4×128), 6 epochs: the paper's rule with an exact count of "
        "⌈ρN⌉ units at each granularity, against ERM and both RSCs; mean ± std over seeds, %."),
    Section(
        "shortcuts", "How concentrated the latent attribution is",
        (f"{E}attribution_mass_erm.jsonl",),
        (AttributionMass(),),
        sh(r"""
    for s in 0 1 2; do python experiments/attribution_mass.py runs/shortcut/erm_s$s; done \
        > experiments/results/attribution_mass_erm.jsonl
"""),
        "On the ERM models of the table above (one per seed): the share of each test image's positive latent "
        "attribution `A(z, c)` held by the top 3%, 10% and 30% of its units, mean over the 1,000 test images, "
        "then mean ± std over the runs."),
    Section(
        "shortcuts", "Where the shortcut models look",
        (f"{E}patch_attribution.jsonl", f"{E}shortcut_tracked.jsonl", f"{E}shortcut_training_curves.png",
         f"{E}explain_shortcut_erm_vs_rsc"),
        (PatchAttribution((("erm", "ERM"), ("sgdrop_element_0.03", "SGDrop, element, ρ = 0.03"),
                           ("sgdrop_spatial_0.3", "SGDrop, spatial, ρ = 0.3"), ("rsc", "RSC (official)")),
                          only=(f"{E}patch_attribution.jsonl",)),
         Figure(f"{E}shortcut_training_curves.png", "attribution ratio and generalization gap per epoch"),
         Figure(f"{E}explain_shortcut_erm_vs_rsc/attributions.png", "attribution maps of ERM and RSC, seed 0",
                caption="`overfocus explain` on seed 0's ERM and RSC runs: attribution maps of test images (latent, "
                "Grad-CAM, input gradient, SmoothGrad, integrated gradients), and below the channels each run's test "
                "images use."),
         FeatureUsage(only=(f"{E}explain_shortcut_erm_vs_rsc",))),
        sh(r"""
    python experiments/shortcut.py --runs-dir runs/shortcut_tracked --out experiments/results/shortcut_tracked.jsonl \
        --methods erm sgdrop_element_0.03 sgdrop_spatial_0.3 rsc --seeds 0 1 2
    python experiments/patch_attribution.py runs/shortcut_tracked/{erm,sgdrop_element_0.03,sgdrop_spatial_0.3,rsc}_s?
    overfocus explain --workdir runs/shortcut_tracked/erm_s0 --compare runs/shortcut_tracked/rsc_s0 \
        --out experiments/results/explain_shortcut_erm_vs_rsc
"""),
        "The patch share of a map is the fraction of its total on the 3×3 patch, which covers 1.1% of the image. "
        "*Aligned*: the 1,000 held-out digits with the patch at their label's position, attributing the true class; "
        "*decorrelated*: the benchmark's test images, attributing the predicted class; *follows patch*: decorrelated "
        "images classified as the class the patch's position encodes (10% by chance). Mean ± std over seeds, %; the "
        "figure draws the attribution ratio and the generalization gap per epoch, mean over seeds."),
    # ------------------------------------------------------------------------------------------ no collapse
    Section(
        "shortcuts", "The shortcut table through the sweep engine",
        (f"{E}shortcut_through_sweep.jsonl", f"{E}shortcut_in_process.jsonl"),
        (PerFile(("erm", "sgdrop", "rsc"),
                 (("through `overfocus sweep run`", f"{E}shortcut_through_sweep.jsonl"),
                  ("in one process", f"{E}shortcut_in_process.jsonl"))),),
        sh(r"""
    overfocus sweep run --config experiments/configs/shortcut_sweep.py --out sweeps/shortcut_engine --only \
        'kind=patch-method=erm-seed=0' 'kind=patch-method=sgdrop-seed=0' 'kind=patch-method=rsc-seed=0'
    python experiments/shortcut.py --from-sweep sweeps/shortcut_engine --kind patch --methods erm sgdrop rsc \
        --out experiments/results/shortcut_through_sweep.jsonl
    python experiments/shortcut.py --kind patch --methods erm sgdrop rsc --seeds 0 \
        --out experiments/results/shortcut_in_process.jsonl
"""),
        "The patch shortcut on the shortcut config, seed 0, trained once as jobs of "
        "`experiments/configs/shortcut_sweep.py` (each an `overfocus train` process, the local launcher) and once "
        "by `shortcut.py` in its own process; both with every core. " + CELL,
        code_commit="3b17f08"),
    Section(
        "no_collapse", "No collapse on any shipped model config",
        (f"{E}no_collapse.jsonl",),
        (NoCollapse(("default", "shortcut", "resnet18", "attention", "focus", "corner"),
                    ("erm", "sgdrop", "sgdrop_mass_spatial_0.5_half", "sgdrop_paper", "sgdrop_paper_half", "rsc")),),
        sh(r"""
    python experiments/no_collapse.py --configs default shortcut focus corner attention \
        --methods erm sgdrop sgdrop_paper rsc --seeds 0 1 2
    python experiments/no_collapse.py --configs default shortcut focus corner \
        --methods sgdrop_paper_half sgdrop_mass_spatial_0.5_half --seeds 0 1 2
    python experiments/no_collapse.py --configs resnet18 --epochs 3 --methods erm sgdrop rsc --seeds 0 1 2
    python experiments/no_collapse.py --table-only --configs default shortcut resnet18 attention focus corner \
        --methods erm sgdrop sgdrop_mass_spatial_0.5_half sgdrop_paper sgdrop_paper_half rsc
"""),
        "Each config on its own data (the shortcut config on the planted patch: its test accuracy is the "
        "decorrelated one), mean ± std over seeds, %; Δ is the mean gap to ERM's test accuracy, paired by seed. "
        "`sgdrop` is the library's default, `sgdrop_mass_spatial_0.5_half` the same without its one-epoch ramp, "
        "`sgdrop_paper` the paper's setting and `sgdrop_paper_half` that setting on half of each batch."),
    Section(
        "no_collapse", "The later backbones",
        (f"{E}no_collapse.jsonl",),
        (NoCollapse(("vgg16", "convnext", "mnist_cnn"), ("erm", "sgdrop", "rsc")),),
        sh(r"""
    python experiments/no_collapse.py --configs vgg16 mnist_cnn convnext --methods erm sgdrop rsc --seeds 0 1 2
    python experiments/no_collapse.py --configs convnext --epochs 5 --methods erm --seeds 0 1 2
    python experiments/no_collapse.py --configs convnext --epochs 5 --methods sgdrop --seeds 0
    python experiments/no_collapse.py --configs mnist_cnn --dataset mnist5k --epochs 3 --methods erm sgdrop rsc \
        --seeds 0 1 2
    python experiments/no_collapse.py --configs mnist_cnn --dataset mnist5k --methods erm sgdrop rsc --seeds 0 1 2
    python experiments/no_collapse.py --table-only --configs vgg16 convnext mnist_cnn --methods erm sgdrop rsc
"""),
        "vgg16, convnext and mnist_cnn, whose own data is DomainBed's ColoredMNIST with the −90% environment held out "
        "(test accuracy there measures the colour rule; chance 50%), and mnist_cnn on plain digits (`mnist5k`). "
        "Mean ± std over seeds, %; Δ paired by seed."),
    Section(
        "no_collapse", "RSC's two modes on the corner model",
        (f"{E}no_collapse.jsonl", f"{E}no_collapse_rsc_modes.jsonl"),
        (NoCollapse(("corner",), ("erm", "rsc", "rsc_channel", "rsc_spatial")),),
        sh(r"""
    python experiments/no_collapse.py --configs corner --methods rsc_channel rsc_spatial --seeds 0 1 2 \
        --out experiments/results/no_collapse_rsc_modes.jsonl
"""),
        "`rsc_channel` and `rsc_spatial` are the official RSC in one mode only; `rsc` is the corner config's own "
        "setting, `regularizer.rsc.spatial_probability = 1` (`experiments/configs/corner.py`). Mean ± std over seeds, "
        "%; Δ paired by seed."),
    Section(
        "no_collapse", "ResNet-18 at its full 10 epochs",
        (f"{E}no_collapse_resnet18_10ep.jsonl",),
        (NoCollapse(("resnet18",), ("erm", "sgdrop", "rsc")),),
        sh(r"""
    OVERFOCUS_ONEDNN=off python experiments/no_collapse.py --configs resnet18 --methods erm sgdrop rsc --seeds 0 1 2 \
        --out experiments/results/no_collapse_resnet18_10ep.jsonl
"""),
        "`experiments/configs/resnet18.py` as shipped, with XLA's convolutions (`OVERFOCUS_ONEDNN=off`); mean ± std "
        "over seeds, %; Δ paired by seed."),
    Section(
        "no_collapse", "The paper's whole design at the shipped configs' length",
        (f"{E}no_collapse.jsonl", f"{E}no_collapse_ema_screen.jsonl"),
        (NoCollapse(("default", "attention", "focus", "corner"), ("erm", "sgdrop_element_0.1_ema")),),
        sh(r"""
    python experiments/no_collapse.py --configs focus corner default attention --methods sgdrop_element_0.1_ema \
        --seeds 0 --out experiments/results/no_collapse_ema_screen.jsonl
"""),
        "The paper's rule with its EMA teacher (`sgdrop_element_0.1_ema`), seed 0, beside ERM's three seeds; Δ is "
        "paired with ERM's seed 0."),
    Section(
        "no_collapse", "The attribution ratio and the generalization gap",
        (f"{E}explain_default_erm_vs_sgdrop",),
        (Figure(f"{E}explain_default_erm_vs_sgdrop/training_curves.png",
                "ERM vs SGDrop's default on the default config"),
         FeatureUsage()),
        sh(r"""
    python experiments/no_collapse.py --configs default --methods erm sgdrop --seeds 0
    overfocus explain --workdir runs/no_collapse/default_sgdrop_s0 --compare runs/no_collapse/default_erm_s0 \
        --out experiments/results/explain_default_erm_vs_sgdrop
"""),
        "The paper's Fig. 1 for ERM and SGDrop's default on the default config, seed 0: per epoch, the latent "
        "attribution ratio (the share of latent units holding half of the attribution; small = overfocused) and the "
        "generalization gap; below, how many of the 128 latent channels the test images use (`explain.json`)."),
    # ------------------------------------------------------------------------------------------ DomainBed
    Section(
        "domain_generalization", "ColoredMNIST at 100 steps",
        (f"{E}dg_colored_mnist_100steps.jsonl",),
        (DomainBed("colored_mnist"),),
        sh(r"""
    python -m overfocus_jax.dg.sweep --out experiments/runs/dg_cmnist_e5 --datasets colored_mnist \
        --algorithms erm irm vrex rsc_domainbed sgdrop --epochs 5 \
        --config.objective.irm.anneal_steps=50 --config.objective.vrex.anneal_steps=50
    python -m overfocus_jax.dg.sweep --out sweeps/cm_e5 --datasets colored_mnist --algorithms rsc --epochs 5
    cat experiments/runs/dg_cmnist_e5/*/results.jsonl sweeps/cm_e5/*/results.jsonl \
        > experiments/results/dg_colored_mnist_100steps.jsonl
    python -m overfocus_jax.dg.tables experiments/results/dg_colored_mnist_100steps.jsonl --dataset colored_mnist
"""),
        "DomainBed's protocol with MNIST_CNN (`experiments/configs/mnist_cnn.py`) on ColoredMNIST built from mnist5k, "
        "each environment held out in turn, one trial, hyperparameter seed 0, 100 steps a run (5 epochs of 20; IRM's "
        "and V-REx's penalties from step 50). Test-environment in-split accuracy of the selected checkpoint, %; one "
        "trial, so no spread."),
    Section(
        "domain_generalization", "DomainBed's published ColoredMNIST table", (),
        (Static(DOMAINBED_CM, DOMAINBED_SOURCE),),
        text="The same selections in DomainBed's conditions, for scale."),
    Section(
        "domain_generalization", "The reference-exact RSCs",
        (f"{E}dg_colored_mnist_100steps_exact.jsonl", f"{E}dg_rotated_mnist_100steps_exact.jsonl"),
        (DomainBed("colored_mnist"), DomainBed("rotated_mnist")),
        sh(r"""
    python -m overfocus_jax.dg.sweep --out sweeps/cm_exact --datasets colored_mnist --algorithms rsc rsc_domainbed \
        --epochs 5
    python -m overfocus_jax.dg.tables sweeps/cm_exact --dataset colored_mnist
    python -m overfocus_jax.dg.sweep --out sweeps/rm_exact --datasets rotated_mnist --algorithms rsc rsc_domainbed \
        --epochs 10 --config.batch_size=320
    python -m overfocus_jax.dg.tables sweeps/rm_exact --dataset rotated_mnist
"""),
        "`rsc` and `rsc_domainbed` with their reference code's thresholds, ties and counts (`rule=\"reference\"`, the "
        "default), on the 100-step protocol of ColoredMNIST above and of RotatedMNIST below; each environment held "
        "out in turn, one trial. Test-environment in-split accuracy, %.",
        code_commit="e914eb2"),
    Section(
        "domain_generalization", "Three trials under each tie rule",
        (f"{E}dg_colored_mnist_te0_spread_reference.jsonl", f"{E}dg_colored_mnist_te0_spread_topk.jsonl"),
        (DomainBed("colored_mnist", sources=(("`rule=reference`", f"{E}dg_colored_mnist_te0_spread_reference.jsonl"),
                                             ("`rule=topk`", f"{E}dg_colored_mnist_te0_spread_topk.jsonl")),
                   envs=(0,), by_selection=True),
         DomainBedTrials("colored_mnist", (("`rule=reference`", f"{E}dg_colored_mnist_te0_spread_reference.jsonl"),
                                           ("`rule=topk`", f"{E}dg_colored_mnist_te0_spread_topk.jsonl")),
                         caption="Per trial, the checkpoint each rule selects: its +90% in-split accuracy (%) and "
                         "step.")),
        sh(r"""
    python -m overfocus_jax.dg.sweep --out sweeps/cm_spread_reference --datasets colored_mnist \
        --algorithms rsc_domainbed rsc --epochs 5 --n-trials 3 --test-envs 0
    python -m overfocus_jax.dg.sweep --out sweeps/cm_spread_topk --datasets colored_mnist \
        --algorithms rsc_domainbed rsc --epochs 5 --n-trials 3 --test-envs 0 \
        --config.regularizer.rsc_domainbed.rule=topk --config.regularizer.rsc.rule=topk
    python -m overfocus_jax.dg.tables sweeps/cm_spread_reference --dataset colored_mnist --spread std
"""),
        "ColoredMNIST at 100 steps with +90% held out, three trials, once with each rule (`rule=topk` drops exactly "
        "⌈f·N⌉ units, ties to the lower index) and otherwise the same code. Mean ± standard deviation over trials "
        "(np.std), %.",
        code_commit="23a960f"),
    Section(
        "domain_generalization", "Colour or digit: ColoredMNIST at 200 steps",
        (f"{E}dg_colored_mnist_200steps_te2.jsonl", f"{E}colour_attribution_200steps.jsonl"),
        (DomainBed("colored_mnist", envs=(2,), only=(f"{E}dg_colored_mnist_200steps_te2.jsonl",)),
         ColourEvidence(
             only=(f"{E}colour_attribution_200steps.jsonl",),
             caption="The two-leg integrated-gradients split of the true class's logit margin, per environment's "
             "out-split (333 images each, never trained on): accuracy and accuracy with the colour flipped, the "
             "colour's and the digit's evidence (logits, +90% / +80% / −90%), the colour's share of the margin, and "
             "the largest completeness residual of the 16-step rule."),
         ColourEvidence(
             tools=True, only=(f"{E}colour_attribution_200steps.jsonl",),
             caption="The share of each tool's relevance on colour-dependent units, +90% / +80% / −90%: SGDrop's "
             "`ReLU(g ⊙ x)` at the input (\"input\"), SGDrop's `A = ReLU(∂ψ_y/∂z ⊙ z)` on the latent map, RSC's "
             "gradient score on the pooled features; \"units\" is the plain mean of each unit's colour dependence "
             "`s = |z − z'| / (|z| + |z'|)` (`z'`: the colour flipped), what a tool blind to the colour would give.")),
        sh(r"""
    python -m overfocus_jax.dg.sweep --out sweeps/cm_colour --datasets colored_mnist \
        --algorithms erm irm vrex rsc_domainbed rsc sgdrop --test-envs 2 --epochs 10 \
        --config.objective.irm.anneal_steps=100 --config.objective.vrex.anneal_steps=100
    cat sweeps/cm_colour/*/results.jsonl > experiments/results/dg_colored_mnist_200steps_te2.jsonl
    python experiments/colour_attribution.py \
        sweeps/cm_colour/colored_mnist-{erm,irm,vrex,rsc_domainbed,rsc,sgdrop}-te2-h0-t0 \
        --out experiments/results/colour_attribution_200steps.jsonl
"""),
        "The protocol at 200 steps (10 epochs of 20), −90% held out, one run per algorithm (IRM's and V-REx's "
        "penalties from step 100); first the held-out environment's in-split accuracy (%), then "
        "`experiments/colour_attribution.py` on each trained network (its docstring has the maths)."),
    Section(
        "domain_generalization", "RotatedMNIST at 100 steps",
        RM_FILES,
        (DomainBed("rotated_mnist"),),
        sh(r"""
    python -m overfocus_jax.dg.sweep --out sweeps/rm --datasets rotated_mnist --algorithms erm --epochs 10 \
        --config.batch_size=320
    python -m overfocus_jax.dg.sweep --out sweeps/rm --datasets rotated_mnist \
        --algorithms rsc_domainbed sgdrop irm vrex rsc --epochs 10 --config.batch_size=320 \
        --config.objective.irm.anneal_steps=50 --config.objective.vrex.anneal_steps=50
    for a in erm rsc_domainbed sgdrop irm vrex rsc; do
      cat sweeps/rm/rotated_mnist-$a-te*/results.jsonl > experiments/results/dg_rotated_mnist_100steps_$a.jsonl; done
    cat experiments/results/dg_rotated_mnist_100steps_{erm,rsc_domainbed,irm,rsc,sgdrop,vrex}.jsonl > /tmp/rm.jsonl
    python -m overfocus_jax.dg.tables /tmp/rm.jsonl --dataset rotated_mnist
"""),
        "RotatedMNIST built from mnist5k (six environments of 833 digits at 0°, 15°, …, 75°; 64 digits of each of the "
        "five training environments per batch), each environment held out in turn, one trial, hyperparameter seed 0, "
        "100 steps (10 epochs of 10; IRM's and V-REx's penalties from step 50). Test-environment in-split accuracy, "
        "%; one trial, so no spread."),
    Section(
        "domain_generalization", "DomainBed's published RotatedMNIST table", (),
        (Static(DOMAINBED_RM, DOMAINBED_SOURCE),),
        text="The same selections in DomainBed's conditions, for scale."),
    # ------------------------------------------------------------------------------------------ data streams
    Section(
        "data_streams", "The two data streams and bfloat16",
        (f"{E}data_paths.jsonl",),
        (DataPaths(),),
        sh(r"""
    python experiments/data_paths.py --seeds 0 1 2
    python experiments/data_paths.py --seeds 0 1 2 --dtype bfloat16 --modes on
    for c in shortcut focus corner attention resnet18; do
      python experiments/data_paths.py --config $c --epochs 1 --seeds 0; done
    python experiments/data_paths.py --config resnet18 --epochs 3 --seeds 0 --modes off
"""),
        "`data_on_device=on` shuffles, crops and normalizes inside the compiled step with the JAX PRNG; `off` runs the "
        "grain pipeline on the host with NumPy's: the same distribution of batches, different draws. Test accuracy "
        "(%), per seed and mean ± std; train images/s, the median over seeds, on a 2-core CPU shared with other "
        "work. These runs used XLA's convolutions."),
    Section(
        "data_streams", "Both streams with the per-step memory kept mapped",
        (f"{E}data_paths_host_memory.jsonl",),
        (StreamSpeed(),),
        sh(r"""
    for c in default shortcut vgg16 attention corner mnist_cnn focus convnext; do
      python experiments/data_paths.py --config $c --epochs 2 --seeds 0 \
          --out experiments/results/data_paths_host_memory.jsonl; done
"""),
        "Every shipped config, two epochs, seed 0, run one after the other: train images/s with the data on the "
        "device and from the host stream (`overfocus_jax/host_memory.py` keeps XLA:CPU's per-step block mapped)."),
    Section(
        "data_streams", "bfloat16 with oneDNN's convolutions",
        (f"{E}data_paths_onednn.jsonl",),
        (DataPaths(),),
        sh(r"""
    python experiments/data_paths.py --seeds 0 1 2 --dtype bfloat16 --modes off \
        --out experiments/results/data_paths_onednn.jsonl
"""),
        "The default run in bfloat16 with oneDNN's bf16 convolutions (the default on a CPU), host stream, three "
        "seeds: test accuracy (%) and train images/s."),
    # ------------------------------------------------------------------------------------------ models
    Section(
        "models", "Every model on mnist5k and digits",
        (f"{E}efficiency.jsonl",),
        (Efficiency(),),
        sh(r"""
    python experiments/efficiency.py
    python experiments/efficiency.py --table-only
"""),
        "Each model's config (`experiments/configs/`), 10 epochs: parameters (exact), FLOPs per 28×28 image from XLA's "
        "cost analysis of the compiled inference forward pass (a multiply-add is 2), train images/s of the compiled "
        "step (`overfocus bench`, batch 128, a shared 2-core CPU: compare models measured in the same run), and test "
        "accuracy on the 1,000 held-out mnist5k digits and the 359 held-out scikit-learn digits (the focus models "
        "read 4-pixel glimpses on the 8×8 digits)."),
    Section(
        "models", "torchvision's ResNets",
        (f"{E}efficiency_tv.jsonl",),
        (Efficiency(),),
        sh(r"""
    python experiments/efficiency.py --models resnet18_tv resnet50_tv --out experiments/results/efficiency_tv.jsonl \
        --runs-dir runs/efficiency_tv
"""),
        "resnet18_tv and resnet50_tv (CIFAR stem; resnet50_tv with `zero_init_residual`, 3 epochs on mnist5k) with "
        "the default run's settings; columns as above."),
    Section(
        "models", "The focus model with learned glimpse sizes",
        (f"{E}efficiency_zoom.jsonl",),
        (Efficiency(),),
        sh(r"""
    python experiments/efficiency.py --models focus focus_zoom --out experiments/results/efficiency_zoom.jsonl \
        --runs-dir runs/efficiency_zoom
"""),
        "`focus_zoom` is the focus config with `focus.zoom=True` (each patch's scale learned), measured beside the "
        "focus model; columns as above."),
    Section(
        "models", "Every model named alone",
        (f"{E}models_alone.jsonl",),
        # Records without a "commit" field: convnext's ran the code of be3391f, the others that of 5939059.
        (Alone(code_commit="5939059", code_commits=(("convnext", "be3391f"),)),),
        sh(r"""
    python experiments/efficiency.py --alone --out experiments/results/models_alone.jsonl --runs-dir sweeps/alone
    python experiments/efficiency.py --alone --models resnet50_tv --datasets mnist5k --runs-dir sweeps/alone   # about an hour on 2 CPU cores
"""),
        "Each model as a new user names it, `overfocus train --config.model=NAME --config.dataset=DATASET` and "
        "nothing else: the default run's batch of 128 and 10 epochs with a cosine schedule, the model's training "
        "recipe (ConvNeXt: AdamW at 4e-3, weight decay 0.05, label smoothing 0.1; the reconstruction model is not a "
        "classifier and is not here; every other model: SGD at 0.1) and each model's `auto` fields sized from the "
        "images. Test accuracy on the 1,000 held-out mnist5k digits and the 359 held-out scikit-learn digits, the "
        "training loop's time on a shared 2-core CPU (other runs sharing it), and the code each row ran (a `+`: the "
        "checkout also held uncommitted edits when the run started, to documents, tests or other models' files; the "
        "row's model and training code were the commit's). The first command skips what the file holds; "
        "`resnet50_tv` on mnist5k is measured by the second.",
        missing="Not run yet; this command measures it:"),
    Section(
        "performance", "Sweep launchers: parallel against local",
        (f"{B}sweep_launchers.json",),
        (LauncherSpeed(),),
        sh(r"""
    python -m benchmarks.sweep_launchers --out benchmarks/results/sweep_launchers.json
"""),
        "The same small sweep (the default model at a quarter of its widths on the 8×8 digits, 2 epochs, four seeds) "
        "run one after another by `--launcher local` and two at a time by `--launcher parallel --workers 2` (each "
        "worker pinned to one of the 2 cores), from fresh folders and without the compilation cache, in one run of "
        "the script on an otherwise idle machine."),
    # ------------------------------------------------------------------------------------------ focus
    Section(
        "focus", "Learned keypoints against frozen ones and Harris corners",
        (f"{E}focus_keypoints.jsonl",),
        (Keypoints(),
         Figure(f"{E}focus_keypoints_figures/seed_learned.png", "learned keypoints on eight test digits",
                caption="Learned keypoints at the seed's setting (mnist5k, seed 0) on eight test digits "
                        "(`overfocus explain`'s keypoints.png):"),
         Figure(f"{E}focus_keypoints_figures/seed_frozen.png", "frozen keypoints on eight test digits",
                caption="The same model with its keypoints frozen at the grid:"),
         Figure(f"{E}focus_keypoints_figures/shipped_learned_shortcut.png",
                "learned keypoints of the shipped setting on the patch-shortcut dataset",
                caption="Learned keypoints at the shipped setting on mnist5k_shortcut (seed 0), tested on digits "
                        "whose patch is at a random place:")),
        sh(r"""
    overfocus sweep run --config experiments/configs/focus_keypoints_sweep.py --out sweeps/focus_keypoints \
        --launcher parallel --workers 2
    python experiments/focus_keypoints.py sweeps/focus_keypoints --out experiments/results/focus_keypoints.jsonl
"""),
        "The focus model at two glimpse settings — the focus seed's (K = 3 glimpses of 5×5 samples over 5/28 of the "
        "side, `experiments/configs/focus_seed.py`) and the shipped one (K = 4 of 12×12 over 0.43) — with its "
        "keypoints learned at the shipped rate (`keypoint_grad_scale=0.01`) and 10× and 100× faster, frozen at their "
        "initial grid, or replaced by Harris corners; 10 epochs on mnist5k and two shortcut datasets (test: their "
        "decorrelated splits). *spread*: how far each keypoint follows the image (the RMS distance from its mean "
        "position over 256 test images); *moved*: how far training took it from the same model's keypoint at "
        "initialisation (0 for corners).",
        code_commit="ae3e041"),
    Section(
        "focus", "Saliency learned by reconstruction",
        tuple(f"{E}saliency_reconstruction_{d}.jsonl" for d in ("mnist5k", "mnist5k_glyph", "mnist5k_shortcut",
                                                                "mnist5k_positions")),
        (Reconstruction(caption="Tested on mnist5k:", only=(f"{E}saliency_reconstruction_mnist5k.jsonl",)),
         Reconstruction(caption="Tested on mnist5k_glyph (the patch classifier trained on its training split, tested "
                                "on its decorrelated split):",
                        only=(f"{E}saliency_reconstruction_mnist5k_glyph.jsonl",)),
         Reconstruction(caption="Tested on mnist5k_shortcut (likewise):",
                        only=(f"{E}saliency_reconstruction_mnist5k_shortcut.jsonl",)),
         Reconstruction(caption="Tested on mnist5k with the decoder also given each patch's position "
                                "(`--decoder-positions`):",
                        only=(f"{E}saliency_reconstruction_mnist5k_positions.jsonl",)),
         Figure(f"{E}saliency_reconstruction_figures/learned.png",
                "the learned saliency's patches, heatmap and reconstruction of eight test digits",
                caption="The learned saliency (seed 0): its five patches on eight test digits, its 7×7 heatmap and "
                        "the reconstruction."),
         Figure(f"{E}saliency_reconstruction_figures/seed_as_written.png",
                "the seed's code as written: patches, heatmap and reconstruction",
                caption="The seed's code as written (seed 0): the heatmap at initialisation picks the patches."),
         Figure(f"{E}saliency_reconstruction_figures/harris.png",
                "Harris corners: patches and reconstruction", caption="Harris corners (seed 0).")),
        sh(r"""
    python experiments/saliency_reconstruction.py --epochs 5 --seeds 0 1 2 --classify \
        --out experiments/results/saliency_reconstruction_mnist5k.jsonl --figures FIGURES
    python experiments/saliency_reconstruction.py --epochs 5 --seeds 0 1 2 --classify --dataset mnist5k_glyph \
        --out experiments/results/saliency_reconstruction_mnist5k_glyph.jsonl
    python experiments/saliency_reconstruction.py --epochs 5 --seeds 0 1 2 --classify --dataset mnist5k_shortcut \
        --out experiments/results/saliency_reconstruction_mnist5k_shortcut.jsonl
    python experiments/saliency_reconstruction.py --epochs 5 --seeds 0 1 2 --decoder-positions \
        --out experiments/results/saliency_reconstruction_mnist5k_positions.jsonl
"""),
        "The focus seed's setting: K = 5 patches of 9×9 pixels from a 7×7 heatmap, the seed's MLP decoder, MSE, Adam "
        "1e-3, batch 16, here 5 epochs of mnist5k's 4,000 training digits (1,250 steps). The decoder is fed the "
        "patches at the learned saliency's soft-argmax keypoints, at the heatmap's top 5 cells with no gradient to "
        "the heatmap (the seed's code as written), at 5 random cells, or at the 5 strongest Harris corners. *test "
        "MSE*: on the test split's 1,000 digits, pixels in [0, 1]; *spread*: how far each keypoint moves across "
        "the test images (RMS distance from its mean position, pixels, mean over keypoints); *patch classifier*: the "
        "focus models' patch encoder and head trained (Adam 1e-3, batch 128, 10 epochs) on the K patches of the "
        "frozen saliency (or the baseline's positions) on the dataset's training split.",
        code_commit="20b4ec3 (the positions run: 5939059)"),
    Section(
        "focus", "The reconstruction model through the CLI",
        (f"{E}saliency_reconstruction_cli.jsonl",),
        (Runs(rows=(("soft-mlp", "learned saliency, the seed's decoder"),
                    ("hard-mlp", "the seed's code as written (`select=hard`)"),
                    ("soft-vae64", "learned saliency, a variational decoder (64-unit latent, β = 1)")),
              columns=(Col("test MSE", "test_mse", scale=1.0, digits=4),), row_field="variant",
              row_header="model"),),
        sh(r"""
    overfocus sweep run --config experiments/configs/saliency_reconstruction_sweep.py --out sweeps/reconstruction
    python -c "import json; from overfocus_jax.sweeps import results
    for r in results.read('sweeps/reconstruction'):
        p = dict(x.split('=', 1) for x in r['job'].split('-'))
        print(json.dumps({'variant': p['select'] + '-' + p['decoder'], 'seed': int(p['seed']),
                          'test_mse': r['test_mse'], 'epochs': r['epochs'], 'run': r['job']}))" \
        > experiments/results/saliency_reconstruction_cli.jsonl
"""),
        "`overfocus train --config experiments/configs/saliency_reconstruction.py` (`--config.model=reconstruction`) "
        "at the setting above (K = 5 patches of 9×9, the seed's decoder, Adam 1e-3, batch 16, 5 epochs of "
        "mnist5k), with the library's data stream, checkpoints and summary; *test MSE*: the summary's `test_mse` on "
        "the 1,000 held-out digits, pixels in [0, 1]. The variational decoder adds a Gaussian latent between the "
        "patches and the MLP and its KL term (`reconstruction.latent=64`, `kl_weight=1`); its test MSE is that of "
        "the latent's mean.",
        code_commit="6632ccb (the variational decoder: 37343ca)",
        missing="Not run yet; this command measures it:"),
    Section(
        "focus", "The focus models at the reconstruction experiment's setting",
        (f"{E}focus_k5.jsonl",),
        tuple(Runs(rows=(("focus", "focus (learned keypoints)"), ("corner", "corner (Harris corners)")),
                   columns=(Col("test acc. %", "test_accuracy"),), row_field="model", where=(("dataset", d),),
                   row_header="model", caption=f"On {d}:")
              for d in ("mnist5k", "mnist5k_glyph", "mnist5k_shortcut")),
        sh(r"""
    overfocus sweep run --config experiments/configs/focus_k5_sweep.py --out sweeps/focus_k5 \
        --launcher parallel --workers 2
    python -c "import json; from overfocus_jax.sweeps import results
    for r in results.read('sweeps/focus_k5'):
        p = dict(x.split('=', 1) for x in r['job'].split('-'))
        print(json.dumps({'model': p['model'], 'dataset': p['dataset'], 'seed': int(p['seed']),
                          'test_accuracy': r['test_accuracy'], 'epochs': r['epochs'], 'run': r['job']}))" \
        > experiments/results/focus_k5.jsonl
"""),
        "`focus` and `corner` with K = 5 glimpses of 9×9 over 9/28 of the side, trained end to end with the default "
        "run's settings (SGD 0.1, cosine, 10 epochs), three seeds; on the shortcut datasets, their decorrelated "
        "test splits.",
        code_commit="5939059"),
    # ------------------------------------------------------------------------------------------ performance
    Section(
        "performance", "The train loop against PyTorch eager on a CPU",
        (f"{B}cpu_end_to_end.json", f"{B}cpu_end_to_end_run2.json", f"{B}cpu_end_to_end_run3.json"),
        (EndToEnd(),),
        sh(r"""
    python -m benchmarks.gpu_protocol --device cpu --models resnet --batch-sizes 128 --dtypes float32 bfloat16 \
        --torch-modes eager --sections steps end_to_end --rounds 5 --steps 4 \
        --out benchmarks/results/cpu_end_to_end.json
"""),
        "Three runs of one command on a 2-core AMD EPYC (the third in a fresh clone's virtual environment): the "
        "package's compiled step and the PyTorch eager peer of the same model and step (torch 2.13.0, 2 threads, "
        "channels-last; bfloat16 is `torch.autocast`), interleaved, 5 rounds after 5 untimed steps each, medians; "
        "then `overfocus bench`'s whole train loop (data, step, host syncs) in the same command. Ratios are speeds."),
    Section(
        "performance", "XLA:CPU's temporaries",
        (f"{B}host_memory.json",),
        (HostMemory(),),
        sh(r"""
    python -m benchmarks.host_memory
"""),
        "The default model's step with XLA:CPU's per-step block of temporaries kept mapped (the package: "
        "`overfocus_jax/host_memory.py`) and with glibc's default (`OVERFOCUS_HOST_MEMORY=default`), beside the "
        "PyTorch eager peer; 5 interleaved rounds of 4 steps after 5 untimed ones, medians; the page faults are "
        "the median timed block's."),
    Section(
        "performance", "oneDNN's convolutions in every shipped config",
        (f"{B}onednn_models_host_memory.json", f"{B}onednn_models_bf16.json"),
        (OneDNNModels(),),
        sh(r"""
    python -m benchmarks.onednn_models --rounds 3
    python -m benchmarks.onednn_models --dtype bfloat16 --rounds 3 --steps 3
"""),
        "Per shipped config, the train step with the package's oneDNN convolutions (`overfocus_jax/onednn.py`) and "
        "the same step with XLA's (`platform_tuning=xla`), built in one process from the same state and batch and "
        "timed interleaved, medians; the last column is the largest difference between the two steps' parameters "
        "after one step. The models whose `Platform` sets `onednn=True` use them."),
    Section(
        "performance", "Regularizer overhead",
        (f"{B}regularizer_overhead_jax_cpu_hostmem.jsonl", f"{B}regularizer_overhead_torch_cpu.jsonl"),
        (Overhead(),),
        sh(r"""
    python -m benchmarks.regularizer_overhead --rounds 5 --steps 8
    python -m benchmarks.torch_regularizers --rounds 5 --steps 4
"""),
        "Each regularizer's step against the plain step on the same model (the default residual CNN), batch (128 "
        "mnist5k digits) and mesh, compiled in one process and timed in 5 interleaved rounds, medians. The two "
        "frameworks were measured in different runs: compare ratios within a framework. `sgdrop (default)` is the "
        "library's default, `sgdrop (element)` the paper's element rule (ρ = 0.1), `sgdrop (spatial)` positions at "
        "ρ = 0.3."),
    Section(
        "performance", "Float32 accuracy of the normalisations",
        (f"{B}float32_accuracy.json",),
        (Float32Accuracy(),
         Float32Accuracy(speed=True, caption="What they cost: the jitted train step with each, timed "
                                            "in interleaved rounds in the same run.")),
        sh(r"""
    python -m benchmarks.float32_accuracy --out benchmarks/results/float32_accuracy.json
"""),
        "The largest |g32 − g64| of the loss gradients over every parameter (the same float32 weights and batch run "
        "again in float64) with the library's normalisations (`overfocus_jax/models/norms.py`: statistics summed in "
        "blocks) and with flax's (`use_fast_variance=False`, one reduction), three weight draws each; for DomainBed's "
        "MNIST_CNN also PyTorch's own float32 error on the same weights and batch. In brackets: the largest |g64|."),
    Section(
        "performance", "Reference variants against their reference code",
        (f"{B}reference_peers.json",),
        (ReferencePeers(),),
        sh(r"""
    pip install -e ".[peers]"
    python -m benchmarks.reference_peers --out benchmarks/results/reference_peers.json
"""),
        "One full update of each variant against a line-by-line PyTorch transcription of its reference "
        "(DomainBed's `RSC.update`; the official RSC's masking in `ResNet.forward`) from the same weights and batch, "
        "ties included (`tests/test_peers.py` asserts the same cases)."),
    Section(
        "performance", "XLA:CPU's library flags",
        (f"{B}library_flags.json",),
        (LibraryFlags(),),
        sh(r"""
    python -m benchmarks.library_flags --repeats 5
"""),
        "A 3×3 convolution at batch 128, 28×28×32 → 32, under each of jaxlib 0.10.2's kernel-library flags (each in "
        "its own process), what the compiled HLO hands its forward pass to, and its times; the last row is the "
        "package's own route to oneDNN."),
    Section(
        "performance", "YNNPACK's one-core convolutions on batch slices",
        (f"{B}conv_split.json",),
        (ConvSplit(),),
        sh(r"""
    python -m benchmarks.conv_split
"""),
        "Forward and both gradients of a 3×3 convolution at batch 128, ms: YNNPACK in one call, the batch cut into "
        "independent slices in one program, and Eigen; 5 interleaved rounds, medians."),
    Section(
        "performance", "GPU protocol",
        (f"{B}gpu.json",),
        (GPUProtocol(f"{B}gpu.json"),),
        sh(r"""
    python -m benchmarks.gpu_protocol --out benchmarks/results/gpu.json
"""),
        "The same-maths check, the package's step against PyTorch eager and `torch.compile` with MFU, the "
        "regularizers' overhead, the drop-mask kernels and `overfocus bench` end to end, on an NVIDIA GPU "
        "(BENCHMARKS.md, \"GPU protocol\").",
        missing="Not measured on a GPU; this command measures it:"),
    Section(
        "performance", "The train step before oneDNN",
        (f"{B}cpu.json",),
        (StepTime(),),
        sh(r"""
    git worktree add ../overfocus-55adba1 55adba1 && cd ../overfocus-55adba1
    python benchmarks/step_time.py
"""),
        "The package's step with Eigen convolutions and sliced weight gradients (the `platform_tuning=xla` of "
        "today), with XLA's own weight gradients, and with XLA's default compilation, beside the PyTorch eager peer "
        "(faster of NCHW and channels-last) and PyTorch on one thread; Intel Xeon, 2 cores, 7 interleaved rounds of "
        "4 steps, medians. In brackets: the ratio to PyTorch (speed)."),
    Section(
        "performance", "Where the step's CPU time went",
        (f"{B}profile_cpu.json",),
        (ProfileOps(),),
        sh(r"""
    git worktree add ../overfocus-669617d 669617d && cd ../overfocus-669617d
    python benchmarks/profile_cpu.py
"""),
        "A `jax.profiler` trace of the default step as XLA compiles it by default (YNNPACK convolutions, the "
        "`platform_tuning=off` of today), batch 128, 28×28×1: CPU time per kind of HLO op, summed over both threads."),
    Section(
        "performance", "Weight gradients summed over batch slices",
        (f"{B}weight_grad_slices.json",),
        (WeightGradSlices(),),
        sh(r"""
    git worktree add ../overfocus-173b1d8 173b1d8 && cd ../overfocus-173b1d8
    python benchmarks/weight_grad_slices.py
"""),
        "Each layer's weight gradient, XLA's single call against the sum over batch slices (ms per call, median of 7 "
        "blocks of 3; all 2–32-slice columns are in the record), with Eigen convolutions; the last column is what "
        "`platform_tuning.slice_count` picks, the rule read off this table."),
)

PAGES = {  # stem: (title, what it holds, introduction)
    "shortcuts": (
        "Shortcuts", "ERM, SGDrop and RSC on digits with a patch, colour or glyph shortcut",
        "The mnist5k digits with a cue that follows the label in 95% of training images and is drawn at random in test "
        "images (`overfocus_jax/data/shifts.py`): a bright 3×3 *patch* whose place in the border codes the class "
        "(`mnist5k_shortcut`), the strokes tinted with the class's *colour* (`mnist5k_color`), or a 4×4 *glyph* of the "
        "class stamped in a random corner (`mnist5k_glyph`). *Decorrelated*: the test images with the cue at random; "
        "*clean*: the same digits without it. Method names are those of `experiments/methods.py`; `sgdrop` is the "
        "library's default."),
    "no_collapse": (
        "No collapse", "whether a regularizer collapses training, on every shipped model config",
        "Does a regularizer collapse training? Per shipped model config, the epoch-1 train accuracy on the samples the "
        "regularizer masked (at or below chance, the masks removed all of the class evidence) and the final test "
        "accuracy against ERM's (`experiments/no_collapse.py`). The rule a default must meet: masked samples above "
        "chance in epoch 1, test accuracy within a point of ERM's (mean of 3 seeds)."),
    "domain_generalization": (
        "Domain generalization", "DomainBed's protocol on ColoredMNIST and RotatedMNIST at a CPU budget",
        "DomainBed's protocol (`overfocus_jax.dg`) on ColoredMNIST and RotatedMNIST built from mnist5k, at a CPU "
        "budget of 100–200 steps a run (DomainBed's is 5,000): the protocol end to end, not a ranking of the methods. "
        "Cells are chosen by DomainBed's selection rules (`overfocus_jax/dg/selection.py`)."),
    "data_streams": (
        "Data streams and bfloat16", "the data on the device against the host stream, and bfloat16",
        "The default run and every shipped config with the data on the device and from the host stream, and in "
        "bfloat16 (`experiments/data_paths.py`)."),
    "models": (
        "Models", "parameters, FLOPs, speed and accuracy of every shipped model",
        "Parameters, FLOPs per image, training speed and test accuracy of every shipped model "
        "(`experiments/efficiency.py`)."),
    "focus": (
        "Focus models", "where the focus models look: learned, frozen and Harris keypoints; saliency by reconstruction",
        "The focus models classify from K small glimpses of the image (`overfocus_jax/models/focus.py`): at keypoints "
        "a small CNN learns (`focus`), frozen at their initial grid (`focus.keypoint_grad_scale=0`), or at Harris "
        "corners (`corner`). The reconstruction experiment (`overfocus_jax/models/reconstruction.py`) learns where to "
        "look without labels, by rebuilding the image from K patches."),
    "performance": (
        "Performance", "step times against PyTorch, regularizer overhead, kernels and numerical checks",
        "Step times, profiles and numerical checks (`benchmarks/`, run from the checkout's root as `python -m "
        "benchmarks.NAME`). Timings come from a 2-core machine shared with other work, with the cases of a table "
        "interleaved in one run: compare ratios within a table, not milliseconds across tables. The last three tables "
        "are of the package before its oneDNN convolutions; each command reruns at the commit it names."),
}

# Record files no table reads, with why (the index lists them).
NOT_TABULATED = {
    f"{E}shortcut_sliced.jsonl": "the four main settings of \"The paper's rule by unit and rate\" rerun",
    f"{E}shortcut_renovation.jsonl": "the four main settings of \"The paper's rule by unit and rate\" rerun",
    f"{E}efficiency_renovation.jsonl": "the first five models of \"Every model on mnist5k and digits\" rerun",
    f"{B}onednn_models.json": "\"oneDNN's convolutions in every shipped config\" before the per-step memory was kept "
                              "mapped",
    f"{B}regularizer_overhead_jax_cpu.jsonl": "\"Regularizer overhead\" (JAX) with Eigen convolutions",
    f"{B}regularizer_overhead_jax_cpu_onednn.jsonl": "\"Regularizer overhead\" (JAX) before the per-step memory was "
                                                     "kept mapped",
    f"{B}regularizer_overhead_jax_cpu_sgdrop_default.jsonl": "\"Regularizer overhead\" (JAX) with Eigen convolutions",
    f"{B}profile_cpu_bf16.json": "`benchmarks.profile_cpu --sections bf16` of the step before oneDNN",
}


# ------------------------------------------------------------------------------------------------ rendering


def records_line(section: Section, root: pathlib.Path) -> str:
  present = [relpath for relpath in section.files if (root / relpath).exists()]
  if not present:
    return ""
  parts = [f"`{relpath}` (commit {commit_of(root, relpath)})" for relpath in present]
  line = "Records: " + ", ".join(parts) + "."
  if section.code_commit:
    line += f" The runs' code: commit {section.code_commit}."
  return line


def render_section(section: Section, root: pathlib.Path) -> str:
  files = {relpath: read_records(root / relpath) for relpath in section.files
           if (root / relpath).is_file() and relpath.endswith((".json", ".jsonl"))}
  for relpath in section.files:  # a record folder: the explain.json inside it
    if (root / relpath).is_dir() and (root / relpath / "explain.json").is_file():
      files[relpath] = read_records(root / relpath / "explain.json")
  parts = [f"## {section.title}"]
  if section.text:
    parts.append(section.text)
  for spec in section.tables:
    if spec.caption:
      parts.append(spec.caption)
    only = getattr(spec, "only", ())
    table = spec.render({relpath: records for relpath, records in files.items() if not only or relpath in only})
    if table:
      parts.append(table)
    if isinstance(spec, Static):
      parts.append(f"Source: {spec.source}")
  line = records_line(section, root)
  if section.missing and not line:
    parts.append(section.missing + "\n\n```bash\n" + section.command + "\n```")
    return "\n\n".join(parts)
  if section.command:
    parts.append("Command:\n\n```bash\n" + section.command + "\n```")
  if line:
    parts.append(line)
  return "\n\n".join(parts)


def header_note(page: str) -> str:
  return (f"<!-- Generated by {GENERATOR} from the records it names; edit that script, not this page. -->")


def render_page(page: str, root: pathlib.Path) -> str:
  title, _, intro = PAGES[page]
  sections = [render_section(s, root) for s in SECTIONS if s.page == page]
  spread = ("Mean ± std is over seeds (the sample standard deviation, n − 1); a single run shows its value alone."
            if page not in ("performance", "domain_generalization") else "")
  head = [header_note(page), f"# {title}", intro + (" " + spread if spread else ""),
          f"Each table is followed by the command that produced its records and the commit that recorded each file. "
          f"What the results say: {'BENCHMARKS.md' if page == 'performance' else 'experiments/README.md'}."]
  return "\n\n".join(head + sections) + "\n"


def record_files(root: pathlib.Path) -> list[str]:
  """Every record under the record folders (a folder of figures counts as one record)."""
  found = []
  for folder in RECORD_DIRS:
    for path in sorted((root / folder).iterdir()):
      if path.name.startswith(".") or path.name == "README.md":
        continue
      found.append(f"{folder}/{path.name}")
  return found


def render_index(root: pathlib.Path) -> str:
  where = {}
  for section in SECTIONS:
    for relpath in section.files:
      where.setdefault(relpath, []).append(f"[{section.title}]({section.page}.md#{slug(section.title)})")
  rows = []
  for relpath in record_files(root):
    placed = "; ".join(where.get(relpath, [])) or f"not tabulated: {NOT_TABULATED.get(relpath, 'not on a page yet')}"
    rows.append([f"`{relpath}`", commit_of(root, relpath), placed])
  pages = "\n".join(f"- [{title}]({page}.md): {what}." for page, (title, what, _) in PAGES.items())
  toctree = "```{toctree}\n:hidden:\n\n" + "\n".join(PAGES) + "\n```"
  intro = ("Every number on these pages is read from a record file of the repository by "
           f"`python {GENERATOR}`, which writes the pages; each table is followed by the command that produced its "
           f"records and the commit that recorded each file. `python {GENERATOR} --check` fails when a page is not "
           "what the records give (`tests/test_results_pages.py` runs it). What the results say, with their "
           "limitations: `experiments/README.md` (experiments) and `BENCHMARKS.md` (performance).")
  return "\n\n".join([header_note("index"), "# Results", intro, pages, toctree, "## Record files",
                      "Each record file, the commit that recorded it and where it is tabulated:",
                      markdown(["file", "commit", "tabulated in"], rows)]) + "\n"


def render_all(root: pathlib.Path = ROOT) -> dict[str, str]:
  """page file name → its text."""
  pages = {f"{page}.md": render_page(page, root) for page in PAGES}
  pages["index.md"] = render_index(root)
  return pages


# Blocks of README.md written from the records as the pages are: block name → the title of the section whose
# tables, command and records line the block holds (between ``<!-- results_pages: NAME -->`` and
# ``<!-- /results_pages: NAME -->``).
README_BLOCKS = {"models-alone": "Every model named alone"}


def readme_block(section: Section, root: pathlib.Path) -> str:
  """A section's tables, command and records line, without its title and text (the README words them)."""
  body = render_section(dataclasses.replace(section, text=""), root)
  return body.split("\n\n", 1)[1]


def render_readme(text: str, root: pathlib.Path = ROOT) -> str:
  """``text`` (README.md) with each of :data:`README_BLOCKS` rewritten from its records."""
  for name, title in README_BLOCKS.items():
    start, end = f"<!-- results_pages: {name} -->", f"<!-- /results_pages: {name} -->"
    if start not in text or end not in text:
      raise ValueError(f"README.md has no block {start} ... {end}")
    section = next(s for s in SECTIONS if s.title == title)
    head, rest = text.split(start, 1)
    text = head + start + "\n\n" + readme_block(section, root) + "\n\n" + end + rest.split(end, 1)[1]
  return text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page differs from its records")
  parser.add_argument("--out", default=str(PAGES_DIR), help="the pages' folder (default: docs/results)")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  pages = {out / name: text for name, text in render_all().items()}
  readme = ROOT / "README.md"
  pages[readme] = render_readme(readme.read_text())
  if args.check:
    stale = []
    for path, text in pages.items():
      name = path.name
      current = path.read_text() if path.is_file() else ""
      if current != text:
        stale.append(name)
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                   f"{path} (on disk)", f"{path} (from the records)", n=1))
    if stale:
      print(f"stale: {', '.join(stale)}; run python {GENERATOR}", file=sys.stderr)
      return 1
    return 0
  out.mkdir(parents=True, exist_ok=True)
  for path, text in pages.items():
    path.write_text(text)
  print(f"wrote {len(pages) - 1} pages to {out} and README.md's tables")
  return 0


if __name__ == "__main__":
  sys.exit(main())
