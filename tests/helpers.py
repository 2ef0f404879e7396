"""Small models, data, a capturing logger and host-sync counters shared by the tests."""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset


class _Capture:
    """``log_metrics`` calls kept in memory; mixed into either package's ``Logger``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def logged_keys(self) -> set[str]:
        """Every metric key logged at least once."""
        return {key for _, metrics in self.calls for key in metrics}

    def by_key(self, prefix: str = "") -> dict[str, list[tuple[int | None, float]]]:
        out: dict[str, list[tuple[int | None, float]]] = {}
        for step, metrics in self.calls:
            for key, value in metrics.items():
                if key.startswith(prefix):
                    out.setdefault(key, []).append((step, value))
        return out

    def at_step(self, step: int) -> dict[str, float]:
        merged: dict[str, float] = {}
        for s, metrics in self.calls:
            if s == step:
                merged.update(metrics)
        return merged


class CaptureLogger(_Capture, Logger):
    """A real ``pytorch_lightning`` logger that keeps every ``log_metrics`` call in memory."""


def capture_logger(package: str = "pytorch_lightning") -> Any:
    """A capturing logger for ``package``: ``"pytorch_lightning"`` or ``"lightning.pytorch"``.

    Each package's ``Trainer`` accepts only its own ``Logger`` subclasses.
    """
    if package == "pytorch_lightning":
        return CaptureLogger()
    base = importlib.import_module(f"{package}.loggers").Logger
    return type("CaptureLogger", (_Capture, base), {})()


def module_grad_norms(model: nn.Module, prefix: str = "") -> dict[str, float]:
    """Reference: the L2 norm of each module's own parameter gradients, by plain torch."""
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            # float64 first: the squares of vanishing gradients underflow in float32
            out[prefix + name] = float(torch.nn.utils.get_total_norm([g.double() for g in grads]))
    return out


def module_param_norms(model: nn.Module, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        params = [p.detach() for p in module.parameters(recurse=False)]
        if params:
            out[prefix + name] = float(
                torch.linalg.vector_norm(torch.cat([p.flatten() for p in params]).double())
            )
    return out


def classification_data(
    n: int = 256, features: int = 16, classes: int = 4, seed: int = 0
) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return TensorDataset(x, y)


class TinyMLP(pl.LightningModule):
    """Linear-ReLU stack; ``on_step`` lets a test observe gradients right before the step."""

    def __init__(
        self,
        sizes: tuple[int, ...] = (16, 32, 32, 4),
        lr: float = 0.1,
        on_before_step: Callable[[pl.LightningModule], None] | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.lr = lr
        self.observer = on_before_step
        self.batch_size = batch_size
        self.data = classification_data(features=sizes[0], classes=sizes[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.observer is not None:
            self.observer(self)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


def quiet_trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
    }
    kwargs.update(overrides)
    return kwargs


def load_example(script: Any) -> Any:
    """Import an example or experiment script as a module (registered, so its dataclasses
    resolve)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(script.stem, script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_example_quick(script: Any, out: Any) -> tuple[dict[str, Any], str]:
    """Run ``script --quick --out out/results.json`` in ``out``; return the JSON and stdout."""
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(out / "results.json")],
        cwd=out,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-5000:]
    return json.loads((out / "results.json").read_text(encoding="utf-8")), result.stdout


# --------------------------------------------------------------------------- host syncs

# The tensor methods that read a value back to the host.
SYNC_METHODS = {"item", "__bool__", "tolist", "cpu", "numpy", "__float__", "__int__", "__index__"}


class SyncCounter(TorchFunctionMode):
    """Counts the host-sync methods called on tensors in ordinary code (not in autograd hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            self.counts[name] += 1
        listed = args[0] if name == "tensor" and args else None
        if isinstance(listed, (list, tuple)) and any(isinstance(a, torch.Tensor) for a in listed):
            self.counts["tensor(list of tensors)"] += 1
        return func(*args, **(kwargs or {}))


class DispatchSyncCounter(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense``: every device-to-host scalar read, hooks included."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class CountSyncsPerBatch(pl.Callback):
    """Counts sync calls from the start to the end of every training batch."""

    def __init__(self) -> None:
        self.per_batch: list[tuple[Counter[str], int]] = []

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        self._function, self._dispatch = SyncCounter(), DispatchSyncCounter()
        self._function.__enter__()
        self._dispatch.__enter__()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._dispatch.__exit__(None, None, None)
        self._function.__exit__(None, None, None)
        self.per_batch.append((self._function.counts, self._dispatch.count))
