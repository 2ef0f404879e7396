"""Dead and dormant unit statistics at every activation call site.

A unit (a neuron of a Linear layer's output, a channel of a conv output) is
*dead* over a window of batches when its activation was never positive: a ReLU
that only ever sees negative inputs has zero gradient and never recovers. The
ReDo *dormancy score* (Sokar et al., 2023) of unit ``i`` is its mean
``|h_i|`` divided by the site's average of those means; a unit is dormant
when its score is at most ``tau`` (``tau = 0`` means dead).

:class:`ActivityTracker` measures every *call site* (see
:mod:`lightning_gradguard.functional.call_sites` for the names): each call of an
activation module (a module called twice is two sites), and each functional
activation (``F.relu``, ``F.gelu``, ...) called from a module's own ``forward``,
seen through a ``TorchFunctionMode`` that is active only while the tracker is
attached. Outside a measuring window nothing is hooked. :meth:`ActivityTracker.reduce`
sums the statistics across ranks with one ``all_reduce`` of a flat buffer, so
every rank decides from the same numbers.

A call the tracker cannot measure (an output whose width changed at the same
site, say) never raises inside the forward pass: it warns once, naming the site,
and the site is left out of that window (see :attr:`ActivityTracker.not_covered`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    >>> with torch.no_grad():
    ...     _ = model[0].weight.fill_(0.0), model[0].bias.copy_(torch.tensor([1.0, -1.0, 0.0]))
    >>> tracker = ActivityTracker.for_module(model)
    >>> tracker.attach()
    >>> _ = model(torch.randn(8, 4))
    >>> tracker.detach()
    >>> stats = tracker.stats()["1"]
    >>> stats.dead.tolist(), round(stats.dead_fraction, 3)
    ([False, True, True], 0.667)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_gradguard.functional.call_sites import (
    ACTIVATION_FUNCTIONS,
    CHANNELS_FIRST_PRODUCERS,
    DEFAULT_ACTIVATIONS,
    FUNCTION_NAMES,
    CallSite,
    is_activation_module,
    site_name,
)

LAYOUTS = ("auto", "channels_first", "channels_last")
_NONNEGATIVE = (nn.ReLU, nn.ReLU6)  # activation modules whose outputs are never negative

SiteKey = tuple[str, str | None, int]
"""``(module path, function name or None, call index)``: a site before it is named."""


def unit_dim(output: Tensor, layout: str = "auto", producer: nn.Module | None = None) -> int:
    """The dimension of ``output`` that indexes units.

    ``"auto"``: dimension 1 for ``(N, C)`` and for conv outputs ``(N, C, H, W)`` /
    ``(N, C, D, H, W)``; for 3-d outputs dimension 1 when ``producer`` (the layer
    that ran last before the activation) is a conv or a norm over channels
    (``(N, C, L)``), else the last dimension (``(N, L, C)`` sequences).
    ``"channels_first"`` forces 1, ``"channels_last"`` forces -1.

    Example:
        >>> unit_dim(torch.zeros(8, 16, 5, 5)), unit_dim(torch.zeros(8, 10, 32))
        (1, 2)
        >>> unit_dim(torch.zeros(8, 16, 100), producer=nn.Conv1d(4, 16, 3))
        1
    """
    if layout == "channels_first" or output.dim() <= 2:
        return 1 if output.dim() > 1 else 0
    if layout == "channels_last":
        return output.dim() - 1
    if output.dim() == 3:
        return 1 if isinstance(producer, CHANNELS_FIRST_PRODUCERS) else 2
    return 1


@dataclass(frozen=True)
class UnitStats:
    """Per-unit statistics of one call site over a window (host values).

    Attributes:
        dead: per unit, never positive in the window.
        scores: per unit, the ReDo dormancy score (mean |h| over the site's average).
        samples: positions seen per unit (batch × spatial positions).
    """

    dead: Tensor
    scores: Tensor
    samples: int

    @property
    def dead_fraction(self) -> float:
        """Fraction of units that were never active."""
        return float(self.dead.double().mean()) if self.dead.numel() else 0.0

    def dormant(self, tau: float) -> Tensor:
        """Units whose dormancy score is at most ``tau`` (``tau=0``: dead or silent)."""
        return self.scores <= tau

    def dormant_fraction(self, tau: float) -> float:
        """Fraction of units that are dormant at threshold ``tau``."""
        return float(self.dormant(tau).double().mean()) if self.scores.numel() else 0.0


class _Site:
    """Accumulated activity of one call site (device tensors, host sample count)."""

    def __init__(
        self, key: SiteKey, order: int, dim: int | None, units: int, shape: tuple[int, ...]
    ) -> None:
        self.key, self.order, self.dim, self.units, self.shape = key, order, dim, units, shape
        self.nonneg = False  # a ReLU's output: |h| is h
        self.before: str | None = None
        self.after: str | None = None
        self.peak: Tensor | None = None  # per unit, the largest h seen (> 0: ever active)
        self.abs_sum: Tensor | None = None  # sum of |h| per unit (float64)
        self.samples = 0  # positions seen, a host integer (shapes are known on the host)
        self.failed: str | None = None  # why the site is left out of this window

    def fits(self, h: Tensor) -> bool:
        if self.dim is None:
            return h.dim() == 1
        return h.dim() > self.dim and h.dim() == len(self.shape) and h.shape[self.dim] == self.units

    def add(self, h: Tensor) -> None:
        """Two reductions over every dimension but the units' (no copy, no transpose)."""
        dims = (0,) if self.dim is None else tuple(d for d in range(h.dim()) if d != self.dim)
        wide = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float32
        peak = h.amax(dim=dims).reshape(-1).to(wide)
        abs_sum = (h if self.nonneg else h.abs()).sum(dim=dims, dtype=wide).reshape(-1)
        if self.peak is None or self.abs_sum is None:
            self.peak, self.abs_sum = peak, abs_sum.double()
        else:
            torch.maximum(self.peak, peak, out=self.peak)
            self.abs_sum += abs_sum
        self.samples += h.numel() // self.units

    def reset(self) -> None:
        self.peak = self.abs_sum = None
        self.samples = 0
        self.failed = None


class _FunctionalActivations(TorchFunctionMode):
    """Passes every torch call through; hands activation outputs to the tracker."""

    def __init__(self, tracker: ActivityTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        try:
            name = ACTIVATION_FUNCTIONS.get(func)
        except TypeError:  # an unhashable callable is no activation
            return out
        if name is not None and name in self.tracker.functions:
            self.tracker._on_function(name, out)
        return out


class ActivityTracker:
    """Accumulate per-unit activity at every activation call site over a window.

    Args:
        modules: ``(name, module)`` activation modules whose outputs are measured.
        layout: unit layout, see :func:`unit_dim`.
        device: where statistics live when this rank recorded nothing in a window.
        model: the root model. With it, the tracker follows which module is
            running (module pre/post hooks while attached), so it names functional
            call sites, measures them (``functions``), records each site's
            neighbouring layers and reads ``(N, C, L)`` conv outputs by channel.
        functions: names of the functional activations to measure (default: all of
            :data:`~lightning_gradguard.functional.call_sites.FUNCTION_NAMES` when
            ``model`` is given, none otherwise).
        training_only: measure only modules in training mode (validation passes
            are not training activity).
    """

    def __init__(
        self,
        modules: Iterable[tuple[str, nn.Module]] = (),
        layout: str = "auto",
        device: torch.device | str = "cpu",
        *,
        model: nn.Module | None = None,
        functions: Iterable[str] | None = None,
        training_only: bool = True,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(
                f"layout={layout!r} is not a unit layout: use 'auto', 'channels_first' "
                "or 'channels_last'."
            )
        chosen = (FUNCTION_NAMES if model is not None else ()) if functions is None else functions
        self.functions = frozenset(chosen)
        unknown = sorted(self.functions - set(FUNCTION_NAMES))
        if unknown:
            raise ValueError(
                f"functions={sorted(self.functions)!r}: {unknown} are not functional "
                f"activations; choose from {list(FUNCTION_NAMES)}."
            )
        if self.functions and model is None:
            raise ValueError("functions need model=: functional sites are named by module.")
        self.modules = dict(modules)
        self.layout = layout
        self.device = torch.device(device)  # for the reduction when this rank saw nothing
        self.model = model
        self.training_only = training_only
        self.not_covered: dict[str, str] = {}
        """Sites left out of a window, with the reason (kept across windows)."""
        self._path_of = {id(m): n for n, m in self.modules.items()}
        self._sites: dict[SiteKey, _Site] = {}
        self._counts: dict[tuple[str, str | None], int] = {}
        self._stack: list[tuple[str, nn.Module]] = []
        self._last_leaf: tuple[str, nn.Module] | None = None
        self._awaiting_after: list[_Site] = []
        self._activation_ids: set[int] = set()
        self._handles: list[Any] = []
        self._mode: _FunctionalActivations | None = None
        self._mode_on_stack = False
        self._warned: set[str] = set()
        self._agreed: dict[SiteKey, int] | None = None  # the sites of the last reduction
        self._observer: Callable[[SiteKey, Tensor], None] | None = None

    @classmethod
    def for_module(
        cls,
        model: nn.Module,
        select: Callable[[str, nn.Module], bool] | tuple[type[nn.Module], ...] | None = None,
        layout: str = "auto",
        functions: Iterable[str] | None = None,
        training_only: bool = True,
    ) -> ActivityTracker:
        """Track every activation call site of ``model``.

        Args:
            model: the root model; for a ``torch.compile`` wrapper, the module it
                compiled (site names carry no ``_orig_mod.``).
            select: which activation modules: types, a ``(name, module)`` predicate,
                or ``None`` for :func:`~lightning_gradguard.functional.is_activation_module`.
            layout: unit layout, see :func:`unit_dim`.
            functions: functional activations to measure (default: all).
            training_only: measure only modules in training mode.
        """
        model = _unwrap_compiled(model)
        if select is None:
            named = [(n, m) for n, m in model.named_modules() if n and is_activation_module(m)]
        elif isinstance(select, tuple):
            named = [(n, m) for n, m in model.named_modules() if n and isinstance(m, select)]
        else:
            named = [(n, m) for n, m in model.named_modules() if n and select(n, m)]
        device = next(model.parameters(), torch.empty(0)).device
        return cls(
            named,
            layout,
            device,
            model=model,
            functions=functions,
            training_only=training_only,
        )

    @classmethod
    def for_sites(
        cls,
        model: nn.Module,
        sites: Iterable[str],
        layout: str = "auto",
        training_only: bool = True,
    ) -> ActivityTracker:
        """Track the call sites named in ``sites`` (and the other calls of their modules).

        ``net.3`` and ``layer1.0.relu#1`` select the module at that path (any module:
        its output is measured); ``encoder.layers.0:relu`` selects the functional
        ``relu`` (every functional ``relu`` call is then measured). Statistics are
        keyed by site name, as always.

        Example:
            >>> model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh())
            >>> sorted(ActivityTracker.for_sites(model, ["3"]).modules)
            ['3']
        """
        model = _unwrap_compiled(model)
        paths: set[str] = set()
        functions: set[str] = set()
        for site in sites:
            base = site.split("#")[0]
            if ":" in base:
                functions.add(base.rpartition(":")[2])
            else:
                paths.add(base)
        return cls.for_module(
            model,
            lambda name, _: name in paths,
            layout,
            functions=sorted(functions),
            training_only=training_only,
        )

    @property
    def attached(self) -> bool:
        """Whether hooks are currently attached."""
        return bool(self._handles)

    @property
    def measures_anything(self) -> bool:
        """Whether there is an activation module or a functional activation to measure."""
        return bool(self.modules) or bool(self.functions)

    def observe(self, callback: Callable[[SiteKey, Tensor], None] | None) -> None:
        """Also hand the output of every call the tracker sees to ``callback(key, output)``.

        ``key`` is the site before it is named, ``(module path, function or None, call
        index)`` (:meth:`call_sites` names it); ``output`` is the activation's output as
        the forward pass made it (with its autograd history). ``None`` stops. A callback
        that raises is reported as a warning naming the site; the measurement goes on.

        Example:
            >>> relu = nn.ReLU()
            >>> tracker, seen = ActivityTracker([("act", relu)]), []
            >>> tracker.observe(lambda key, output: seen.append((key, tuple(output.shape))))
            >>> tracker.attach()
            >>> _ = relu(torch.randn(3, 2)), relu(torch.randn(3, 2))
            >>> tracker.detach()
            >>> seen
            [(('act', None, 0), (3, 2)), (('act', None, 1), (3, 2))]
        """
        self._observer = callback

    # ------------------------------------------------------------------ hooks

    def attach(self) -> None:
        """Attach the hooks (and the functional-activation mode); idempotent."""
        if self._handles:
            return
        self._stack, self._last_leaf, self._awaiting_after = [], None, []
        self.new_pass()
        if self.model is not None:
            self._activation_ids = {
                id(m) for m in self.model.modules() if is_activation_module(m)
            } | set(self._path_of)
            for name, module in self.model.named_modules():
                leaf = next(module.children(), None) is None
                weighted = leaf and next(module.parameters(recurse=False), None) is not None
                self._handles.append(
                    module.register_forward_pre_hook(self._enter_hook(name, module, weighted))
                )
                self._handles.append(
                    module.register_forward_hook(
                        self._exit_hook(name, module, weighted), always_call=True
                    )
                )
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._module_hook(name)))
        if self.functions and self.model is not None:
            self._mode = _FunctionalActivations(self)
            self.resume()

    def detach(self) -> None:
        """Remove the hooks and the mode; accumulated statistics are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.pause()
        self._mode = None
        self._stack = []

    def pause(self) -> None:
        """Take the functional-activation mode off the stack until :meth:`resume`.

        The backward pass and the optimizer step call no activation; without the
        mode they pay nothing for it. The next forward of the model resumes it.
        """
        if self._mode is not None and self._mode_on_stack:
            _remove_function_mode(self._mode)
            self._mode_on_stack = False

    def resume(self) -> None:
        """Put the functional-activation mode back on the stack (while attached)."""
        if self._mode is not None and not self._mode_on_stack:
            self._mode.__enter__()
            self._mode_on_stack = True

    def new_pass(self) -> None:
        """Start a new forward pass: call indices (``#i``) count from 0 again."""
        self._counts = {}

    def _enter_hook(self, name: str, module: nn.Module, weighted: bool) -> Callable[..., None]:
        def hook(_: nn.Module, __: Any) -> None:
            if not self._stack:
                self.resume()  # a forward pass begins (after a paused backward, say)
                if module is self.model:
                    self.new_pass()
            self._stack.append((name, module))
            if weighted and self._awaiting_after:
                for site in self._awaiting_after:
                    site.after = name
                self._awaiting_after = []

        return hook

    def _exit_hook(self, name: str, module: nn.Module, weighted: bool) -> Callable[..., None]:
        def hook(_: nn.Module, __: Any, ___: Any) -> None:
            for depth in range(len(self._stack) - 1, -1, -1):
                if self._stack[depth][1] is module:
                    del self._stack[depth:]
                    break
            if weighted:
                self._last_leaf = (name, module)

        return hook

    def _module_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, _: Any, output: Any) -> None:
            if self.training_only and not module.training:
                return  # validation, test and predict passes are not training activity
            self._record((name, None), output, isinstance(module, _NONNEGATIVE))

        return hook

    def _on_function(self, function: str, output: Any) -> None:
        if self._stack:
            owner, module = self._stack[-1]
        elif self.model is not None:
            owner, module = "", self.model
        else:
            return
        if id(module) in self._activation_ids:
            return  # inside an activation module: measured (or deliberately not) as a module
        if self.training_only and not module.training:
            return
        self._record((owner, function), output, function in ("relu", "relu6"))

    def _record(self, prefix: tuple[str, str | None], output: Any, nonneg: bool) -> None:
        index = self._counts.get(prefix, 0)
        self._counts[prefix] = index + 1
        key = (prefix[0], prefix[1], index)
        site = self._sites.get(key)
        if self._observer is not None and isinstance(output, Tensor):
            try:
                self._observer(key, output)
            except Exception as error:  # an observer never stops the user's forward pass
                name = site_name(key[0], key[1], key[2], key[2] + 1)
                if f"observer:{name}" not in self._warned:
                    self._warned.add(f"observer:{name}")
                    warnings.warn(
                        f"ActivityTracker: the observer failed at call site {name!r} "
                        f"({type(error).__name__}: {error}); the measurement goes on.",
                        UserWarning,
                        stacklevel=2,
                    )
        try:
            if not isinstance(output, Tensor) or output.dim() == 0:
                self._fail(key, site, f"its output is {_describe(output)}, not a batch of units")
                return
            h = output.detach()
            if site is None:
                site = self._new_site(key, h)
                site.nonneg = nonneg
            if site.failed is not None:
                return
            if site.peak is None and site.samples == 0 and not site.fits(h):
                site.dim, site.units, site.shape = self._layout_of(h)  # after a reset
            if not site.fits(h):
                expected = f"{site.units} units along dimension {site.dim} of {list(site.shape)}"
                self._fail(
                    key,
                    site,
                    f"an output of shape {list(h.shape)} after {expected} in the same window",
                )
                return
            with torch.no_grad():
                site.add(h)
        except Exception as error:  # a measurement never stops the user's forward pass
            self._fail(key, site, f"{type(error).__name__}: {error}")

    def _layout_of(self, h: Tensor) -> tuple[int | None, int, tuple[int, ...]]:
        if h.dim() == 1:
            return None, 1, tuple(h.shape)
        producer = self._last_leaf[1] if self._last_leaf is not None else None
        dim = unit_dim(h, self.layout, producer)
        return dim, int(h.shape[dim]), tuple(h.shape)

    def _new_site(self, key: SiteKey, h: Tensor) -> _Site:
        dim, units, shape = self._layout_of(h)
        site = _Site(key, len(self._sites), dim, units, shape)
        site.before = self._last_leaf[0] if self._last_leaf is not None else None
        self._awaiting_after.append(site)
        self._sites[key] = site
        return site

    def _fail(self, key: SiteKey, site: _Site | None, reason: str) -> None:
        if site is None:
            site = _Site(key, len(self._sites), None, 0, ())
            self._sites[key] = site
        site.failed = reason
        site.peak = site.abs_sum = None
        name = self._names().get(key, site_name(key[0], key[1], key[2], key[2] + 1))
        self.not_covered[name] = reason
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(
                f"ActivityTracker: call site {name!r} is not measured in this window: {reason}. "
                "Training goes on; the site is left out of the window's statistics.",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------ results

    def reset(self) -> None:
        """Forget accumulated statistics (the sites found so far are kept)."""
        for site in self._sites.values():
            site.reset()

    def _names(self) -> dict[SiteKey, str]:
        calls: dict[tuple[str, str | None], int] = {}
        for module, function, index in self._sites:
            calls[(module, function)] = max(calls.get((module, function), 0), index + 1)
        return {
            key: site_name(key[0], key[1], key[2], calls[(key[0], key[1])]) for key in self._sites
        }

    def call_sites(self) -> list[CallSite]:
        """The call sites recorded so far, in the order of their first call."""
        names = self._names()
        calls: dict[tuple[str, str | None], int] = {}
        for module, function, index in self._sites:
            calls[(module, function)] = max(calls.get((module, function), 0), index + 1)
        out = [
            CallSite(
                name=names[key],
                module=key[0],
                function=key[1],
                index=key[2],
                calls=calls[(key[0], key[1])],
                order=site.order,
                units=site.units,
                unit_dim=-1 if site.dim is None else site.dim,
                shape=site.shape,
                before=site.before,
                after=site.after,
            )
            for key, site in self._sites.items()
            if site.units
        ]
        return sorted(out, key=lambda s: s.order)

    def reduce(self) -> None:
        """Sum the statistics across ranks, every site together.

        A no-op outside a distributed run. Every rank must call it (it is a
        collective), after the same number of windows. Usually one ``all_reduce``
        of a single flat buffer holding every site's statistics, laid out by the
        sites the ranks agreed on at an earlier window, plus one slot that counts
        the ranks that found a site outside that layout. When that slot is not zero
        (the first window, a new site, a site that changed width), the ranks agree
        again (an ``all_gather_object`` of the site keys and widths: a site that did
        not run on some rank, in a conditional branch say, is filled with zeros
        there) and sum again in the new layout. A site that failed on any rank is
        left out everywhere.
        """
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        device = next(
            (s.peak.device for s in self._sites.values() if s.peak is not None), self.device
        )
        agreed = self._agreed
        if agreed is not None:
            outside = any(agreed.get(key) != site.units for key, site in self._sites.items())
            flat = torch.cat(
                [
                    self._pack(agreed, device, blank=outside),
                    torch.tensor([float(outside)], dtype=torch.float64, device=device),
                ]
            )
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            counts = flat[[*self._count_slots(agreed), flat.numel() - 1]].tolist()
            if counts[-1] == 0:  # every rank's sites fit the layout: done in one collective
                self._unpack(agreed, flat, counts[:-1])
                return
        local = [(key, site.units) for key, site in self._sites.items()]
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        agreed = {}
        for rank_sites in gathered:
            for key, units in rank_sites:
                agreed[tuple(key)] = max(agreed.get(tuple(key), 0), int(units))
        self._agreed = agreed
        if not agreed:
            return
        for key, units in agreed.items():
            site = self._sites.get(key)
            if site is not None and site.failed is None and site.units != units:
                site.failed = f"{site.units} units here, {units} on another rank"
        flat = self._pack(agreed, device, blank=False)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self._unpack(agreed, flat, flat[self._count_slots(agreed)].tolist())

    def _pack(self, agreed: dict[SiteKey, int], device: torch.device, blank: bool) -> Tensor:
        """Per agreed site: active (1/0), sums of |h|, samples, failed (zeros if ``blank``)."""
        parts: list[Tensor] = []
        for key, units in agreed.items():
            site = self._sites.get(key)
            usable = not blank and site is not None and site.failed is None
            if usable and site is not None and site.peak is not None and site.abs_sum is not None:
                parts += [(site.peak > 0).double(), site.abs_sum]
            else:
                parts.append(torch.zeros(2 * units, dtype=torch.float64, device=device))
            samples = 0 if site is None or blank else site.samples
            failed = 0.0 if site is None or site.failed is None or blank else 1.0
            parts.append(torch.tensor([float(samples), failed], dtype=torch.float64).to(device))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)

    @staticmethod
    def _count_slots(agreed: dict[SiteKey, int]) -> list[int]:
        slots, offset = [], 0
        for units in agreed.values():
            slots += [offset + 2 * units, offset + 2 * units + 1]
            offset += 2 * units + 2
        return slots

    def _unpack(self, agreed: dict[SiteKey, int], flat: Tensor, counts: list[float]) -> None:
        offset = 0
        for number, (key, units) in enumerate(agreed.items()):
            site = self._sites.get(key)
            if site is None:
                site = _Site(key, len(self._sites), 1, units, ())
                self._sites[key] = site
            samples, failed = counts[2 * number], counts[2 * number + 1]
            if failed and site.failed is None:
                site.failed = "it could not be measured on another rank"
            if units and site.failed is None and samples:
                site.units = units
                site.peak = flat[offset : offset + units]  # ranks where the unit was active
                site.abs_sum = flat[offset + units : offset + 2 * units]
                site.samples = int(samples)
            offset += 2 * units + 2

    def device_stats(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per site ``(dead, scores)`` as device tensors (no host transfer)."""
        names = self._names()
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for key, site in sorted(self._sites.items(), key=lambda item: item[1].order):
            if site.failed is not None or site.peak is None or site.abs_sum is None:
                continue
            mean_abs = site.abs_sum / max(site.samples, 1)
            layer_mean = mean_abs.mean()
            scores = torch.where(layer_mean > 0, mean_abs / layer_mean, torch.zeros_like(mean_abs))
            out[names[key]] = (~(site.peak > 0), scores)
        return out

    def stats(self) -> dict[str, UnitStats]:
        """Per site statistics on the host (one transfer for all sites)."""
        device_stats = self.device_stats()
        if not device_stats:
            return {}
        samples = {name: self._sites[key].samples for key, name in self._names().items()}
        flat = torch.cat(
            [torch.cat([d.double(), s.double()]) for d, s in device_stats.values()]
        ).cpu()  # the one transfer
        out: dict[str, UnitStats] = {}
        offset = 0
        for name, (dead, _) in device_stats.items():
            units = dead.numel()
            out[name] = UnitStats(
                dead=flat[offset : offset + units].bool(),
                scores=flat[offset + units : offset + 2 * units],
                samples=samples[name],
            )
            offset += 2 * units
        return out


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile(module)`` wrapper compiled (``model`` itself otherwise)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _remove_function_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off the function-mode stack, wherever it is; the others stay in order."""
    above: list[Any] = []
    while torch._C._len_torch_function_stack():
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)


def _describe(output: Any) -> str:
    if isinstance(output, Tensor):
        return f"a {output.dim()}-d tensor"
    return f"a {type(output).__name__}"


def trace_call_sites(model: nn.Module, *args: Any, **kwargs: Any) -> list[CallSite]:
    """Run ``model(*args, **kwargs)`` once and return its activation call sites in call order.

    The pass runs in eval mode under ``torch.no_grad`` (BatchNorm statistics and
    dropout are untouched; every module's mode is restored afterwards), with
    compiled code run eagerly (torch.compile's ``"force_eager"`` stance), so a
    compiled model is traced too, without recompiling.

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1, self.fc2, self.act = nn.Linear(4, 8), nn.Linear(8, 8), nn.ReLU()
        ...     def forward(self, x):
        ...         return torch.relu(self.fc2(self.act(self.fc1(x)))) + self.act(x).sum()
        >>> sites = trace_call_sites(Block(), torch.randn(2, 4))
        >>> [(s.name, s.before, s.after, s.units) for s in sites]
        [('act#0', 'fc1', 'fc2', 8), (':relu', 'fc2', None, 8), ('act#1', 'fc2', None, 4)]
    """
    modes = {module: module.training for module in model.modules()}
    tracker = ActivityTracker.for_module(model, training_only=False)
    model.eval()
    prior = _set_compiler_stance("force_eager")
    try:
        tracker.attach()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        tracker.detach()
        _set_compiler_stance(prior)
        for module, training in modes.items():
            module.training = training
    return tracker.call_sites()


def _set_compiler_stance(stance: Any) -> Any:
    """Set torch.compile's stance (a name or a saved stance); return the previous one."""
    from torch._dynamo import eval_frame

    if isinstance(stance, str):
        prior = eval_frame._stance
        torch.compiler.set_stance(stance)
        return prior
    return eval_frame._set_stance(stance)


@dataclass
class MeasuringWindows:
    """When an :class:`ActivityTracker` measures: ``window`` batches every ``every_n_steps`` steps.

    Call :meth:`maybe_open` before each training batch and :meth:`maybe_close` after
    it; ``maybe_close`` returns True once a window is complete, with the hooks
    removed and the statistics reduced across ranks. Outside windows nothing is
    hooked.

    Compiled models (``torch.compile(module)``, ``module.compile()``): while a
    window is open, torch.compile's stance is ``"force_eager"``, so compiled code
    runs eagerly and the hooks run; the compiled graphs are kept and used again
    after the window. A window therefore causes no recompilation; it runs at
    eager speed (``eager_windows=False`` turns this off: hooks added after
    compilation then do not run in the compiled graph).

    Example:
        >>> from torch import nn
        >>> relu = nn.ReLU()
        >>> tracker, windows = ActivityTracker([("relu", relu)]), MeasuringWindows(4, 2)
        >>> done = []
        >>> for step in range(6):
        ...     windows.maybe_open(step, tracker)
        ...     _ = relu(torch.randn(3, 2))
        ...     done.append(windows.maybe_close(tracker))
        >>> done
        [False, True, False, False, False, True]
    """

    every_n_steps: int
    window: int
    started_at: int = -1
    batches: int = 0
    eager_windows: bool = True

    def __post_init__(self) -> None:
        self._prior_stance: Any = None

    def maybe_open(self, step: int, tracker: ActivityTracker) -> None:
        """Attach the hooks if a window is due at ``step`` (the global step)."""
        if tracker.attached:
            tracker.new_pass()  # a new training batch: call indices count from 0
            tracker.resume()
            return
        if not tracker.measures_anything:
            return
        if step % self.every_n_steps == 0 and step != self.started_at:
            self.started_at = step
            self.batches = 0
            tracker.reset()
            tracker.attach()
            if self.eager_windows and self._prior_stance is None:
                self._prior_stance = _set_compiler_stance("force_eager")

    def maybe_close(self, tracker: ActivityTracker) -> bool:
        """Count a batch; at the window's end detach, reduce across ranks and return True."""
        if not tracker.attached:
            return False
        self.batches += 1
        if self.batches < self.window:
            return False
        self.close(tracker)
        tracker.reduce()  # a collective: every rank gets here after the same batches
        return True

    def close(self, tracker: ActivityTracker) -> None:
        """Detach the tracker and give torch.compile its stance back (safe to repeat)."""
        tracker.detach()
        if self._prior_stance is not None:
            _set_compiler_stance(self._prior_stance)
            self._prior_stance = None


__all__ = [
    "DEFAULT_ACTIVATIONS",
    "ActivityTracker",
    "MeasuringWindows",
    "UnitStats",
    "trace_call_sites",
    "unit_dim",
]
