"""Writing an output directory whole or not at all: the converter, `init`, `merge`, the training
export, `inspect` and `diagnose` build their result in a hidden directory beside the target and
publish it at the end, so that a reader of the target sees the previous state or the new one,
never a mix, and nothing is written through a link planted in the target."""

import ctypes
import errno
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
from rich.console import Console

from ..errors import Interrupted, UserError
from ..io import check_output_directory, parse_json


def resolve_target(target: Path) -> Path:
    """The directory a write to `target` lands in: `.` becomes the working directory's real path,
    and a symlinked target the directory it points to (the link itself stays)."""
    return Path(os.path.realpath(target))


def _nearest_existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists."""
    for candidate in (path, *path.parents):
        try:
            if candidate.exists():
                return candidate
        except OSError as error:
            if error.errno != errno.ENAMETOOLONG:  # too long a name cannot exist: look further up
                raise
    return path


def _name_max(folder: Path) -> int:
    """The longest name, in bytes, that the file system holding `folder` allows."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # AttributeError: no pathconf (Windows)
        return 255


def _check_place(shown: Path, target: Path) -> None:
    """Refuse a target that cannot be made where it is: with a name longer than the file system
    allows, at or under a file, or in a folder we cannot write to (say so now, not after the work)."""
    existing = _nearest_existing(target.parent)
    limit = _name_max(existing)
    for name in target.relative_to(existing).parts:
        if len(os.fsencode(name)) > limit:
            raise UserError(
                f"output {shown}: the name {name[:24]}...{name[-8:]} is {len(os.fsencode(name))} bytes long, "
                f"more than the {limit} that the file system allows"
            )
    check_output_directory(shown)
    if not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        read_only = hasattr(os, "statvfs") and os.statvfs(existing).f_flag & os.ST_RDONLY
        raise UserError(
            f"cannot write the output {shown}: {existing} is "
            + ("on a read-only file system" if read_only else "not writable (permission denied)")
        )


def check_target(target: Path, overwrite: bool, sources: tuple[Path, ...] = (), own_files=()) -> None:
    """Refuse, before any work, an output that would replace something not ours to replace, or
    that cannot be written where it is. A folder holding nothing but `own_files` (the command's
    earlier results) is replaced without `overwrite`."""
    shown, target = target, resolve_target(target)
    try:
        _check_place(shown, target)
        cwd = Path.cwd().resolve()
        if cwd == target or target in cwd.parents:
            raise UserError(f"output {shown} is (or holds) the current directory; choose another --output")
        for source in sources:
            source = Path(os.path.realpath(source))
            # Inside the source only matters with --overwrite: a new folder beside its files harms nothing.
            if source == target or target in source.parents or (overwrite and source in target.parents):
                raise UserError(f"output {shown} would replace (part of) the input {source}; choose another --output")
        if target.is_dir() and not overwrite and not _holds_only(target, own_files):
            raise UserError(f"output directory {shown} exists and is not empty (use --overwrite to replace it)")
    except OSError as error:  # a folder on the way that we may not look into, a path too long
        raise UserError(f"cannot use {shown} as the output: {error.strerror or error}") from None


def _holds_only(target: Path, names) -> bool:
    """Whether `target` is an empty folder, or one holding nothing but regular files with these
    names among which the JSON reports say mesh-convert wrote them (REPORT_MARK): a user's folder
    that merely holds an `inspect.json` is not an earlier result to replace."""
    try:
        if not target.is_dir():
            return False
        with os.scandir(target) as scanned:
            entries = list(scanned)
        if not all(entry.name in names and entry.is_file(follow_symlinks=False) for entry in entries):
            return False
        reports = [Path(entry.path) for entry in entries if entry.name.endswith(".json")]
        return not entries or bool(reports) and all(map(_marked_report, reports))
    except OSError:
        return False


REPORT_MARK = "written_by"  # the key, in a command's JSON report, that says mesh-convert wrote it
_REPORT_MAX_BYTES = 64 << 20


def report_mark() -> dict:
    """What a JSON report carries to be known as one of ours (see `_holds_only`)."""
    from .. import __version__

    return {REPORT_MARK: f"mesh-convert {__version__}"}


def _marked_report(path: Path) -> bool:
    if path.stat().st_size > _REPORT_MAX_BYTES:
        return False
    try:
        report = parse_json(path.read_bytes())
    except ValueError:
        return False
    return isinstance(report, dict) and str(report.get(REPORT_MARK, "")).startswith("mesh-convert ")


