"""Train the digits classifier from a LightningCLI config that sets up the callbacks.

``cli_config.yaml`` next to this script configures ``GradNormMonitor``,
``AdaptiveGradClip``, ``DeadUnitMonitor`` and ``HealthReport`` under
``trainer.callbacks``, and a ``CSVLogger``. Every argument of the callbacks has a
type hint, so LightningCLI checks the values before training starts, and any of them
can be overridden on the command line.

Usage::

    python examples/cli.py fit --config examples/cli_config.yaml
    python examples/cli.py fit --config examples/cli_config.yaml --trainer.max_epochs 2
    python examples/cli.py fit --config examples/cli_config.yaml --print_config
"""

from __future__ import annotations

from digits import DigitsClassifier, DigitsDataModule
from pytorch_lightning.cli import LightningCLI


def main(args: list[str] | None = None) -> LightningCLI:
    """Run LightningCLI over the digits classifier and data module."""
    return LightningCLI(DigitsClassifier, DigitsDataModule, args=args)


if __name__ == "__main__":
    main()
