"""Finding the lightning_gradguard callbacks of a Trainer, bundles included.

A bundle (:class:`~lightning_gradguard.GradGuard`) holds its parts in
``gradguard_parts``; the Trainer only sees the bundle. Callbacks that look for
each other (a clipper for the monitor whose norms it reuses, ``HealthReport``
for everything it summarizes) use :func:`flat_callbacks` so that a part inside a
bundle is found exactly as if it had been listed on its own, in the same order.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "flat_callbacks",
]


def flat_callbacks(trainer: Any) -> list[Any]:
    """``trainer.callbacks`` with every bundle replaced by its parts, in order.

    Example:
        >>> from types import SimpleNamespace
        >>> bundle = SimpleNamespace(gradguard_parts=["monitor", "clipper"])
        >>> flat_callbacks(SimpleNamespace(callbacks=["first", bundle, "last"]))
        ['first', 'monitor', 'clipper', 'last']
    """
    flat: list[Any] = []
    for callback in getattr(trainer, "callbacks", []):
        parts = getattr(callback, "gradguard_parts", None)
        flat.extend(parts if parts is not None else [callback])
    return flat
