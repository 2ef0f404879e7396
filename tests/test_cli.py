"""GradNormMonitor configured from a LightningCLI YAML file, with both Lightning packages."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard import GradNormMonitor

CONFIG = """
trainer:
  accelerator: cpu
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_gradguard.GradNormMonitor
      init_args:
        log_every_n_steps: 5
        group_by: depth
        depth: 1
        exclude: ["*.bias"]
        norm_type: inf
        patience: 4
"""


def _module_class(package: str) -> type:
    base = importlib.import_module(package).LightningModule

    class CliModel(base):  # type: ignore[misc, valid-type]
        def __init__(self, hidden: int = 8) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> Any:
            data = torch.utils.data.TensorDataset(torch.randn(32, 4))
            return torch.utils.data.DataLoader(data, batch_size=8)

    return CliModel


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_yaml_config_builds_and_runs_the_callback(
    package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli_module = importlib.import_module(f"{package}.cli")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    cli = cli_module.LightningCLI(
        _module_class(package), run=False, save_config_callback=None, args=["--config", str(config)]
    )
    monitors = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradNormMonitor)]
    assert len(monitors) == 1
    monitor = monitors[0]
    assert monitor.log_every_n_steps == 5
    assert monitor.group_by == "depth" and monitor.depth == 1
    assert monitor.exclude == ["*.bias"]
    assert monitor.norm_type == float("inf")
    assert monitor.patience == 4
    cli.trainer.fit(cli.model)
    assert monitor._views[0].grouping.parameter_names == ("net.0.weight", "net.2.weight")
    assert monitor._views[0].steps_seen == 3


def test_yaml_typo_in_argument_is_reported(tmp_path: Path) -> None:
    from pytorch_lightning.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("patience: 4", "patiense: 4"))
    with pytest.raises(SystemExit):
        LightningCLI(
            _module_class("pytorch_lightning"),
            run=False,
            save_config_callback=None,
            args=["--config", str(config)],
        )
