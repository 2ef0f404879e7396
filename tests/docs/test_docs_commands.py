"""Every shell command in README.md and docs/*.md is checked.

The commands themselves run in their own tests (the demo, the doctor, the examples,
the benchmark smoke run); here each command line of a ```bash block is checked for
what goes stale when code moves on: the scripts and files it names exist, the
extras it installs are defined, and its arguments parse with the program's own
argument parser. A command this test does not know fails it, so a new kind of
command gets a check when it is documented.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomllib
from helpers import load_example
from test_docs import ALL_BLOCKS, ROOT, Block

SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.language in ("bash", "sh", "shell", "console")]
EXTRAS = set(
    tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
)


def commands(block: Block) -> list[list[str]]:
    """The command lines of a block (of a transcript, ``$ cmd`` then output: the ``$`` lines)."""
    lines = block.code.replace("\\\n", " ").splitlines()
    if any(line.startswith("$ ") for line in lines):
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    return [words for words in (shlex.split(line, comments=True) for line in lines) if words]


def _parses(parse: Callable[[list[str]], Any], args: list[str], where: str) -> None:
    try:
        parse(args)
    except SystemExit as error:  # argparse reports bad arguments by exiting
        pytest.fail(f"{where}: arguments {args} do not parse (exit {error.code})")


def _check_python_script(script: str, args: list[str], where: str) -> None:
    path = ROOT / script
    assert path.is_file(), f"{where}: {script} does not exist"
    if script == "examples/cli.py":  # LightningCLI: a subcommand and a config file
        assert args[0] in ("fit", "validate", "test", "predict"), f"{where}: {args}"
        config = args[args.index("--config") + 1]
        assert (ROOT / config).is_file(), f"{where}: {config} does not exist"
        return
    sys.path.insert(0, str(path.parent))  # examples import their shared digits module
    try:
        module = load_example(path)
    finally:
        sys.path.remove(str(path.parent))
    _parses(module.parse_args, args, where)


def _check_benchmark_package(args: list[str], where: str) -> None:
    """``python -m benchmarks.overhead ...``: run from the root, it parses its arguments."""
    assert (ROOT / "benchmarks" / "overhead" / "__main__.py").is_file(), where
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.overhead.__main__ import parse_args
    finally:
        sys.path.remove(str(ROOT))
    _parses(parse_args, args, where)


def _check_pip(args: list[str], where: str) -> None:
    assert args[0] in ("install", "download"), f"{where}: pip {args[0]}"
    for arg in args[1:]:
        if arg.startswith(".["):
            extras = arg[2:].rstrip("]").split(",")
            assert set(extras) <= EXTRAS, f"{where}: unknown extra(s) {extras}"


def _check_pytest_args(args: list[str], where: str) -> None:
    """The files exist and a ``-m`` expression names only the markers of ``conftest.py``."""
    from conftest import MARKERS

    for i, arg in enumerate(args):
        if arg == "-m":
            words = set(re.findall(r"\w+", args[i + 1])) - {"and", "or", "not"}
            assert words <= set(MARKERS), f"{where}: unknown marker(s) {words - set(MARKERS)}"
        elif arg.startswith("tests/"):
            assert (ROOT / arg.split("::")[0]).is_file(), f"{where}: {arg} does not exist"


def check(words: list[str], where: str) -> None:
    program, args = words[0], words[1:]
    if program == "bash":
        assert (ROOT / args[0]).is_file(), f"{where}: {args[0]} does not exist"
        if args[0] == "scripts/demo.sh":
            check(["gradguard", "demo", *args[1:]], where)
        if args[0] == "scripts/test.sh":
            _check_pytest_args(args[1:], where)
    elif program == "gradguard" and args[0] == "demo":
        from lightning_gradguard.demo.run import parse_args

        _parses(parse_args, args[1:], where)
    elif program == "gradguard" and args[0] == "doctor":
        from lightning_gradguard.doctor.cli import _build_parser

        _parses(_build_parser().parse_args, args[1:], where)
    elif program == "python" and args[0] == "-m" and args[1] == "benchmarks.overhead":
        _check_benchmark_package(args[2:], where)
    elif program == "python" and args[0] == "-m":
        assert args[1] == "lightning_gradguard.doctor", f"{where}: python -m {args[1]}"
        check(["gradguard", "doctor", *args[2:]], where)
    elif program == "python":
        _check_python_script(args[0], args[1:], where)
    elif program == "pip":
        _check_pip(args, where)
    elif program == "mkdocs":
        assert args[0] in ("serve", "build"), f"{where}: mkdocs {args[0]}"
        assert (ROOT / "mkdocs.yml").is_file()
    elif program == "wandb":
        assert args[0] == "sync", f"{where}: wandb {args[0]}"
    elif program == "pre-commit":
        assert args[0] in ("install", "run"), f"{where}: pre-commit {args[0]}"
        assert (ROOT / ".pre-commit-config.yaml").is_file()
    elif program == "echo":  # a transcript showing an exit status
        pass
    else:
        pytest.fail(f"{where}: no check for the command {program!r}; add one to this test")


def test_docs_have_shell_commands() -> None:
    assert len(SHELL_BLOCKS) >= 8


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.id for b in SHELL_BLOCKS])
def test_shell_commands_name_real_files_and_parse(block: Block) -> None:
    found = commands(block)
    assert found, f"{block.id}: a shell block without a command"
    for words in found:
        check(words, block.id)


def test_a_stale_command_is_caught() -> None:
    stale = Block(Path(ROOT / "README.md"), 1, "bash", "gradguard demo --scenario dying\n")
    with pytest.raises(pytest.fail.Exception, match="do not parse"):
        check(commands(stale)[0], stale.id)
    missing = Block(Path(ROOT / "README.md"), 1, "bash", "python examples/nope.py\n")
    with pytest.raises(AssertionError, match="does not exist"):
        check(commands(missing)[0], missing.id)
    marker = Block(Path(ROOT / "README.md"), 1, "bash", 'bash scripts/test.sh -m "not slwo"\n')
    with pytest.raises(AssertionError, match="unknown marker"):
        check(commands(marker)[0], marker.id)
