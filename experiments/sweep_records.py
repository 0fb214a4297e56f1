"""What the experiment scripts share to record a finished sweep (``--from-sweep DIR``) instead of training."""

import json
import pathlib
import sys
from typing import Callable


def finished_runs(out: pathlib.Path) -> list[tuple[pathlib.Path, dict]]:
  """Each finished run of the sweep in ``out``: its workdir and its name's parts (``kind=patch-seed=0`` →
  ``{"kind": "patch", "seed": "0"}``)."""
  from overfocus_jax.sweeps import results as sweep_results
  return [(out / summary["job"], dict(part.split("=", 1) for part in summary["job"].split("-")))
          for summary in sweep_results.read(out)]


def append_from_sweep(sweep: str, sweep_config: str, out: pathlib.Path, results: list[dict],
                      records_of: Callable[[pathlib.Path], list[dict]], key: Callable[[dict], tuple]) -> int:
  """Appends to ``out`` (and ``results``) the records of the sweep in ``sweep`` that ``results`` lacks; 0, or 2 after
  one line on stderr when there is no such folder."""
  if not pathlib.Path(sweep).is_dir():
    print(f"error: --from-sweep: no sweep folder {sweep}; run overfocus sweep run --config "
          f"experiments/configs/{sweep_config} --out {sweep} first", file=sys.stderr)
    return 2
  done = {key(r) for r in results}
  for record in records_of(pathlib.Path(sweep)):
    if key(record) not in done:
      out.parent.mkdir(parents=True, exist_ok=True)
      with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
      results.append(record)
  return 0
