"""One writer per workdir: an advisory lock (``flock``) on ``WORKDIR/.overfocus.lock``, held for the life of a run.

The lock file records who holds it (host, pid, since when, the command), for the one line a second writer gets, and
goes when its holder ends. The kernel releases a ``flock`` when its process ends, however it ends (kill -9 included),
and a network filesystem's lock server when the node is lost: a lock file left behind is free, and the next run
takes it over, saying whose it was.
Readers (``overfocus eval``) take no lock. Where the filesystem has no locks at all, the run goes on unlocked and
says so in one line.
"""

import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import sys

from overfocus_jax.errors import UserError

LOCK_FILE = ".overfocus.lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _describe(owner: dict) -> str:
  return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('since', '?')}"


def _read_owner(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode(errors="replace")
    return json.loads(text) if text.strip() else {}
  except (OSError, ValueError):
    return {}


class WorkdirLock:
  """``with WorkdirLock(workdir, "train"):`` — the lock held inside the block; :class:`UserError` when another process
  holds it. ``what`` names the command in the message a second writer gets."""

  def __init__(self, workdir: str | pathlib.Path, what: str = "a run"):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self.what = what
    self.fd: int | None = None

  def acquire(self) -> None:
    while True:
      fd = self._lock_file()
      if fd is None or self._still_the_file(fd):
        break
      os.close(fd)  # its holder removed it as we took it: take the one now at the path
    if fd is not None:
      self._record(fd)

  def _still_the_file(self, fd: int) -> bool:
    try:
      return os.stat(self.path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      return False

  def _lock_file(self) -> int | None:
    """The locked file's descriptor; None where the filesystem has no locks."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"cannot open the workdir lock {self.path} ({e.strerror})",
                      "pass a --workdir you can write to") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _read_owner(fd)
      os.close(fd)
      command = f" ({owner['command']})" if owner.get("command") else ""
      raise UserError(f"workdir {self.path.parent} is in use by {owner.get('what', 'another run')}{command}, "
                      f"{_describe(owner)}", "wait for it to end, stop it, or pass another --workdir") from None
    except OSError as e:
      os.close(fd)
      if e.errno in UNSUPPORTED:
        print(f"overfocus: note: the filesystem of {self.path.parent} has no file locks ({e.strerror}); running "
              "without the one-writer check", file=sys.stderr)
        return None
      raise
    return fd

  def _record(self, fd: int) -> None:
    previous = _read_owner(fd)
    if previous:  # its holder ended without releasing the file: the kernel freed its lock
      print(f"overfocus: note: took over the workdir lock of {previous.get('what', 'a run')}, {_describe(previous)}, "
            "which no longer holds it (it ended without releasing it)", file=sys.stderr)
    me = {"what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""}
    self.fd = fd
    try:
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, json.dumps(me).encode())
    except OSError as e:
      self.release()
      raise UserError(f"cannot write the workdir lock {self.path} ({e.strerror})",
                      "free space there, or pass a --workdir you can write to") from None

  def release(self) -> None:
    """Removes the lock file, then lets go: a process that opened it meanwhile finds it gone and opens the new one
    (:meth:`acquire` checks that the file it locked is still the one at the path)."""
    if self.fd is None:
      return
    try:
      self.path.unlink()
    except OSError:
      pass  # a full or read-only disk: the record stays, and the next run takes the freed lock over
    finally:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
    return False


def holder(workdir: str | pathlib.Path) -> str | None:
  """Who holds ``workdir``'s lock now (one phrase), or None when nobody does; takes nothing."""
  path = pathlib.Path(workdir) / LOCK_FILE
  if not path.is_file():
    return None
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    owner = _read_owner(fd)
    return f"{owner.get('what', 'a run')}, {_describe(owner)}"
  except OSError:
    return None
  finally:
    os.close(fd)
  return None
