"""What the benchmark scripts share: import bootstrap, repeat statistics, machine description.

Importing this module puts this checkout's root first on `sys.path`, so `python benchmarks/x.py`
(from any folder, installed or not) measures the `ovd_jax` and `configs` next to the script,
as `python train.py` does, and never another installed copy of the package.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path[:1]:
    sys.path.insert(0, ROOT)


def add_repeat_args(parser, *, repeats: int = 5) -> None:
    """`--repeats N`: independent measurements per case; the tables report their median."""
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"independent measurements per case (default {repeats}); the table "
                             "shows their median and min-max range")


def check_repeats(repeats: int) -> None:
    if repeats < 1:
        raise ValueError(f"--repeats={repeats}: give at least 1 (5 or more for a table).")


def median_range(values, fmt: str = "{:.3g}") -> str:
    """'median (min-max)' of a list of numbers, e.g. '4.1 (3.9-4.4)'; one value: just it."""
    values = list(values)
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def command_line() -> str:
    """The command that produced this run, as typed from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def machine(load_before=None) -> str:
    """One sentence: CPU model, cores usable by this process, OS, Python, load averages.

    `load_before`: the load averages taken when the run started (shown next to the current
    ones), so a reader sees whether other jobs shared the machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = (f"{cpu_model()}, {cores} of {os.cpu_count()} cores usable, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    now = load_average()
    if now is not None:
        before = f"{load_before[0]:.1f} at start, " if load_before else ""
        text += f"; 1-min load average {before}{now[0]:.1f} at end"
        # This run itself adds about 1 to the end figure.
        if (load_before and load_before[0] > 0.5 * cores) or now[0] > cores:
            text += " (NOT a quiet machine: other jobs shared the cores)"
    return text
