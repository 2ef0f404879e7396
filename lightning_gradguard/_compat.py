"""One callback base class for both ``pytorch_lightning`` and ``lightning.pytorch``.

The two packages ship distinct ``Callback`` classes. A callback that inherits from
both passes ``isinstance`` checks of either Trainer and of either LightningCLI, so
users keep whichever import style they already have.
"""

from __future__ import annotations

import pytorch_lightning as _pl
from pytorch_lightning.utilities import rank_zero_warn

_bases: list[type] = [_pl.Callback]
try:  # the unified ``lightning`` package is optional
    import lightning.pytorch as _lp

    _bases.append(_lp.Callback)
except ImportError:  # pragma: no cover - depends on the environment
    pass


class Callback(*_bases):  # type: ignore[misc]
    """Base of every lightning_gradguard callback (a Callback of both Lightning packages)."""


__all__ = ["Callback", "rank_zero_warn"]
