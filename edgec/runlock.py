"""An exclusive lock on a run directory for the whole of one compress run.

``RUN_DIR/.edgec.lock`` is locked with the OS (``fcntl.flock``: released by the kernel when the
holder exits, even on ``kill -9``) and records the holder's pid, host and start time, so a second
writer (another ``compress``, ``--force`` or ``--resume`` on the same folder) is refused with exit 2
and the holder named. A lock file left by a process that is gone is taken over. Where the OS lock
is not available (no ``fcntl``, a filesystem without locks) the recorded pid decides: a live holder
on this host refuses, a dead one is taken over.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from edgec.errors import RunDirError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".edgec.lock"

__all__ = ["LOCK_FILE", "RunLock", "lock_run_dir", "make_out_dir"]


def make_out_dir(path: Path, what: str = "--out") -> Path:
    """``mkdir -p`` for an output folder; an OSError becomes a RunDirError (exit 2) that names the cause."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"{what} {path} is a file, not a folder", hint=f"choose a folder path for {what}") from None
    except NotADirectoryError:
        raise RunDirError(f"{what} {path} cannot be created: a part of its path is a file",
                          hint=f"choose a {what} path under a folder") from None
    except OSError as exc:
        raise RunDirError(f"{what} {path} cannot be created: {exc.strerror or exc}",
                          hint=f"choose a {what} folder you can write to") from None
    if not path.is_dir():
        raise RunDirError(f"{what} {path} is not a folder", hint=f"choose a folder path for {what}")
    try:  # a real write: permissions, read-only mounts, /proc and the like all show here
        fd, probe = tempfile.mkstemp(prefix=".edgec-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunDirError(f"{what} {path} is not writable: {exc.strerror or exc}",
                          hint=f"choose a {what} folder you can write to") from None
    return path


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _read_holder(path: Path) -> dict:
    for _ in range(20):  # the holder writes its record right after locking: wait a moment for it
        try:
            doc = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict):
            return doc
        time.sleep(0.05)
    return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process (no holder recorded)"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('started', '?')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


class RunLock:
    """The held lock; :meth:`release` (or leaving the ``with`` block) gives it up."""

    def __init__(self, path: Path, fd: int, taken_over: dict | None, created: bool):
        self.path, self._fd, self.taken_over, self.created = path, fd, taken_over, created

    def discard(self) -> None:
        """Release, and leave no trace: remove the lock file, and the folder when locking created it."""
        self.release()
        try:
            self.path.unlink()
            if self.created:
                self.path.parent.rmdir()
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no holder recorded: the next run does not report a takeover
        except OSError:
            pass
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: Path) -> RunLock:
    """Create ``run_dir`` if needed and lock it for this process; RunDirError (exit 2) naming the holder
    when another live process holds it."""
    created = not Path(run_dir).exists()
    run_dir = make_out_dir(Path(run_dir))
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunDirError(f"cannot create the lock file {path}: {exc.strerror or exc}",
                          hint="choose a --out folder you can write to") from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
          "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]}
    os_locked = False
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os_locked = True
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise RunDirError(f"{run_dir} is in use by {describe_holder(_read_holder(path))}",
                                  hint="wait for that run to finish (or stop it), or choose another --out") from None
            # ENOLCK etc.: no OS locks on this filesystem; fall back to the recorded pid
    previous = _read_holder(path) if os.fstat(fd).st_size else {}
    if previous and not os_locked and previous.get("host") == me["host"] \
            and _pid_alive(int(previous.get("pid") or 0)) and previous.get("pid") != me["pid"]:
        os.close(fd)
        raise RunDirError(f"{run_dir} is in use by {describe_holder(previous)}",
                          hint="wait for that run to finish (or stop it), or choose another --out")
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    return RunLock(path, fd, previous or None, created)
