"""Every shell command in README.md still works, in its cheap form.

Commands come from the README's ```bash blocks and from inline `python ...` code spans, split at
`&&`. Each kind gets the cheapest check that fails when the command stops working:

* `pip install ...`: not run (it would change the environment); every `-r FILE` must exist and
  `-e .` / `.` must name an installable project (pyproject.toml with [build-system], [project]).
* the test command: must be the command `.ci/run` runs, character for character.
* absl entry points (train.py, eval.py): the command's flags are parsed exactly as written in a
  fresh process - the recipe file loads, every `--config.x.y=v` names an existing key with a
  valid value, no flag is unknown - without training. The main job itself runs at smoke size in
  tests/test_end_to_end.py.
* argparse entry points (benchmarks/*.py, export.py, detect.py, `python -m ovd_jax.convert`):
  `--help` exits 0, and every `--option` the README uses is listed in the help, with a value
  from the listed choices where the help lists them.

Separately, every script under benchmarks/ and every top-level entry point is started from a
folder outside the repository with no PYTHONPATH, as a user of a fresh clone would.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
BENCHMARK_DOC = os.path.join(REPO, "docs", "benchmarks.md")  # the commands behind the figures
SHELLS = ("bash", "sh", "shell", "console")

# Parses an absl entry point's flags without running its main(): imports the script as a module
# (its flag definitions run), then parses argv as absl would.
_ABSL_PARSE = r"""
import importlib.util, os, sys
path, argv = os.path.abspath(sys.argv[1]), sys.argv[1:]
sys.path[0] = os.path.dirname(path)  # what `python script.py` puts first
spec = importlib.util.spec_from_file_location("readme_entry_point", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from absl import flags
if os.environ.get("README_PARTIAL"):  # a fragment ("python train.py --distributed ..."): names
    for arg in argv[1:]:
        name = arg[2:].split("=")[0]
        if arg.startswith("--") and not name.startswith("config."):
            assert name in flags.FLAGS or name[2:] in flags.FLAGS, f"unknown flag --{name}"
else:
    flags.FLAGS(argv)  # raises on an unknown flag, a bad value or an unknown config key
print("parsed", " ".join(argv[1:]))
"""


def _env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # a fresh clone's user has none
    return env


def _split(line: str) -> list[list[str]]:
    """Shell words of one logical line, split into commands at &&, || and ;."""
    commands, current = [], []
    for word in shlex.split(line, comments=True):
        if word in ("&&", "||", ";"):
            commands.append(current)
            current = []
        elif word.endswith(";"):
            current.append(word[:-1])
            commands.append(current)
            current = []
        else:
            current.append(word)
    commands.append(current)
    return [c for c in commands if c]


def readme_commands(path: str = README, python_only: bool = False) -> list[tuple[str, list]]:
    """[(the line, its words)] for every command in a shell block or inline code span of a
    markdown file; `python_only`: only lines that start with `python` (shell variables such as
    `$s` of a loop read as 0)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        if lang in SHELLS:
            lines += [ln for ln in body.replace("\\\n", " ").splitlines() if ln.strip()]
    if python_only:
        lines = [re.sub(r"\$\w+", "0", ln.strip()) for ln in lines
                 if ln.strip().startswith("python ")]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    lines += [m.group(1) for m in re.finditer(r"`((?:time )?python [^`]+)`", prose)]
    out, seen = [], set()
    for line in lines:
        for words in _split(line):
            if words[0] == "time":
                words = words[1:]
            if tuple(words) not in seen:
                seen.add(tuple(words))
                out.append((" ".join(line.split()), words))
    return out


COMMANDS = readme_commands() + readme_commands(BENCHMARK_DOC, python_only=True)


def _kind(words: list[str]) -> str:
    if words[0] == "pip":
        return "pip"
    if words[0] != "python":
        return "other"
    if words[1:3] == ["-m", "pytest"]:
        return "pytest"
    if words[1] == "-c":
        return "snippet"
    return "python"


def _entry(words: list[str]) -> tuple[list[str], list[str], str | None]:
    """(the part that starts the program, its arguments, the script path or None for -m)."""
    if words[1] == "-m":
        return words[:3], words[3:], None
    return words[:2], words[2:], os.path.join(REPO, words[1])


def _is_absl(script: str | None) -> bool:
    if script is None:
        return False
    with open(script, encoding="utf-8") as f:
        return "app.run(" in f.read()


@functools.cache
def _help(start: tuple[str, ...], cwd: str) -> str:
    """`--help` output of an argparse entry point run from `cwd`; asserts exit status 0."""
    argv = [sys.executable, *start[1:], "--help"]
    proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"`{' '.join(start)} --help` (from {cwd}) exited {proc.returncode}:\n"
        f"{proc.stderr[-2000:]}"
    )
    return proc.stdout


