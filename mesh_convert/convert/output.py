"""Writing an output directory whole or not at all: the converter, `init`, `merge` and the
training export build their result in a hidden directory beside the target and publish it at
the end, so that a reader of the target sees the previous state or the new one, never a mix."""

import ctypes
import errno
import glob
import os
import secrets
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import Interrupted, UserError


def resolve_target(target: Path) -> Path:
    """The directory a write to `target` lands in: `.` becomes the working directory's real path,
    and a symlinked target the directory it points to (the link itself stays)."""
    return Path(os.path.realpath(target))


def check_target(target: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, an output that would replace something not ours to replace."""
    shown, target = target, resolve_target(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"output {shown} exists and is not a directory")
    cwd = Path.cwd().resolve()
    if cwd == target or target in cwd.parents:
        raise UserError(f"output {shown} is (or holds) the current directory; choose another --output")
    for source in sources:
        source = Path(os.path.realpath(source))
        # Inside the source only matters with --overwrite: a new folder beside its files harms nothing.
        if source == target or target in source.parents or (overwrite and source in target.parents):
            raise UserError(f"output {shown} would replace (part of) the input {source}; choose another --output")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"output directory {shown} exists and is not empty (use --overwrite to replace it)")


STAGING, SET_ASIDE = "partial", "old"
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def _stop_signals(handler) -> Iterator[None]:
    """Route the stop signals (Ctrl-C, SIGTERM, SIGHUP) to `handler` meanwhile; one the user set
    to be ignored (`nohup`) stays ignored. Python lets only the main thread set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for number in STOP_SIGNALS:
            current = signal.getsignal(number)
            if current is not signal.SIG_IGN and current is not None:  # None: set outside Python
                previous[number] = current
                signal.signal(number, handler)
        yield
    finally:
        for number, current in previous.items():
            signal.signal(number, current)


def _raise_interrupt(number, frame):
    raise KeyboardInterrupt


def _owner_alive(pid_text: str) -> bool:
    if not pid_text.isdigit():
        return False  # a leftover of a version that did not record its process
    if os.name == "nt":
        return True  # there, os.kill(pid, 0) would terminate the process rather than probe it
    try:
        os.kill(int(pid_text), 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # alive, under another user
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def reclaim_leftovers(target: Path) -> None:
    """Remove what killed runs (SIGKILL, power loss) left beside `target`: staging directories,
    and set-aside previous versions; a set-aside one whose target is gone (killed between the two
    renames of the portable swap) is put back, so the previous state returns whole."""
    prefix = f".{target.name}."
    for path in target.parent.glob(glob.escape(prefix) + "*-*"):
        kind, _, owner = path.name[len(prefix) :].partition("-")
        if kind not in (STAGING, SET_ASIDE) or _owner_alive(owner.split("-")[0]):
            continue
        if kind == SET_ASIDE and not os.path.lexists(target):
            path.rename(target)
        else:
            _remove(path)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # old kernel or a filesystem without exchange
    raise OSError(code, os.strerror(code), str(second))


def _publish(staging: Path, target: Path, overwrite: bool, tag: str) -> None:
    """Make `staging` the target. Without overwrite, rename(2) itself refuses a target that
    became non-empty meanwhile; with it, the swap is one atomic exchange where the system has one."""
    if not overwrite or not os.path.lexists(target):
        try:
            staging.rename(target)
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise UserError(
                    f"{target} was filled by something else while this ran; left it as it is "
                    "(use --overwrite to replace it)"
                ) from None
            raise
        return
    if _exchange(staging, target):
        _remove(staging)  # now the previous version
        return
    set_aside = target.with_name(f".{target.name}.{SET_ASIDE}-{tag}")
    target.rename(set_aside)
    try:
        staging.rename(target)
    except OSError:
        set_aside.rename(target)
        raise
    _remove(set_aside)


@contextmanager
def staged_directory(target: Path, overwrite: bool = False, sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """A hidden directory beside `target` that becomes the target on success and vanishes on any
    failure, Ctrl-C, SIGTERM or SIGHUP. Without `overwrite` a non-empty target is never replaced,
    even one filled while this runs; with it the old and the new swap whole. Either way a reader
    of `target` sees one of the two complete states, and a run killed outright leaves only hidden
    leftovers, which the next run to that target reclaims."""
    shown, target = target, resolve_target(target)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    staging = target.with_name(f".{target.name}.{STAGING}-{tag}")
    try:
        reclaim_leftovers(target)  # first: a previous version put back is then checked like any other
        check_target(shown, overwrite, sources)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()  # mode from the umask, like any other directory the user creates
    except OSError as error:
        raise UserError(f"cannot write to {target.parent}: {error.strerror or error}") from None
    stops = []
    try:
        with _stop_signals(_raise_interrupt):
            yield staging
        # From here the result is complete: a stop signal waits until the swap is whole, then
        # is reported as what it is, an interruption after the new version was published.
        with _stop_signals(lambda number, frame: stops.append(number)):
            _publish(staging, target, overwrite, tag)
    except OSError as error:
        _remove(staging)
        raise UserError(f"writing {target} failed: {error.strerror or error}") from None
    except BaseException:
        _remove(staging)
        raise
    if stops:
        raise Interrupted(f"interrupted after {target} was written in full")
