"""``LayerReinit``: re-initialize layers whose gradients vanished, or on a schedule.

Example:
    >>> import pytorch_lightning as pl
    >>> from lightning_gradguard import GradNormMonitor, LayerReinit
    >>> callbacks = [GradNormMonitor(), LayerReinit(check_every_n_steps=100)]
    >>> trainer = pl.Trainer(callbacks=callbacks, logger=False)
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from typing_extensions import override

from lightning_gradguard._checks import check_int, check_names
from lightning_gradguard._compat import Callback, rank_zero_warn
from lightning_gradguard.callbacks._parts import flat_callbacks
from lightning_gradguard.callbacks._reinit_common import (
    check_named_scheme,
    check_seed,
    refuse_sharded,
    seeded_generator,
    weight_layer_names,
)
from lightning_gradguard.callbacks._trainer import optimizer_of
from lightning_gradguard.callbacks.grad_norm_monitor import GradNormMonitor
from lightning_gradguard.functional.init import consumer_nonlinearities, init_layer_
from lightning_gradguard.functional.optimizer_state import reset_optimizer_state_
from lightning_gradguard.functional.units import map_layers
from lightning_gradguard.record import RunRecord, run_record

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = [
    "LayerReinit",
]


def _check_steps(at_steps: Any) -> list[int] | None:
    """``at_steps`` as a sorted list of global steps (a string is refused, not split)."""
    if at_steps is None:
        return None
    if isinstance(at_steps, (str, bytes)) or not isinstance(at_steps, (list, tuple)):
        raise TypeError(
            f"LayerReinit(at_steps={at_steps!r}): at_steps must be a list of global steps, "
            "e.g. [10, 500]."
        )
    return sorted(check_int(step, "at_steps", "LayerReinit", low=0) for step in at_steps)


class LayerReinit(Callback):
    """Re-initialize layers whose gradients vanished, or on a schedule.

    Vanishing is read from a :class:`~lightning_gradguard.GradNormMonitor` listed
    before this callback (its norms and its ``vanishing_threshold``/``patience``
    detection: no second pass over the gradients), every ``check_every_n_steps``
    steps. A re-initialized layer gets a fresh weight (``scheme``, gain of its
    consuming activation), zero bias, and its optimizer state zeroed, Adam's
    ``step`` included, so its next update is a fresh Adam's
    (:func:`~lightning_gradguard.functional.reset_optimizer_state_`); the monitor's
    streak for it restarts.
    Every re-initialization is a ``reinit`` event of the run record; ``events``
    lists them (step, kind, layer, detail).

    Args:
        check_every_n_steps: how often the monitor's vanishing flags are read (one
            host read per check).
        at_steps: explicit schedule: re-initialize ``layers`` at these global steps.
        layers: module names for the schedule (and, if given, the only layers the
            vanishing rule may touch).
        scheme: init scheme.
        max_reinits_per_layer: a layer is re-initialized at most this many times by
            the vanishing rule (a layer that vanishes again needs another remedy).
        seed: seed of the random draws (with the step: identical on every rank).
    """

    def __init__(
        self,
        check_every_n_steps: int = 50,
        at_steps: list[int] | None = None,
        layers: list[str] | None = None,
        scheme: str = "kaiming_normal",
        max_reinits_per_layer: int = 1,
        seed: int = 0,
    ) -> None:
        owner = "LayerReinit"
        self.check_every_n_steps = check_int(
            check_every_n_steps, "check_every_n_steps", owner, low=1
        )
        self.max_reinits_per_layer = check_int(
            max_reinits_per_layer, "max_reinits_per_layer", owner, low=1
        )
        self.scheme = check_named_scheme(scheme, owner)
        self.at_steps = _check_steps(at_steps)
        self.layers = check_names(layers, "layers", owner, example="['encoder.0', 'head']")
        if self.at_steps is not None and not self.layers:
            raise ValueError(
                f"LayerReinit(at_steps={at_steps!r}): at_steps needs layers=[...], the modules "
                "to re-initialize."
            )
        self.seed = check_seed(seed, owner)
        self.reinit_counts: dict[str, int] = {}
        self._monitor: GradNormMonitor | None = None
        self._scheduled_at = -1  # the last step the schedule ran (once per step)
        self._record: RunRecord | None = None

    @functools.cached_property  # Lightning reads it at every hook call: compute it once
    def state_key(self) -> str:
        return self._generate_state_key(layers=self.layers, at_steps=self.at_steps)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reinit_counts": dict(self.reinit_counts), "scheduled_at": self._scheduled_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reinit_counts = {
            str(k): int(v) for k, v in state_dict.get("reinit_counts", {}).items()
        }
        self._scheduled_at = int(state_dict.get("scheduled_at", -1))

    @property
    def events(self) -> list[dict[str, Any]]:
        """The re-initializations of this run (step, kind, layer, detail), from the run record."""
        if self._record is None:
            return []
        return [event.row() for event in self._record.events_of("reinit")]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._record = run_record(trainer)  # in place before a checkpoint is restored
        if stage == "fit":  # per run: a resumed fit gets them back from load_state_dict
            self._scheduled_at = -1
            self.reinit_counts = {}
        callbacks = flat_callbacks(trainer)
        monitors = [
            cb for cb in callbacks[: callbacks.index(self)] if isinstance(cb, GradNormMonitor)
        ]
        self._monitor = monitors[0] if monitors else None
        if self._monitor is None and self.at_steps is None:
            raise ValueError(
                "LayerReinit reads vanishing gradients from a GradNormMonitor: add "
                "GradNormMonitor() before LayerReinit in Trainer(callbacks=[...]), or give "
                "an explicit schedule with at_steps=[...] and layers=[...]."
            )
        if self._monitor is not None and not self._monitor.detect and self.at_steps is None:
            raise ValueError(
                "LayerReinit reads the vanishing flags of the GradNormMonitor before it, but that "
                "monitor has detect=False and never sets them: use GradNormMonitor(detect=True), "
                "or give an explicit schedule with at_steps=[...] and layers=[...]."
            )
        if self.layers is not None:
            tied = map_layers(pl_module).tied
            shared = {n: tied[n] for n in self.layers if n in tied}
            if shared:
                raise ValueError(
                    f"layers={self.layers!r}: {sorted(shared)} share their weight with "
                    f"{sorted(set(shared.values()))} (tied): re-initializing them would redraw "
                    "that layer too. Leave them out."
                )
            weight_layers = weight_layer_names(pl_module)
            bad = [n for n in self.layers if n not in weight_layers]
            if bad:
                raise ValueError(
                    f"layers={self.layers!r}: {bad} are not Linear/Conv modules of the model "
                    "(Linear, Conv, ConvTranspose or Hugging Face Conv1D)."
                )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_sharded(pl_module, "LayerReinit")

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = int(trainer.global_step)
        scheduled = self.at_steps is not None and step in self.at_steps and bool(self.layers)
        if scheduled and step != self._scheduled_at and self.layers:
            self._scheduled_at = step
            self._reinit(trainer, pl_module, list(self.layers), step, "schedule")
        if self._monitor is None or step % self.check_every_n_steps:
            return
        names = self._monitor.vanishing_layers()  # one host read per check
        weight_layers = weight_layer_names(pl_module)
        chosen = [
            n
            for n in names
            if n in weight_layers
            and (self.layers is None or n in self.layers)
            and self.reinit_counts.get(n, 0) < self.max_reinits_per_layer
        ]
        if chosen:
            self._reinit(trainer, pl_module, chosen, step, "vanishing gradients")
            self._monitor.restart_vanishing(chosen)

    @torch.no_grad()
    def _reinit(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        names: list[str],
        step: int,
        reason: str,
    ) -> None:
        gains = consumer_nonlinearities(pl_module)
        layer_map = map_layers(pl_module)
        for offset, name in enumerate(names):
            layer = layer_map[name]  # fans and units from the map (HF Conv1D is [in, out])
            weight = layer.weight
            nl, slope = gains.get(name) or ("relu", 0.0)
            generator = seeded_generator(self.seed, step * 131 + offset, weight.device)
            init_layer_(layer, self.scheme, nl, slope, generator=generator)
            params = [weight]
            if layer.bias is not None:
                layer.bias.zero_()
                params.append(layer.bias)
            for parameter in params:
                reset_optimizer_state_(optimizer_of(trainer, parameter), parameter)
            if reason != "schedule":  # the limit is for the vanishing rule only
                self.reinit_counts[name] = self.reinit_counts.get(name, 0) + 1
            run_record(trainer).add("reinit", step, layers=[name], detail=reason)
        rank_zero_warn(f"LayerReinit: re-initialized {', '.join(names)} at step {step} ({reason}).")
