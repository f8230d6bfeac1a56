"""Flag parsing for the entry points, and user errors reported as one sentence.

`parse_flags` (passed to `absl.app.run` by train.py and eval.py) turns config-override mistakes
into one line and exit code 2, and installs `report_user_errors`: a ValueError raised by this
project's own code (the convention for bad input: one sentence naming the input and the fix)
then ends the program with `error: <message>` on stderr and exit code 1, without a traceback.
ValueErrors raised inside third-party code (likely bugs, not bad input) keep their traceback,
and so does everything with OVD_TRACEBACK=1 in the environment.
"""

from __future__ import annotations

import os
import sys
import types

from absl import flags

# Files in the package, or in the repository holding it (configs/, the entry points), are "ours".
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = os.path.dirname(_PACKAGE)


def _raised_by_project(tb: types.TracebackType | None) -> bool:
    """Whether the innermost frame of `tb` is in this repository's code (not site-packages)."""
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return filename.startswith(_PACKAGE + os.sep) or (
        filename.startswith(_ROOT + os.sep) and "site-packages" not in filename)


def is_user_error(exc: BaseException) -> bool:
    """A ValueError raised by this project's input checks (see the module docstring)."""
    return isinstance(exc, ValueError) and _raised_by_project(exc.__traceback__)


def _root_user_error(exc: BaseException) -> BaseException | None:
    """The first project ValueError in `exc`'s cause/context chain (ml_collections re-raises a
    recipe's ValueError with the traceback pasted into the message, absl wraps that again)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if is_user_error(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    if not os.environ.get("OVD_TRACEBACK") and is_user_error(exc):
        sys.stderr.write(f"error: {exc}\n(set OVD_TRACEBACK=1 to see where it was raised)\n")
        sys.stderr.flush()
        return  # the interpreter still exits with status 1
    _previous(exc_type, exc, tb)


def report_user_errors() -> None:
    """Installs the hook that prints a project ValueError escaping `main` as one message."""
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with an unknown `--config.x.y=...` key, a wrongly typed value or an
    unknown recipe variant reported as one line + exit 2."""
    report_user_errors()
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        sys.stderr.write(
            f"error: unknown config key {e} in {' '.join(overrides) or 'the --config overrides'}; "
            "check the spelling against the recipe file (python -c \"from configs import demo; "
            "print(demo.get_config(''))\" lists every key).\n"
        )
        sys.exit(2)
    except (flags.Error, ValueError) as e:
        root = None if os.environ.get("OVD_TRACEBACK") else _root_user_error(e)
        if root is not None:  # a recipe's get_config refused its argument (unknown variant)
            sys.stderr.write(f"error: {root}\n")
            sys.exit(2)
        if isinstance(e, ValueError):
            raise
        hint = ("; the value must have the type of the recipe's default (int, float, bool, "
                "string or tuple)" if "--config." in str(e) else "")
        sys.stderr.write(f"error: {e}{hint}\n")
        sys.exit(2)


def define_runtime_flags() -> None:
    """Defines the flags both entry points take: `--distributed`, `--coordinator_address`,
    `--num_processes`, `--process_id` (see `launch.setup_runtime`) and `--progress`. The entry
    point lists them in its `--help` with `flags.adopt_module_key_flags(cli)`."""
    flags.DEFINE_bool("distributed", False,
                      "Call jax.distributed.initialize() with the layout detected from the "
                      "environment (TPU pods, SLURM, Open MPI); implied by the three flags below.")
    flags.DEFINE_string("coordinator_address", None,
                        "Multi-process: host:port of process 0 (jax.distributed.initialize).")
    flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes take part.")
    flags.DEFINE_integer("process_id", None, "Multi-process: this process's index, 0-based.")
    flags.DEFINE_bool("progress", True, "Show progress bars.")
