"""The ``gradguard`` command: ``gradguard demo`` and ``gradguard doctor``."""

from __future__ import annotations

import sys

__all__ = [
    "USAGE",
    "main",
]

USAGE = """usage: gradguard {demo,doctor} [options]

  demo     train vanishing, exploding and dying-ReLU networks on the digits data,
           each without and with GradGuard, and compare (gradguard demo --help)
  doctor   diagnose a LightningModule's gradients before training
           (gradguard doctor --help)
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; returns the exit code.

    Example:
        >>> main(["--help"])  # doctest: +ELLIPSIS
        usage: gradguard {demo,doctor} [options]
        ...
        0
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "demo":
        from lightning_gradguard.demo import main as demo_main

        return demo_main(rest)
    if command == "doctor":
        from lightning_gradguard.doctor import main as doctor_main

        return doctor_main(rest)
    print(f"gradguard: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
