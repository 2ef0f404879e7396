"""``python -m lightning_gradguard.doctor [args]``: the same as ``gradguard doctor [args]``."""

from lightning_gradguard.doctor.cli import main

__all__: list[str] = []

raise SystemExit(main())
