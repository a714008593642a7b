"""Opening a run log's file safely, for writing (one writer per log) and for reading.

Writing: the log is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (so two processes starting on one
logdir at once cannot both get it, and a planted symbolic link is never followed: its target is not
created) and then locked with ``fcntl.flock`` for as long as it is written (so ``if_exists="overwrite"``
never replaces a log that a running process still writes). What happens when the log exists is the
caller's explicit choice, ``if_exists``:

* ``"error"`` (default): ``FileExistsError`` naming the other choices;
* ``"overwrite"``: the old log (and its reader cache) is removed and a new one written, unless a
  running process still writes it;
* ``"increment"``: the run goes to the first free numbered folder ``LOGDIR-2``, ``LOGDIR-3``, ...

A ``LOGDIR`` (or a folder above it) that exists but is not a folder (a file, a link to one, a link that
points nowhere) is refused with a ``FileExistsError`` saying so, whatever ``if_exists`` says (it chooses
what to do with an old run log, not with a file in the folder's place); a planted link is never followed
to create its target.

Reading: only a regular file is read (a link to one is fine). A FIFO, a device (``/dev/zero``), a
socket or a folder named ``cockpit.jsonl`` is refused with a clear error before a byte is read; the
file is opened without blocking, so a FIFO cannot hang the reader.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Tuple, Union

IF_EXISTS = ("error", "overwrite", "increment")
#: how many numbered folders ``if_exists="increment"`` tries before giving up
MAX_NUMBERED = 10000

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: O_EXCL alone guards the creation
    fcntl = None


class NotRegularFileError(ValueError):
    """A run log path that is not a regular file (a FIFO, a device, a socket, a folder)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_for_reading(path: Union[str, os.PathLike]) -> BinaryIO:
    """``open(path, "rb")`` for a regular file only (see the module's docstring)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(
                f"{os.fspath(path)} is {_kind(mode)}, not a regular file; cockpit-lite reads run logs "
                "from regular files only")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _lock(fd: int) -> bool:
    """Take the exclusive lock on the open log ``fd`` without waiting; False if another process holds it."""
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return True  # a filesystem without locks: O_EXCL still made this process the only writer


def _create(path: Path) -> int:
    """Create ``path`` exclusively for appending; FileExistsError if anything is there (a link included)."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
             | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    fd = os.open(path, flags, 0o644)
    if not _lock(fd):  # cannot happen for a file just created, unless it was replaced at once
        os.close(fd)
        raise FileExistsError(f"{path}: the new run log was taken by another process")
    return fd


def _not_a_folder(folder: Path) -> str:
    """What is in the way of the folder ``folder`` (itself or a folder above it), for the error."""
    for place in [*reversed(folder.parents), folder]:
        if not os.path.lexists(place) or place.is_dir():
            continue
        if place.is_symlink():
            target = os.readlink(place)
            what = (f"a symbolic link to {target!r}, which does not exist (it points nowhere)" if not place.exists()
                    else f"a symbolic link to {target!r}, which is not a folder")
        else:
            mode = os.lstat(place).st_mode
            what = "a file" if stat.S_ISREG(mode) else _kind(mode)
        where = "" if place == folder else f" (a folder above the logdir {folder})"
        return (f"{place} exists and is {what}, not a folder{where}; the logdir must be a folder (or a path "
                "where one can be created). if_exists does not apply: it chooses what to do with an old run "
                "log in the folder. Pass another logdir")
    return ""


def _make_folder(folder: Path) -> None:
    """``mkdir -p folder``; FileExistsError saying what is in the way when something that is not a folder is."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        message = _not_a_folder(folder)
        if not message:  # gone again since (a race): the system's own error
            raise
        raise FileExistsError(message) from None


def _exists_message(logdir: Path, path: Path) -> str:
    what = "a symbolic link" if path.is_symlink() else "a run log"
    return (f"{logdir} already holds {what} ({path.name}). Choose what to do with "
            f"watch(..., if_exists=...): 'increment' writes this run into the next free numbered folder "
            f"({logdir}-2, ...), 'overwrite' replaces the old log; or pass another logdir")


def _remove_old(path: Path) -> None:
    """Remove the log at ``path`` for ``if_exists="overwrite"``, unless a running process writes it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # a symbolic link (never followed) or gone already: remove the name itself
        fd = None
    try:
        if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode) and not _lock(fd):
            raise FileExistsError(
                f"{path} is being written by a running process; it cannot be overwritten "
                "(stop that run, or use if_exists='increment' or another logdir)")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        try:  # the reader's cache of the old log (stale anyway: it would be ignored)
            os.unlink(path.with_name(f".{path.name}.cache"))
        except OSError:
            pass
    finally:
        if fd is not None:
            os.close(fd)


def claim(logdir: Union[str, os.PathLike], name: str, if_exists: str = "error") -> Tuple[Path, int]:
    """Create and lock the log ``logdir/name`` for writing: ``(logdir used, fd)`` (see the module's docstring)."""
    if if_exists not in IF_EXISTS:
        raise ValueError(f"if_exists must be one of {', '.join(map(repr, IF_EXISTS))}, got {if_exists!r}")
    logdir = Path(logdir)
    candidates = [logdir]
    if if_exists == "increment":
        candidates += [logdir.with_name(f"{logdir.name}-{i}") for i in range(2, MAX_NUMBERED + 1)]
    for folder in candidates:
        try:
            _make_folder(folder)
        except FileExistsError:
            if folder is logdir:
                raise
            continue  # a numbered name taken by a file: not a free folder
        path = folder / name
        if if_exists == "overwrite" and os.path.lexists(path):
            _remove_old(path)
        try:
            return folder, _create(path)
        except FileExistsError:
            if if_exists == "increment":
                continue
            if if_exists == "overwrite":
                raise FileExistsError(
                    f"{path} was created by another run starting at the same time; "
                    "use if_exists='increment' or another logdir") from None
            raise FileExistsError(_exists_message(logdir, path)) from None
    raise FileExistsError(f"{logdir}-2 ... {logdir}-{MAX_NUMBERED} all hold run logs; choose another logdir")
