"""One callback base class for both ``pytorch_lightning`` and ``lightning.pytorch``.

The two packages ship distinct ``Callback`` classes. A callback that inherits from
both passes ``isinstance`` checks of either Trainer and of either LightningCLI, so
users keep whichever import style they already have.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any

import pytorch_lightning as _pl
from pytorch_lightning.utilities import rank_zero_warn

_bases: list[type] = [_pl.Callback]
try:  # the unified ``lightning`` package is optional
    import lightning.pytorch as _lp

    _bases.append(_lp.Callback)
except ImportError:  # pragma: no cover - depends on the environment
    pass


def explain_bad_arguments(init: Callable[..., None], owner: str) -> Callable[..., None]:
    """Wrap a constructor so a misspelled argument names its likely correction.

    Python's own message (``got an unexpected keyword argument 'clp'``) does not
    say what was meant. The wrapper binds the arguments first and, when that
    fails, raises a ``TypeError`` that names the closest valid argument and lists
    them all. ``inspect.signature`` still sees the original signature (LightningCLI
    builds its options from it).

    Example:
        >>> class Guard(Callback):
        ...     def __init__(self, clip: str = "zclip") -> None:
        ...         self.clip = clip
        >>> Guard(clp="norm")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: Guard got an unexpected argument 'clp': did you mean 'clip'? Valid arguments: ...
    """
    signature = inspect.signature(init)
    names = [n for n in signature.parameters if n != "self"]

    @functools.wraps(init)
    def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            signature.bind(self, *args, **kwargs)
        except TypeError as error:
            unknown = [k for k in kwargs if k not in signature.parameters]
            if not unknown:
                raise TypeError(f"{owner}: {error}. Valid arguments: {', '.join(names)}.") from None
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
                hint = f": did you mean {close[0]!r}?" if close else "."
                hints.append(f"{owner} got an unexpected argument {name!r}{hint}")
            raise TypeError(f"{' '.join(hints)} Valid arguments: {', '.join(names)}.") from None
        init(self, *args, **kwargs)

    return checked_init


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


__all__ = ["Callback", "explain_bad_arguments", "rank_zero_warn"]
