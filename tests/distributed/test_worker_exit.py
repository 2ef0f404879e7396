"""How a worker rank ends: ``distributed_helpers.run_rank`` (see its docstring for why).

Each case runs a small script in a fresh interpreter. An object whose ``__del__`` writes
a line stands for everything that interpreter finalization would destroy (process
groups, stores, tensors): it must never be destroyed, while the ``atexit`` handlers run
and the exit code says how ``main`` ended.
"""

from __future__ import annotations

import subprocess
import sys

import distributed_helpers as h

SCRIPT = """
import atexit, sys
import distributed_helpers as h

class Finalized:
    def __del__(self):
        print("finalized", flush=True)

kept = Finalized()  # a module global: only finalization would destroy it
atexit.register(lambda: print("atexit ran", flush=True))

def main(how):
    print("main ran", end="")  # unflushed: run_rank flushes before os._exit
    if how == "raise":
        raise ValueError("boom")
    if how == "message":
        sys.exit("ranks exited with [1]")

h.run_rank(main, sys.argv[1])
print("after run_rank")
"""


def _run(how: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, how],
        cwd=h.TESTS_DIR,
        env=h.clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_rank_ends_without_interpreter_finalization() -> None:
    done = _run("return")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["main ran" + "atexit ran"]
    assert "finalized" not in done.stdout


def test_a_failed_rank_exits_with_its_traceback_or_message() -> None:
    failed = _run("raise")
    assert failed.returncode == 1
    assert "ValueError: boom" in failed.stderr
    assert "finalized" not in failed.stdout and "after run_rank" not in failed.stdout
    stopped = _run("message")
    assert stopped.returncode == 1
    assert "ranks exited with [1]" in stopped.stderr
    assert "atexit ran" in stopped.stdout
