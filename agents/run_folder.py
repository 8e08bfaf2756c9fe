"""Run folders that are never overwritten, never shared by two live runs, and written atomically.

Used by ``scripts/train.py``, ``scripts/supervised.py`` and ``scripts/compare_optimizers.py``:

- ``refuse_existing_run``: a folder that already holds files is not written into by a new run.
- ``RunLock``: one live process per folder. On POSIX the lock is an ``flock`` on ``<folder>/.lock``, which the
  kernel drops when its process dies, so a lock left by a killed run is taken over; the file holds the owner's PID
  for the message a second run prints.
- ``temporary_path`` / ``atomic_write_text`` / ``atomic_folder``: files and folders appear under their final
  name complete or not at all; temporary names are unique per process and call.
- ``write_error``: turns an ``OSError`` from a write into a message naming the folder and what is still intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

try:  # POSIX; elsewhere the lock falls back to an exclusive-create file and a PID liveness check
    import fcntl
except ImportError:  # pragma: no cover - not exercised on Linux
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
# Permissions of new folders under the process's umask (mkdtemp creates them readable by the owner only).
_UMASK = os.umask(0)
os.umask(_UMASK)


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked: it holds another run, is locked, or does not match the request."""


def refuse_existing_run(folder: Path, *, flag: str, resume_hint: str | None = None) -> None:
    """Raise ``RunFolderError`` when ``folder`` exists and holds anything (a stale ``.lock`` aside).

    Args:
        folder: the output folder a new run is about to write.
        flag: the option that chooses the folder (``--log-dir``, ``--out``), named in the message.
        resume_hint: a sentence on how to continue the existing run instead, if the script can.
    """
    if not folder.exists():
        return
    if not folder.is_dir():
        raise RunFolderError(f"{folder} exists and is not a folder; choose another {flag}")
    entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        hint = f" {resume_hint}" if resume_hint else ""
        raise RunFolderError(
            f"{folder} already holds a run ({shown}); a new run never overwrites it.{hint} "
            f"To start a new run, give a fresh {flag} (a folder that does not exist yet or is empty)."
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    """Exclusive use of a run folder by this process, as a context manager (or ``acquire`` / ``release``).

    A second process (or a second ``RunLock`` on the same folder in this process) raises ``RunFolderError``
    naming the PID that holds the folder. A lock file whose process is gone is taken over, with a note.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self.took_over_from: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock; raises ``RunFolderError`` when a live process holds it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if fcntl is None:  # pragma: no cover
                self._acquire_without_flock()
                return self
            return self._acquire_flock()
        except OSError as error:
            raise write_error(self.folder, error, "Nothing in it was changed.") from error

    def _acquire_flock(self) -> RunLock:
        for _ in range(10):
            previous = _read_pid(self.path) if self.path.exists() else None
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                owner = _read_pid(self.path)
                raise RunFolderError(
                    f"{self.folder} is in use by another run (PID {owner if owner is not None else 'unknown'}); "
                    "wait for it to finish or stop it, or choose another folder"
                ) from None
            # The file may have been removed by its previous owner between our open and our flock: retry then.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            if previous is not None and previous != os.getpid():
                self.took_over_from = previous
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise RunFolderError(f"could not lock {self.folder}: its lock file keeps changing")  # pragma: no cover

    def _acquire_without_flock(self) -> None:  # pragma: no cover - non-POSIX fallback
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = _read_pid(self.path)
                if owner is not None and _pid_alive(owner):
                    raise RunFolderError(f"{self.folder} is in use by another run (PID {owner})") from None
                self.took_over_from = owner
                stale = temporary_path(self.path)
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.path, stale)
                    os.unlink(stale)
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return
        raise RunFolderError(f"could not lock {self.folder}")

    def release(self) -> None:
        """Drop the lock and remove the lock file (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


def temporary_path(path: Path, suffix: str = "") -> Path:
    """A hidden sibling of ``path`` whose name is unique to this process and call."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a unique temporary file renamed into place."""
    temporary = temporary_path(path)
    try:
        with temporary.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield a unique temporary folder beside ``path`` to fill; on success it is renamed to ``path``.

    ``path`` must not exist yet (a rename onto a folder is not atomic); on an error the temporary folder is
    removed and ``path`` is untouched.
    """
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    temporary = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        temporary.chmod(0o777 & ~_UMASK)
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Remove the temporary files and folders (``.<name>.tmp-<pid>-...``) left by processes no longer running.

    Returns:
        the names removed.
    """
    removed = []
    for entry in folder.glob(".*.tmp-*"):
        try:
            pid = int(entry.name.split(".tmp-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry.name)
    return sorted(removed)


def write_error(folder: Path, error: OSError, intact: str) -> RunFolderError:
    """A ``RunFolderError`` for a failed write in ``folder``: the OS's reason, and what is still usable."""
    reason = error.strerror or str(error)
    where = error.filename or folder
    return RunFolderError(f"cannot write to the run folder {folder} ({reason}: {where}). {intact}")
