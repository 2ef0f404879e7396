"""One measuring-window hook set, for the callbacks that measure activity in windows.

:class:`~lightning_gradguard.DeadUnitMonitor` and
:class:`~lightning_gradguard.UnitRecycler` both measure an
:class:`~lightning_gradguard.functional.ActivityTracker` for ``window`` training
batches every ``every_n_steps`` optimizer steps. :class:`WindowedCallback` opens
the window before a batch, counts and closes it after one, hands the complete
window to :meth:`WindowedCallback.on_window_end`, and removes every hook (and
gives torch.compile its stance back) at the end of a fit, at teardown and after
an exception, where Lightning calls no ``teardown``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from types import SimpleNamespace
    >>> from lightning_gradguard.functional import ActivityTracker
    >>> class Count(WindowedCallback):
    ...     def __init__(self) -> None:
    ...         super().__init__(every_n_steps=4, window=2)
    ...         self.ends = []
    ...     def on_window_end(self, trainer, pl_module, tracker):
    ...         self.ends.append(trainer.global_step)
    >>> relu, callback = nn.ReLU(), Count()
    >>> callback._tracker = ActivityTracker([("relu", relu)])
    >>> for step in range(6):
    ...     trainer = SimpleNamespace(global_step=step)
    ...     callback.on_train_batch_start(trainer, None, None, step)
    ...     _ = relu(torch.randn(3, 2))
    ...     callback.on_train_batch_end(trainer, None, None, None, step)
    >>> callback.ends
    [1, 5]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from typing_extensions import override

from lightning_gradguard._compat import Callback
from lightning_gradguard.functional.activity import ActivityTracker, MeasuringWindows

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = [
    "WindowedCallback",
]


class WindowedCallback(Callback):
    """A callback measuring ``self._tracker`` in windows; subclasses implement ``on_window_end``.

    A subclass builds ``self._tracker`` (in ``on_fit_start`` or later); until then
    the hooks do nothing. Its window position is part of its checkpoint state
    through :meth:`_window_state` / :meth:`_load_window_state`.

    Args:
        every_n_steps: start a measuring window every this many optimizer steps.
        window: training batches per window.
    """

    def __init__(self, every_n_steps: int, window: int) -> None:
        self._tracker: ActivityTracker | None = None
        self._windows = MeasuringWindows(every_n_steps, window)

    def on_window_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, tracker: ActivityTracker
    ) -> None:
        """Called after the last batch of a window, with the statistics reduced across ranks."""
        raise NotImplementedError

    def _restart_windows(self) -> None:
        """Forget the window position (a new fit)."""
        self._windows = MeasuringWindows(self._windows.every_n_steps, self._windows.window)

    def _window_state(self) -> dict[str, int]:
        return {"window_started_at": self._windows.started_at}

    def _load_window_state(self, state: dict[str, Any]) -> None:
        self._windows.started_at = int(state.get("window_started_at", -1))

    def _close_window(self) -> None:
        """Remove the hooks and give torch.compile its stance back (safe to repeat)."""
        if self._tracker is not None:
            self._windows.close(self._tracker)

    def _open_window_if_due(self, trainer: pl.Trainer) -> None:
        if self._tracker is not None:
            self._windows.maybe_open(int(trainer.global_step), self._tracker)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._open_window_if_due(trainer)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        tracker = self._tracker
        if tracker is not None and self._windows.maybe_close(tracker):
            self.on_window_end(trainer, pl_module, tracker)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_window()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_window()

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning does not call ``teardown`` after an exception: leave no hook, no
        # TorchFunctionMode and no compiler stance behind in the user's process.
        self._close_window()
