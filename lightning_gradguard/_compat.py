"""One callback base class for both ``pytorch_lightning`` and ``lightning.pytorch``.

The two packages ship distinct ``Callback`` classes. A callback that inherits from
both passes ``isinstance`` checks of either Trainer and of either LightningCLI, so
users keep whichever import style they already have.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as _pl
from pytorch_lightning.utilities import rank_zero_warn

from lightning_gradguard._checks import explain_bad_arguments

_bases: list[type] = [_pl.Callback]
try:  # the unified ``lightning`` package is optional
    import lightning.pytorch as _lp

    _bases.append(_lp.Callback)
except ImportError:  # pragma: no cover - depends on the environment
    pass


class Callback(*_bases):  # type: ignore[misc]
    """Base of every lightning_gradguard callback (a Callback of both Lightning packages).

    Constructors of subclasses answer a misspelled argument with the likely
    correction (:func:`explain_bad_arguments`).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            init = explain_bad_arguments(cls.__dict__["__init__"], cls.__name__)
            cls.__init__ = init  # type: ignore[method-assign]


__all__ = ["Callback", "rank_zero_warn"]