def _options(args: list[str]) -> list[tuple[str, str | None]]:
    """[(--option, its value or None)] of an argument list."""
    out = []
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        if "=" in arg:
            name, value = arg.split("=", 1)
        else:
            nxt = args[i + 1] if i + 1 < len(args) else None
            name, value = arg, (nxt if nxt is not None and not nxt.startswith("-") else None)
        out.append((name, value))
    return out


def test_readme_has_commands():
    kinds = {_kind(words) for _, words in COMMANDS}
    assert {"pip", "python", "pytest"} <= kinds, f"README commands not found: {COMMANDS[:5]}"


@pytest.mark.parametrize("line,words", COMMANDS, ids=[" ".join(w)[:80] for _, w in COMMANDS])
def test_readme_command(line, words):
    kind = _kind(words)
    if kind == "other":
        pytest.fail(f"README command {' '.join(words)!r}: no check for this tool; add one to "
                    "tests/test_readme.py or drop the command.")
    if kind == "pip":
        _check_pip(words)
    elif kind == "pytest":
        _check_ci(line)
    elif kind == "snippet":
        pass  # `python -c ...` reads a finished run's files; nothing cheap to check
    elif _is_absl(_entry(words)[2]):
        _check_absl(words)
    else:
        _check_argparse(words)


def _check_pip(words):
    args = words[2:] if words[1] == "install" else pytest.fail(f"pip {words[1]}: not install")
    for flag, value in zip(args, [*args[1:], None]):
        if flag == "-r":
            assert os.path.isfile(os.path.join(REPO, value)), f"pip -r {value}: no such file"
            _check_requirements(os.path.join(REPO, value))
        elif flag in (".", "-e") and (value == "." or flag == "."):
            _check_project()


def _check_requirements(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split("#", 1)[0].split()
            if words[:1] == ["-r"]:
                nested = os.path.join(os.path.dirname(path), words[1])
                assert os.path.isfile(nested), f"{path}: -r {words[1]} does not exist"
                _check_requirements(nested)
            elif words == ["-e", "."]:
                _check_project()


def _check_project():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project.get("build-system", {}).get("build-backend"), "pyproject: no [build-system]"
    deps = project["project"].get("dependencies", [])
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in deps}
    assert {"jax", "flax", "optax", "orbax-checkpoint", "ml_collections"} <= names, deps
    found = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "ovd_jax*" in found and "configs" in found, found


def _check_ci(line):
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = [ln.strip() for ln in f if ln.strip() and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [line], f".ci/run runs {ci}, the README says {line!r}: keep them identical."


def _check_absl(words):
    start, args, script = _entry(words)
    env = _env()
    if "..." in args:  # an inline fragment: its flags must exist, the rest is left out
        env["README_PARTIAL"] = "1"
        args = [a for a in args if a != "..."]
    proc = subprocess.run([sys.executable, "-c", _ABSL_PARSE, script, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"README command `{' '.join(words)}`: its flags no longer parse:\n{proc.stderr[-3000:]}"
    )


def _check_argparse(words):
    start, args, _ = _entry(words)
    text = _help(tuple(start), REPO)
    for name, value in _options(args):
        assert re.search(rf"{re.escape(name)}\b", text), (
            f"README command `{' '.join(words)}`: {name} is not an option of {' '.join(start)}")
        choices = re.search(rf"{re.escape(name)} \{{([^}}]*)\}}", text)
        if choices and value is not None:
            assert value in choices.group(1).split(","), (
                f"README command `{' '.join(words)}`: {name} {value} is not one of "
                f"{{{choices.group(1)}}}")


def _entry_points() -> list[str]:
    scripts = sorted(f for f in os.listdir(os.path.join(REPO, "benchmarks"))
                     if f.endswith(".py") and not f.startswith("_"))
    top = sorted(f for f in os.listdir(REPO)
                 if f.endswith(".py") and "__main__" in open(os.path.join(REPO, f)).read())
    return [os.path.join("benchmarks", f) for f in scripts] + top


@pytest.mark.parametrize("script", _entry_points())
def test_entry_point_runs_from_elsewhere(script, tmp_path):
    """`python <repo>/<script> --help` from an unrelated folder, no PYTHONPATH: exit 0 (absl
    entry points exit 1 after printing their usage, absl's convention for --help)."""
    path = os.path.join(REPO, script)
    proc = subprocess.run([sys.executable, path, "--help"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    expected, marker = (1, "flags:") if _is_absl(path) else (0, "usage:")
    assert proc.returncode == expected and marker in proc.stdout, (
        f"python {path} --help from {tmp_path}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
