"""The code in README.md and docs/*.md is real: every block runs, every config loads.

- Each ```python block is executed in a fresh namespace, in a temporary working
  directory, with ``WANDB_MODE=offline``. A block that raises fails its test.
- Each ```yaml block must parse with ``yaml.safe_load``. A block that is a
  LightningCLI config (it has a ``trainer`` section) must also construct every
  callback from its ``class_path`` / ``init_args`` and load through LightningCLI
  itself, with both ``pytorch_lightning`` and ``lightning.pytorch``.
- The metric keys the monitor logs are all documented in docs/metrics.md.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every top-level fenced block of a markdown file."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    start: int | None = None
    language = ""
    for number, line in enumerate(lines, start=1):
        match = FENCE.match(line)
        if start is None and match:
            start, language = number, match.group(1)
        elif start is not None and line.strip() == "```":
            blocks.append(Block(path, start, language, "\n".join(lines[start : number - 1]) + "\n"))
            start = None
    assert start is None, f"{path.relative_to(ROOT)}:{start}: unterminated code block"
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in fenced_blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.language == "python"]
YAML_BLOCKS = [b for b in ALL_BLOCKS if b.language in ("yaml", "yml")]


def test_docs_exist_and_have_code() -> None:
    names = {p.name for p in DOC_FILES}
    assert {"README.md", "index.md", "grad_norm_monitor.md", "metrics.md", "functional.md"} <= names
    assert len(PYTHON_BLOCKS) >= 8
    assert YAML_BLOCKS


def test_relative_links_resolve() -> None:
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))  # no code
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", prose):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), (
                f"{path.relative_to(ROOT)}: broken link {target}"
            )


@pytest.fixture
def doc_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_block_runs(block: Block, doc_env: Path) -> None:
    code = compile(block.code, f"{block.id}", "exec")
    namespace: dict[str, Any] = {"__name__": "__doc_block__"}
    exec(code, namespace)


def _cli_callbacks(config: dict[str, Any]) -> list[dict[str, Any]]:
    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    return list(callbacks)


def _import(class_path: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    cls: type = getattr(importlib.import_module(module_name), name)
    return cls


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=[b.id for b in YAML_BLOCKS])
def test_yaml_block_is_a_working_config(
    block: Block, doc_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = yaml.safe_load(block.code)
    assert isinstance(config, dict), f"{block.id}: not a mapping"
    if "trainer" not in config:
        return  # not a LightningCLI config: parsing is all we can check
    callbacks = _cli_callbacks(config)
    assert callbacks, f"{block.id}: a trainer config without callbacks"
    for entry in callbacks:
        cls = _import(entry["class_path"])
        instance = cls(**(entry.get("init_args") or {}))
        for key, value in (entry.get("init_args") or {}).items():
            if isinstance(value, (bool, int, float, str, list)) and hasattr(instance, key):
                assert getattr(instance, key) == value, f"{block.id}: {key} was not applied"

    # The same file through LightningCLI, with both Lightning packages.
    path = doc_env / "config.yaml"
    path.write_text(block.code, encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["lightning-cli"])
    from lightning.pytorch.cli import LightningCLI as LightningCLI2
    from lightning.pytorch.demos.boring_classes import BoringModel as BoringModel2
    from pytorch_lightning.cli import LightningCLI
    from pytorch_lightning.demos.boring_classes import BoringModel

    for cli_class, model_class in ((LightningCLI, BoringModel), (LightningCLI2, BoringModel2)):
        cli = cli_class(
            model_class, run=False, args=["--config", str(path)], save_config_callback=None
        )
        names = {type(cb).__module__ + "." + type(cb).__name__ for cb in cli.trainer.callbacks}
        for entry in callbacks:
            cls = _import(entry["class_path"])
            assert f"{cls.__module__}.{cls.__name__}" in names, f"{block.id}: {cls} not built"


def _documented_key_patterns() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    table_rows = [line for line in text.splitlines() if line.startswith("| `")]
    return {key for row in table_rows for key in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_logged_keys_are_documented(doc_env: Path) -> None:
    """Run the callbacks in the configurations of the tables; every key they log is in them."""
    import pytorch_lightning as pl
    from helpers import CaptureLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gradguard import AdaptiveGradClip, GradNormMonitor

    class Net(pl.LightningModule):
        def __init__(self, blocks: int) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*[nn.Linear(4, 4) for _ in range(blocks)])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.blocks(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    documented = _documented_key_patterns()
    data = DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=8)
    for blocks, max_layers in ((3, 64), (6, 2)):
        recorder = CaptureLogger()
        monitor = GradNormMonitor(log_every_n_steps=1, max_layers_logged=max_layers)
        clipper = AdaptiveGradClip(policy="norm", log_every_n_steps=1)
        trainer = pl.Trainer(
            max_steps=2,
            callbacks=[monitor, clipper],
            logger=recorder,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        trainer.fit(Net(blocks), data)
        layer_names = {f"blocks.{i}" for i in range(blocks)}
        for key in recorder.logged_keys():
            prefix, _, rest = key.partition("/")
            if rest in layer_names:
                key = f"{prefix}/<layer>" if max_layers >= blocks else "<prefix>/<layer>"
            elif rest.startswith("layers_"):
                key = f"<prefix>/{rest}"
            assert key in documented, f"{key!r} is logged but not documented in docs/metrics.md"
