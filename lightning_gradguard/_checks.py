"""Argument checking, written once: every public constructor and function uses these.

Every message has the same shape, ``Owner(argument=value): argument must be
<requirement>.``, so a user reading it knows which call, which argument, what was
given and what is allowed. A misspelled choice or keyword gets a "did you mean".
Booleans are never accepted where a number is asked for (``True`` is an ``int``
to Python, never to a user).

Example:
    >>> check_int(0, "window", "AutoClip", low=1)
    Traceback (most recent call last):
    ...
    ValueError: AutoClip(window=0): window must be an integer >= 1.
    >>> check_choice("zclp", "clip", "GradGuard", ["norm", "zclip"])
    Traceback (most recent call last):
    ...
    ValueError: GradGuard(clip='zclp'): clip must be one of ['norm', 'zclip']. Did you mean 'zclip'?
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, overload

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_names",
    "check_number",
    "closest",
    "explain_bad_arguments",
    "is_number",
]


def _fail(
    owner: str, argument: str, value: Any, requirement: str, error: type[Exception] = ValueError
) -> Exception:
    return error(f"{owner}({argument}={value!r}): {argument} must be {requirement}.")


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number a user meant as one (``bool`` is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def closest(value: Any, choices: Iterable[str]) -> str | None:
    """The choice ``value`` most likely misspells, or ``None``."""
    found = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def _span(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "finite"


@overload
def check_number(
    value: Any,
    argument: str,
    owner: str,
    *,
    low: float | None = ...,
    high: float | None = ...,
    low_open: bool = ...,
    high_open: bool = ...,
    allow_none: Literal[False] = ...,
) -> float: ...
@overload
def check_number(
    value: Any,
    argument: str,
    owner: str,
    *,
    low: float | None = ...,
    high: float | None = ...,
    low_open: bool = ...,
    high_open: bool = ...,
    allow_none: bool,
) -> float | None: ...
def check_number(
    value: Any,
    argument: str,
    owner: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a finite ``float`` within the bounds, or a ``ValueError``.

    Args:
        value: what the user passed.
        argument: the argument's name, as the user wrote it.
        owner: the class or function the argument belongs to.
        low: the lower bound (``None``: none).
        high: the upper bound (``None``: none).
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.
        allow_none: accept ``None`` (and return it).

    Example:
        >>> check_number(0.5, "ratio", "EMARatio", low=0, low_open=True)
        0.5
        >>> check_number(0, "ratio", "EMARatio", low=0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: EMARatio(ratio=0): ratio must be a finite number > 0.
    """
    if value is None and allow_none:
        return None
    ok = is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        span = _span(low, high, low_open, high_open)
        what = "a finite number" if span == "finite" else f"a finite number {span}"
        raise _fail(owner, argument, value, what + (" or None" if allow_none else ""))
    return float(value)


@overload
def check_int(
    value: Any,
    argument: str,
    owner: str,
    *,
    low: int | None = ...,
    high: int | None = ...,
    allow_none: Literal[False] = ...,
) -> int: ...
@overload
def check_int(
    value: Any,
    argument: str,
    owner: str,
    *,
    low: int | None = ...,
    high: int | None = ...,
    allow_none: bool,
) -> int | None: ...
def check_int(
    value: Any,
    argument: str,
    owner: str,
    *,
    low: int | None = None,
    high: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """``value`` as an ``int`` within ``[low, high]``, or a ``ValueError``.

    Example:
        >>> check_int(3, "window", "AutoClip", low=1)
        3
        >>> check_int(2.0, "window", "AutoClip", low=1)
        Traceback (most recent call last):
        ...
        ValueError: AutoClip(window=2.0): window must be an integer >= 1.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        span = _span(low, high, False, False)
        what = "an integer" if span == "finite" else f"an integer {span}"
        raise _fail(owner, argument, value, what + (" or None" if allow_none else ""))
    return value


def check_bool(value: Any, argument: str, owner: str) -> bool:
    """``value`` if it is ``True`` or ``False``; a ``TypeError`` otherwise.

    Example:
        >>> check_bool("yes", "skip_nonfinite", "AdaptiveGradClip")
        Traceback (most recent call last):
        ...
        TypeError: AdaptiveGradClip(skip_nonfinite='yes'): skip_nonfinite must be True or False.
    """
    if not isinstance(value, bool):
        raise _fail(owner, argument, value, "True or False", TypeError)
    return value


def check_choice(value: Any, argument: str, owner: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; a ``ValueError`` with a "did you mean".

    Example:
        >>> check_choice("loss", "signal", "SpikeRecovery", ["loss", "grad_norm"])
        'loss'
    """
    if not isinstance(value, str) or value not in choices:
        hint = closest(value, choices)
        message = str(_fail(owner, argument, value, f"one of {list(choices)}"))
        raise ValueError(message + (f" Did you mean {hint!r}?" if hint else ""))
    return value


def check_names(
    value: Any, argument: str, owner: str, *, example: str = "['encoder.0']"
) -> list[str] | None:
    """``value`` as a list of strings (``None`` stays ``None``); a lone string is refused.

    Example:
        >>> check_names("net.0", "layers", "LayerReinit")
        Traceback (most recent call last):
        ...
        TypeError: LayerReinit(layers='net.0'): layers must be a list of names, e.g. ['encoder.0'].
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise _fail(owner, argument, value, f"a list of names, e.g. {example}", TypeError)
    names = list(value)
    if not all(isinstance(n, str) for n in names):
        raise _fail(owner, argument, value, f"a list of names, e.g. {example}", TypeError)
    return names


def explain_bad_arguments(init: Callable[..., None], owner: str) -> Callable[..., None]:
    """Wrap a constructor so a misspelled argument names its likely correction.

    Python's own message (``got an unexpected keyword argument 'clp'``) does not
    say what was meant. The wrapper binds the arguments first and, when that
    fails, raises a ``TypeError`` that names the closest valid argument and lists
    them all. ``inspect.signature`` still sees the original signature (LightningCLI
    builds its options from it).

    Example:
        >>> class Guard:
        ...     def __init__(self, clip: str = "zclip") -> None:
        ...         self.clip = clip
        >>> Guard.__init__ = explain_bad_arguments(Guard.__init__, "Guard")
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
                close = closest(name, names)
                hint = f": did you mean {close!r}?" if close else "."
                hints.append(f"{owner} got an unexpected argument {name!r}{hint}")
            raise TypeError(f"{' '.join(hints)} Valid arguments: {', '.join(names)}.") from None
        init(self, *args, **kwargs)

    return checked_init
