"""How a launcher starts a run: ``python -m overfocus_jax.sweeps.child [--cpus 0,1] -- COMMAND ...``.

It asks the kernel to send the run SIGTERM if the launcher dies (Linux's ``PR_SET_PDEATHSIG``), so a killed
launcher leaves no orphan training: the run saves a checkpoint on the signal and exits (train/preemption.py), and
the next launch resumes it. With ``--cpus`` it pins the run to those cores, so its thread pools (XLA's, oneDNN's) size
themselves to its share. Then it replaces itself with the command.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def stop_with_parent(parent: int) -> None:
  """SIGTERM when the launcher goes (Linux only; elsewhere nothing); exits at once if it is already gone."""
  if not sys.platform.startswith("linux"):
    return
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
  if os.getppid() != parent:  # the launcher died before the request took effect
    sys.exit(0)


def main(argv: list[str]) -> None:
  cpus = None
  if argv[:1] == ["--cpus"]:
    cpus, argv = {int(core) for core in argv[1].split(",")}, argv[2:]
  if len(argv) < 2 or argv[0] != "--":
    sys.exit("usage: python -m overfocus_jax.sweeps.child [--cpus 0,1] -- COMMAND ...")
  parent = int(os.environ.pop("OVERFOCUS_LAUNCHER_PID", os.getppid()))
  stop_with_parent(parent)
  if cpus:
    os.sched_setaffinity(0, cpus)
  os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
  main(sys.argv[1:])
