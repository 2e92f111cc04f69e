"""Shared helpers for the benchmark scripts (`scripts/bench_*.py`): environment facts, child
processes with their peak memory, medians and ratios, a rich table and the JSON output.

Not part of the package: the scripts import it by path (`sys.path` holds `scripts/` when a
script runs), and it imports nothing heavy at module level.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = Path(os.environ.get("MESH_CONVERT_CACHE", Path.home() / ".cache" / "mesh-convert")) / "SmolLM2-135M-Instruct"
BENCH_CACHE = Path(os.environ.get("MESH_CONVERT_CACHE", Path.home() / ".cache" / "mesh-convert")) / "bench"

# ---------------------------------------------------------------------------------------------
# Facts about the run, stored with every result.
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: str = "cpu") -> dict:
    """Versions, hardware and load: what a reader needs to judge the numbers."""
    import torch
    import transformers

    info = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def finish_environment(info: dict) -> dict:
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return info


# ---------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------


def median(values) -> float:
    return float(statistics.median(values))


def ratio(a: float, b: float) -> float | None:
    return None if not b else a / b


def summary(values) -> dict:
    values = [float(v) for v in values]
    return {
        "median": median(values),
        "min": min(values),
        "max": max(values),
        "values": [round(v, 6) for v in values],
    }


# ---------------------------------------------------------------------------------------------
# Memory: /proc readings, peak RSS of this process and of child processes.
# ---------------------------------------------------------------------------------------------

_STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in bytes (empty if it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in _STATUS_FIELDS:
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Polls /proc/PID/status in a thread and keeps the largest VmRSS, RssAnon and RssFile seen.

    Sampling can miss a short spike; the exact peak of the total comes from wait4's ru_maxrss.
    The split into anonymous and file-backed (memory-mapped files) memory is what sampling adds."""

    def __init__(self, pid: int, interval: float = 0.005):
        self.pid, self.interval = pid, interval
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            status = proc_status(self.pid)
            if status:
                self.samples += 1
                for key in self.peak:
                    self.peak[key] = max(self.peak[key], status.get(key, 0))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_child(cmd: list[str], env: dict | None = None, sample: bool = True, cwd: Path | None = None) -> dict:
    """Run a command to completion; return its wall time, exact peak RSS (wait4's ru_maxrss of
    this child alone, not the cumulative RUSAGE_CHILDREN), sampled peak split, exit code and output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        sampler = RssSampler(proc.pid) if sample else None
        if sampler:
            sampler.__enter__()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if sampler:
                sampler.__exit__(None, None, None)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = {
            "wall_s": wall,
            "maxrss_bytes": usage.ru_maxrss * 1024,  # Linux reports kilobytes
            "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime,
            "returncode": proc.returncode,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace"),
        }
    if sampler:
        result["sampled_peak_bytes"] = dict(sampler.peak)
        result["samples"] = sampler.samples
    return result


def drop_dirty_pages() -> None:
    """Flush written data to disk (not timed), so one measurement's writeback does not land in the next."""
    os.sync()


def warm_read(paths) -> int:
    """Read files once so that the measured runs find them in the page cache; returns the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(64 << 20):
                total += len(chunk)
    return total


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def fmt(x: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("[green]yes[/]" if ok else "[red]no[/]")


def print_table(title: str, headers: list[str], rows: list[list], caption: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console = Console()
    if not console.is_terminal:  # piped or redirected: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