# A run works in a folder of its own beside the target, `.NAME.partial-TOKEN`: the new result
# grows in it (NEW), and the portable swap sets the previous version aside in it (PREVIOUS). Its
# MARKER says which run made it, so that the next run removes what a killed run left there, and
# nothing that merely looks like it.
TOOL, WORK, TOKEN_BYTES = "mesh-convert", "partial", 8
NEW, PREVIOUS, DISCARDED, MARKER = "new", "previous", "discarded", "mesh-convert-run.json"
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


def _work_prefix(target: Path) -> str:
    """`.NAME.partial-`, which a token completes to a work folder's name; NAME is cut short where
    the whole would not fit the file system's limit on a name (the target's own name may be near
    it). The marker, not the name, says which target a work folder is for."""
    suffix = f".{WORK}-"
    room = _name_max(target.parent) - 1 - len(suffix) - 2 * TOKEN_BYTES
    return "." + os.fsencode(target.name)[:room].decode(errors="ignore") + suffix


def _identity() -> dict:
    """This process, told apart from a later one that reuses its id by its start time."""
    process = psutil.Process()
    return {"host": socket.gethostname(), "pid": process.pid, "started": process.create_time()}


def _make_work_folder(target: Path) -> tuple[Path, int]:
    """A new work folder for `target`, private to the user while the result is written, and the
    mode that a new folder gets from the umask (which the result gets, unless it replaces one)."""
    token = secrets.token_hex(TOKEN_BYTES)
    work = target.with_name(_work_prefix(target) + token)
    work.mkdir()
    try:
        new_folder_mode = stat.S_IMODE(work.stat().st_mode)
        work.chmod(0o700)
        marker = {"tool": TOOL, "target": target.name, "token": token, **_identity()}
        (work / MARKER).write_text(json.dumps(marker))
        (work / NEW).mkdir(mode=0o700)
    except BaseException:  # a full disk, say: what was made is ours, marker or not
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work, new_folder_mode


