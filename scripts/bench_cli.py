"""How long the CLI takes to start: `mesh-convert --help` and an offline `--dry-run` of a Pythia
alias, side by side with `python -c "import typer, rich, pydantic"` (the baseline) and with the
`--help` of a one-command typer app (what typer's rich help renderer costs any typer CLI).

The commands run interleaved (baseline, typer app, help, dry run, baseline, ...) in fresh
processes, so that a machine shared with other work loads them alike; the table shows medians,
and each command's ratio to the baseline's median. The target (issue 11): help within 3x the
baseline.

    python scripts/bench_cli.py [--repeats 15] [--json benchmarks/cli-cpu.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import bench_common as bc

CASES = {
    "baseline": [sys.executable, "-c", "import typer, rich, pydantic"],
    "typer_app_help": [sys.executable, "-c", "import typer; app = typer.Typer(); app.command()(lambda name: None); app(['--help'])"],
    "help": [sys.executable, "-m", "mesh_convert", "--help"],
    "dry_run": [sys.executable, "-m", "mesh_convert", "pythia-410m", "--loops", "3", "--dry-run", "--json"],
}
TARGET = 3.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(bc.REPO), "HF_HUB_OFFLINE": "1"}
    runs: dict[str, list[dict]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, cmd in CASES.items():
            result = bc.run_child(cmd, env=env, sample=False)
            if result["returncode"] != 0:
                raise SystemExit(f"{name} failed: {result['stderr'][-500:]}")
            runs[name].append({k: result[k] for k in ("wall_s", "user_s", "sys_s", "maxrss_bytes")})
            time.sleep(0.05)
    info = bc.environment()  # imports torch: only after the runs, whose peak RSS would include the parent's
    base = bc.median(r["wall_s"] for r in runs["baseline"])
    results = {}
    for name, cmd in CASES.items():
        walls = [r["wall_s"] for r in runs[name]]
        results[name] = {"command": " ".join(cmd[1:]) if cmd[1] == "-m" else cmd[-1], "wall_s": bc.summary(walls),
                         "ratio_to_baseline": bc.ratio(bc.median(walls), base),
                         "maxrss_bytes": max(r["maxrss_bytes"] for r in runs[name]), "runs": runs[name]}
    rows = [[name, r["command"], bc.fmt(r["wall_s"]["median"], ".3f", " s"), bc.fmt(r["ratio_to_baseline"], ".2f", "x"),
             bc.mib(r["maxrss_bytes"])] for name, r in results.items()]
    ok = results["help"]["ratio_to_baseline"] <= TARGET
    bc.print_table(f"CLI start-up, median of {args.repeats} interleaved runs", ["case", "command", "wall", "vs baseline", "peak RSS"],
                   rows, caption=f"target: --help within {TARGET:g}x the baseline: {bc.verdict(ok)}")
    bc.write_json(args.json, {"environment": bc.finish_environment(info), "repeats": args.repeats, "target_ratio": TARGET,
                              "help_within_target": ok, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
