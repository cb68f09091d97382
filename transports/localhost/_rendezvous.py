"""Where ranks listen: a private socket directory, one socket and one lock file per rank.

Rank ``N`` listens on ``<socket_dir>/rank-N.sock``. It holds an exclusive ``flock`` on
``rank-N.lock`` for as long as it lives; the kernel drops the lock when the process exits, however it
exits. So a socket whose lock can be taken is stale (its owner was killed): a new sidecar on that
rank removes it and listens, while a second *live* sidecar on the rank fails to take the lock and is
refused with an error naming the rank and the path. Every starting sidecar also removes the stale
sockets of other ranks, so a crash leaves nothing behind for long.

The directory is created with mode 0700 and must belong to this user; sockets are made 0600.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import stat
import time
from pathlib import Path

from sidecar_core import PeerUnreachableError, SettingsError

#: The longest path a Unix socket address can hold on Linux.
MAX_SOCKET_PATH = 107
_LOCK = re.compile(r"rank-(\d+)\.lock")
#: A starting sidecar briefly locks other ranks' lock files to sweep stale ones; retry through that.
_CLAIM_ATTEMPTS = 20
_CLAIM_PAUSE = 0.01


def default_socket_dir() -> Path:
    """``/tmp/sidecar-<uid>``: the same for every process of this user, whatever their environment."""
    return Path("/tmp") / f"sidecar-{os.getuid()}"


def socket_path(directory: Path, rank: int) -> Path:
    """The socket rank ``rank`` listens on."""
    return directory / f"rank-{rank}.sock"


def prepare_dir(directory: Path, env: str) -> Path:
    """Create the socket directory (mode 0700) or check that an existing one is private.

    Args:
        directory: The directory.
        env: The environment variable that sets it, for error messages.

    Raises:
        SettingsError: The path is not a directory, belongs to another user (or is another user's
            symbolic link), or is open to others.
    """
    directory = directory.expanduser().absolute()
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=True)
    try:
        link = directory.lstat()
        info = directory.stat()
    except OSError as exc:
        raise SettingsError(f"{env}={str(directory)!r} cannot be used: {exc}") from None
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (os.getuid(), 0):
        # Its owner may point it elsewhere at any time: at a directory of theirs, between two connects.
        # (Root's links are as safe as the rest of the path: root can do anything anyway.)
        raise SettingsError(
            f"{env}={str(directory)!r} is a symbolic link of uid {link.st_uid}, not of this user (uid "
            f"{os.getuid()}); another user may be intercepting sidecar sockets. Point the setting at a directory "
            "you own"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise SettingsError(f"{env}={str(directory)!r} is not a directory; point it at a private directory")
    if info.st_uid != os.getuid():
        raise SettingsError(
            f"{env}={str(directory)!r} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}); "
            "another user may be intercepting sidecar sockets. Point the setting at a directory you own"
        )
    if info.st_mode & 0o077:
        raise SettingsError(
            f"{env}={str(directory)!r} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}); run "
            f"`chmod 700 {directory}` or point the setting at a new directory"
        )
    longest = socket_path(directory, 10**9)
    if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
        raise SettingsError(
            f"{env}={str(directory)!r} is too long for Unix socket paths ({MAX_SOCKET_PATH} bytes at most, "
            f"e.g. {longest}); choose a shorter directory"
        )
    return directory


def _lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path`` (created if missing), or ``None`` if a live process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        # The holder we waited for may have removed the file; lock the file the path names now.
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def sweep(directory: Path) -> list[int]:
    """Remove the sockets and locks of ranks whose owner is gone.

    Returns:
        The ranks whose stale files were removed.
    """
    removed = []
    for entry in directory.iterdir():
        match = _LOCK.fullmatch(entry.name)
        if match is None:
            continue
        fd = _lock(entry)
        if fd is None:
            continue
        rank = int(match.group(1))
        with contextlib.suppress(FileNotFoundError):
            socket_path(directory, rank).unlink()
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
        os.close(fd)
        removed.append(rank)
    return removed


class RankClaim:
    """This process's hold on a rank: the lock, and the listening socket bound to the rank's path.

    Raises:
        PeerUnreachableError: A live sidecar already serves the rank, or the socket cannot be bound.
    """

    def __init__(self, directory: Path, rank: int) -> None:
        self.path = socket_path(directory, rank)
        self._lock_path = directory / f"rank-{rank}.lock"
        fd = _lock(self._lock_path)
        for _ in range(_CLAIM_ATTEMPTS):
            if fd is not None:
                break
            time.sleep(_CLAIM_PAUSE)
            fd = _lock(self._lock_path)
        if fd is None:
            holder = self._lock_path.read_text().strip() or "unknown"
            raise PeerUnreachableError(
                f"rank {rank} is already served by a live sidecar (pid {holder}) listening at {self.path}; give "
                "each process its own SIDECAR_RANK, or stop the other sidecar first"
            )
        self._lock_fd = fd
        self._closed = False
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # stale: its owner no longer holds the lock
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                self.listener.bind(os.fspath(self.path))
                os.chmod(self.path, 0o600)
                self.listener.listen(128)
                self.listener.setblocking(False)
            except OSError as exc:
                self.listener.close()
                hint = " (the path is in use)" if exc.errno == errno.EADDRINUSE else ""
                raise PeerUnreachableError(f"rank {rank} cannot listen at {self.path}: {exc}{hint}") from None
        except BaseException:
            os.close(fd)
            raise

    def close_copies(self) -> None:
        """In a forked child: close its copies of the listening socket and the lock (the parent keeps both)."""
        if self._closed:  # the number may belong to another file by now
            return
        self._closed = True
        self.listener.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def release(self) -> None:
        """Stop listening and remove the socket and lock files."""
        self._closed = True
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._lock_path.unlink()
        os.close(self._lock_fd)