def _read_marker(work: Path) -> dict | None:
    """The marker of `work`, when it is a folder of this user's holding one (a link, a FIFO or
    anything unreadable is no marker)."""
    try:
        info = os.lstat(work)
        if not stat.S_ISDIR(info.st_mode) or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
            return None
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        with os.fdopen(os.open(work / MARKER, flags), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            marker = json.loads(handle.read(4096))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _left_by_a_dead_run(work: Path, target: Path) -> bool:
    """Whether `work` is a work folder this tool made for `target` in a process, on this machine,
    that is gone. A process of another machine (a shared file system) cannot be checked: its
    folder stays."""
    marker = _read_marker(work)
    if marker is None or marker.get("tool") != TOOL or marker.get("target") != target.name:
        return False
    token, pid, started = marker.get("token"), marker.get("pid"), marker.get("started")
    if not isinstance(token, str) or len(token) != 2 * TOKEN_BYTES or work.name != _work_prefix(target) + token:
        return False
    if marker.get("host") != socket.gethostname() or not isinstance(pid, int) or not isinstance(started, float):
        return False
    try:
        return abs(psutil.Process(pid).create_time() - started) > 1.0  # alive, or a new process with its id
    except psutil.NoSuchProcess:
        return True
    except (psutil.Error, ValueError):  # another user's process, a negative id: not provably gone
        return False


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return

    def unlock_and_retry(function, failed, _error) -> None:
        # A folder without its owner's write bit (a replaced result that kept a read-only
        # target's mode) cannot be emptied as it is: ours to delete, so made writable first.
        with suppress(OSError):
            parent = os.path.dirname(failed)
            os.chmod(parent, stat.S_IMODE(os.stat(parent).st_mode) | stat.S_IRWXU)
            function(failed)

    shutil.rmtree(path, **{"onexc" if sys.version_info >= (3, 12) else "onerror": unlock_and_retry})


def _clear_work_folder(work: Path, target: Path) -> None:
    """Remove a work folder, its marker last (a stop midway leaves a folder still known as ours),
    except for a previous version set aside in it, which stays with its marker: the user is told
    where it is."""
    keep = {MARKER, PREVIOUS} if os.path.lexists(work / PREVIOUS) else {MARKER}
    with suppress(OSError):
        for entry in work.iterdir():
            if entry.name not in keep:
                _remove(entry)
        if {entry.name for entry in work.iterdir()} == {MARKER}:
            (work / MARKER).unlink()
            work.rmdir()
    if os.path.lexists(work / PREVIOUS):
        Console(stderr=True).print(
            f"note: the previous version of {target} is in {work / PREVIOUS} "
            "(a run was stopped while replacing it): move it back or delete it",
            markup=False, highlight=False, soft_wrap=True,
        )


def reclaim_leftovers(target: Path) -> None:
    """Remove what killed runs (SIGKILL, power loss) left beside `target`: their work folders,
    and nothing else. A previous version set aside in one is left where it is (it is never put
    back over whatever the target has become), and the user is told where it is."""
    for work in target.parent.glob(glob.escape(_work_prefix(target)) + "*"):
        if _left_by_a_dead_run(work, target):
            _clear_work_folder(work, target)


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


def _filled(target: Path) -> UserError:
    return UserError(
        f"{target} was filled by something else while this ran; left it as it is (use --overwrite to replace it)"
    )


def _publish(work: Path, target: Path, overwrite: bool, own_files) -> None:
    """Make the result in `work` the target. Without overwrite, rename(2) itself refuses a target
    that became non-empty meanwhile; with it, or over a folder of `own_files` only, the swap is one
    atomic exchange where the system has one, else two renames that set the previous version aside
    in `work` meanwhile. What is swapped out without overwrite is checked again, and swapped back
    if something else was put into it meanwhile."""
    new = work / NEW
    if not os.path.lexists(target) or not (overwrite or (own_files and _holds_only(target, own_files))):
        try:
            new.rename(target)
        except OSError as error:
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise _filled(target) from None
            raise
        return
    if _exchange(new, target):
        if not overwrite and not _holds_only(new, own_files):
            _exchange(new, target)
            raise _filled(target)
        return  # `new` now holds the previous version, which goes with the work folder
    previous = work / PREVIOUS
    target.rename(previous)
    if not overwrite and not _holds_only(previous, own_files):
        previous.rename(target)
        raise _filled(target)
    try:
        new.rename(target)
    except OSError:
        previous.rename(target)
        raise
    previous.rename(work / DISCARDED)  # replaced: a stop while it is deleted leaves no "previous version"


@contextmanager
def staged_directory(
    target: Path, overwrite: bool = False, sources: tuple[Path, ...] = (), own_files=()
) -> Iterator[Path]:
    """A hidden directory beside `target` that becomes the target on success and vanishes on any
    failure, Ctrl-C, SIGTERM or SIGHUP. Without `overwrite` a non-empty target is never replaced,
    even one filled while this runs; with it the old and the new swap whole, and the new keeps
    the old one's mode (a private folder stays private). Either way a reader of `target` sees one
    of the two complete states, and a run killed outright leaves only its marked work folder,
    which the next run to that target removes. `own_files`: the names of the files the command
    writes, whose earlier results it replaces without `overwrite`."""
    shown, target = target, resolve_target(target)
    check_target(shown, overwrite, sources, own_files)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        reclaim_leftovers(target)
        work, new_folder_mode = _make_work_folder(target)
    except OSError as error:
        raise UserError(f"cannot write to {target.parent}: {error.strerror or error}") from None
    stops = []
    try:
        with _stop_signals(_raise_interrupt):
            yield work / NEW
        # From here the result is complete: a stop signal waits until the swap is whole, then
        # is reported as what it is, an interruption after the new version was published.
        with _stop_signals(lambda number, frame: stops.append(number)):
            mode = stat.S_IMODE(target.stat().st_mode) if target.is_dir() else new_folder_mode
            # The owner's write bit stays until the folder is in place: moving a folder to
            # another parent rewrites its ".." entry (a read-only target's mode comes last).
            (work / NEW).chmod(mode | stat.S_IWUSR)
            _publish(work, target, overwrite, own_files)
            if not mode & stat.S_IWUSR:
                target.chmod(mode)
            _clear_work_folder(work, target)
    except OSError as error:
        _clear_work_folder(work, target)
        raise UserError(f"writing {target} failed: {error.strerror or error}") from None
    except BaseException:
        _clear_work_folder(work, target)
        raise
    if stops:
        raise Interrupted(f"interrupted after {target} was written in full")
