"""``python -m lightning_gradguard.doctor [args]``: the same as ``gradguard doctor [args]``."""

from lightning_gradguard.doctor.cli import main

raise SystemExit(main())
