"""Pictures of gradient health: gradient-flow heatmap, dead-unit chart, clipping chart.

Pure matplotlib + numpy, no Lightning or wandb. Every function builds a
:class:`matplotlib.figure.Figure` directly (not through ``pyplot``), so nothing
global changes (no backend switch, no open-figure registry) and it works
headless. Hand the figure to a logger (``wandb.Image(fig)``), or write it with
:func:`save_png`.

The inputs are the logged metrics (see ``docs/metrics.md``) gathered into arrays:
one row per logged step, one column per layer, in model order (input first).

Example:
    >>> fig = gradient_flow_heatmap(
    ...     steps=[0, 10, 20],
    ...     layers=["encoder.0", "encoder.1", "head"],
    ...     norms=[[1e-1, 1e-4, 1e-8], [1e-1, 1e-5, 0.0], [2e-1, 1e-5, 1e-9]],
    ... )
    >>> fig.axes[1].get_ylabel()
    'log10 ‖grad‖'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.collections import PatchCollection
from matplotlib.colors import Colormap, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

__all__ = [
    "clip_chart",
    "dead_units_chart",
    "gradient_flow_heatmap",
    "save_png",
    "shorten_names",
    "vanishing_mask",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: Color of NaN / inf cells and markers: outside every colormap used here.
NONFINITE_COLOR = "#e4002b"
#: Color of heatmap cells with no value (masked entries: the layer was not logged).
MISSING_COLOR = "0.88"
#: Hatch pattern and color of vanishing cells.
VANISHING_HATCH = "///"
VANISHING_COLOR = "white"
#: At most this many layer names on the heatmap's y axis (every k-th otherwise).
MAX_LAYER_LABELS = 40
#: At most this many layers named in the dead-unit chart's legend.
MAX_LEGEND_LAYERS = 12
#: With many layers, the dead-unit chart colors at least this many (the deadest).
MIN_HIGHLIGHT = 3
#: Layer names longer than this are shortened from the left.
MAX_NAME_CHARS = 28
#: Floor of the heatmap when no positive finite norm is there to set it.
DEFAULT_FLOOR = 1e-12
DEFAULT_DPI = 150
#: The heatmap's color scale spans at least this many decades.
MIN_DECADES = 3.0


# --------------------------------------------------------------------------- helpers


def _fmt(value: float) -> str:
    """A threshold as people write it: ``1e-07``, ``0.5``, ``2.5``."""
    return f"{value:.3g}"


def _tail(name: str, parts: int) -> str:
    """The last ``parts`` dotted components of ``name``, with ``…`` if some were cut."""
    pieces = name.split(".")
    if parts >= len(pieces):
        return name
    return "…" + ".".join(pieces[-parts:])


def _short(name: str, parts: int, max_chars: int) -> str:
    """``_tail`` cut further from the left when one component alone is too long."""
    text = _tail(name, parts)
    if len(text) > max_chars and parts == 1:
        text = "…" + name[-(max_chars - 1) :]
    return text


def shorten_names(names: Sequence[str], max_chars: int = MAX_NAME_CHARS) -> list[str]:
    """Shorten dotted layer names from the left, keeping them distinct.

    Each name keeps as many trailing dotted components as fit in ``max_chars``
    (at least one); cut names start with ``…``. Names that would collide keep
    more components until they differ (possibly beyond ``max_chars``).

    Args:
        names: dotted module paths, e.g. ``"model.encoder.layers.3.attn"``.
        max_chars: the longest label wanted.

    Returns:
        The labels, in the order of ``names``.

    Example:
        >>> shorten_names(["model.encoder.layers.3.self_attn", "head"], max_chars=20)
        ['…layers.3.self_attn', 'head']
        >>> shorten_names(["m.encoder.layers.0.attn", "m.decoder.layers.0.attn"], max_chars=16)
        ['…encoder.layers.0.attn', '…decoder.layers.0.attn']
    """
    parts = []
    for name in names:
        count = 1
        while count < name.count(".") + 1 and len(_tail(name, count + 1)) <= max_chars:
            count += 1
        parts.append(count)
    labels = [_short(n, p, max_chars) for n, p in zip(names, parts)]
    while True:
        seen: dict[str, list[int]] = {}
        for index, label in enumerate(labels):
            seen.setdefault(label, []).append(index)
        grow = [
            i for group in seen.values() if len(group) > 1 for i in group if labels[i] != names[i]
        ]
        if not grow:
            return labels
        for i in grow:
            parts[i] += 1
            labels[i] = _tail(names[i], parts[i])


def _floats(values: npt.ArrayLike) -> tuple[FloatArray, BoolArray]:
    """float64 values and the mask of missing ones (masked entries of a masked array)."""
    masked = np.ma.asarray(values, dtype=np.float64)
    return np.asarray(np.ma.getdata(masked), dtype=np.float64), np.ma.getmaskarray(masked)


def _grid(
    values: npt.ArrayLike, n_steps: int, n_layers: int, what: str
) -> tuple[FloatArray, BoolArray]:
    """``values`` as a float64 ``[n_steps, n_layers]`` array and its missing cells."""
    array, missing = _floats(values)
    if array.ndim == 1 and n_layers == 1:
        array, missing = array[:, None], missing[:, None]
    if array.shape != (n_steps, n_layers):
        raise ValueError(
            f"`{what}` must have shape [n_steps, n_layers] = ({n_steps}, {n_layers}) "
            f"(one row per step, one column per layer), got {array.shape}"
        )
    return array, missing


def _series(values: npt.ArrayLike, n_steps: int, what: str) -> FloatArray:
    """``values`` as a float64 vector of length ``n_steps``, missing entries NaN."""
    array, missing = _floats(values)
    if array.shape != (n_steps,):
        raise ValueError(f"`{what}` must have one value per step ({n_steps}), got {array.shape}")
    return np.where(missing, np.nan, array)


def _check_axes(steps: Sequence[int], layers: Sequence[str] | None = None) -> None:
    if len(steps) == 0:
        raise ValueError("`steps` is empty: nothing to plot")
    if layers is not None and len(layers) == 0:
        raise ValueError("`layers` is empty: nothing to plot")
    if isinstance(layers, str):
        raise TypeError("`layers` must be a sequence of layer names, not one string")


def _layer_colors(n_layers: int) -> list[tuple[float, float, float, float]]:
    """Distinct colors for few layers; input → output gradient for many."""
    if n_layers <= 10:
        cmap: Colormap = colormaps["tab10"]
        return [cmap(i) for i in range(n_layers)]
    cmap = colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.0, 0.92, n_layers)]


# --------------------------------------------------------------------------- heatmap


def _log_norms(norms: FloatArray, vanishing_threshold: float | None) -> tuple[FloatArray, float]:
    """log10 of the norms, zeros clipped to a floor; non-finite cells stay NaN.

    The floor is a decade below the smallest positive norm (and the threshold),
    so zero norms are the darkest cells without stretching the color scale.
    """
    finite = np.isfinite(norms)
    positive = norms[finite & (norms > 0)]
    floor = float(positive.min()) if positive.size else DEFAULT_FLOOR
    if vanishing_threshold is not None:
        floor = min(floor, vanishing_threshold)
    floor /= 10.0  # zero norms: one decade below everything else
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log10(np.clip(norms, floor, None))
    logs[~finite] = np.nan
    return logs, floor


def _color_limits(logs: FloatArray) -> tuple[float, float]:
    """Color scale from the finite log values, at least :data:`MIN_DECADES` wide."""
    finite = logs[np.isfinite(logs)]
    if not finite.size:
        return -MIN_DECADES / 2, MIN_DECADES / 2
    low, high = float(finite.min()), float(finite.max())
    if high - low < MIN_DECADES:
        middle = (low + high) / 2
        low, high = middle - MIN_DECADES / 2, middle + MIN_DECADES / 2
    return low, high


def vanishing_mask(
    norms: npt.ArrayLike, vanishing_threshold: float | None = 1e-7
) -> npt.NDArray[np.bool_]:
    """Cells the heatmap marks as vanishing: finite and below the threshold, or zero.

    Args:
        norms: gradient norms, any shape.
        vanishing_threshold: norms below it vanish; ``None`` marks only zero norms.

    Returns:
        A boolean array of the shape of ``norms``.

    Example:
        >>> vanishing_mask([1.0, 1e-9, 0.0, float("nan")]).tolist()
        [False, True, True, False]
    """
    array = np.asarray(norms, dtype=np.float64)
    finite = np.isfinite(array)
    with np.errstate(invalid="ignore"):
        low = array <= 0 if vanishing_threshold is None else array < vanishing_threshold
        return finite & (low | (array <= 0))


def _runs(row: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a boolean row."""
    padded = np.concatenate(([False], row, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]


def _vanishing_patches(mask: npt.NDArray[np.bool_], color: str) -> PatchCollection:
    """One hatched rectangle per run of marked cells along a layer's row.

    The grid is ``[n_layers, n_steps]`` in cell coordinates (cell centers at
    integers), so the total width of the rectangles is the number of cells.
    """
    rects = [
        Rectangle((start - 0.5, layer - 0.5), length, 1.0)
        for layer, row in enumerate(mask)
        for start, length in _runs(row)
    ]
    patches = PatchCollection(
        rects, facecolor="none", edgecolor=color, linewidth=0.0, hatch=VANISHING_HATCH, zorder=3
    )
    patches.set_gid("vanishing")
    return patches


def _dark_cells(rgba: FloatArray) -> npt.NDArray[np.bool_]:
    """Cells whose color is dark (a light hatch shows on them), from RGBA colors."""
    luminance = rgba[..., 0] * 0.299 + rgba[..., 1] * 0.587 + rgba[..., 2] * 0.114
    return np.asarray(luminance < 0.5)


def _label_layers(ax: Axes, layers: Sequence[str]) -> None:
    """Layer names on the y axis: every k-th when there are many, smaller font."""
    n_layers = len(layers)
    every = max(1, math.ceil(n_layers / MAX_LAYER_LABELS))
    ticks = list(range(0, n_layers, every))
    labels = shorten_names([layers[i] for i in ticks])
    shown = len(ticks)
    size = 9.0 if shown <= 16 else 8.0 if shown <= 28 else 7.0
    ax.set_yticks(ticks, labels, fontsize=size)
    if every > 1:
        ax.set_ylabel(f"layer (input → output; 1 in {every} of {n_layers} named)")
    else:
        ax.set_ylabel("layer (input → output)")


def _step_axis(ax: Axes, steps: Sequence[int]) -> None:
    """x ticks at cell indices, labelled with the step they stand for."""
    values = list(steps)

    def label(x: float, _pos: int | None) -> str:
        index = round(x)
        if abs(x - index) > 1e-6 or not 0 <= index < len(values):
            return ""
        return str(values[index])

    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.set_xlabel("step")


def gradient_flow_heatmap(
    steps: Sequence[int],
    layers: Sequence[str],
    norms: npt.ArrayLike,
    vanishing_threshold: float | None = 1e-7,
    title: str = "Gradient flow: log10 gradient norm per layer",
    figsize: tuple[float, float] | None = None,
    log_range: tuple[float, float] | None = None,
) -> Figure:
    """Heatmap of log10 gradient norm, layers (input at top) × logged steps.

    Cells with a NaN or inf norm are drawn in a color outside the colormap
    (:data:`NONFINITE_COLOR`); cells below ``vanishing_threshold``, and zero
    norms (clipped to a floor so the log is defined), are hatched. Each logged
    step is one column of equal width, labelled with its step number.

    Args:
        steps: the logged steps, one per row of ``norms``.
        layers: layer names (``grad_norm/<layer>``) in model order, input first.
        norms: gradient norms, shape ``[n_steps, n_layers]`` (a numpy array, a
            nested list, a CPU tensor). NaN and inf are non-finite gradients;
            a value that was not logged (a layer outside ``max_layers_logged``)
            goes in as a masked entry of a ``numpy.ma`` array and is drawn grey.
        vanishing_threshold: norms below it are marked vanishing; ``None`` marks
            only zero norms.
        title: the figure title.
        figsize: width and height in inches; sized to the number of layers if
            ``None``.
        log_range: the color scale's (low, high) in log10 units, e.g. ``(-10, 1)``
            to compare several runs; from the data if ``None`` (spanning at least
            :data:`MIN_DECADES`, so healthy noise does not look dramatic).

    Returns:
        The figure: ``fig.axes[0]`` is the heatmap, ``fig.axes[1]`` the colorbar,
        ``fig.legends[0]`` the key to the hatched and non-finite cells.

    Raises:
        ValueError: if the shape of ``norms`` does not match ``steps`` and ``layers``.

    Example:
        >>> fig = gradient_flow_heatmap(
        ...     [0, 1], ["fc1", "fc2"], [[1e-2, 1e-9], [1e-2, 0.0]], vanishing_threshold=1e-7
        ... )
        >>> [t.get_text() for t in fig.legends[0].get_texts()]
        ['vanishing (< 1e-07)']
    """
    _check_axes(steps, layers)
    grid, missing = _grid(norms, len(steps), len(layers), "norms")
    grid, missing = grid.T, missing.T  # [n_layers, n_steps]
    logs, floor = _log_norms(np.where(missing, np.nan, grid), vanishing_threshold)
    mask = vanishing_mask(grid, vanishing_threshold) & ~missing
    nonfinite = int((~np.isfinite(grid) & ~missing).sum())

    n_layers, n_steps = grid.shape
    if figsize is None:
        figsize = (10.0, float(np.clip(1.6 + 0.24 * n_layers, 3.6, 10.0)))
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad=NONFINITE_COLOR)
    vmin, vmax = _color_limits(logs) if log_range is None else log_range
    mesh = ax.pcolormesh(
        np.arange(n_steps + 1) - 0.5,
        np.arange(n_layers + 1) - 0.5,
        np.ma.masked_invalid(logs),
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        shading="flat",
    )
    if missing.any():
        ax.pcolormesh(
            np.arange(n_steps + 1) - 0.5,
            np.arange(n_layers + 1) - 0.5,
            np.ma.masked_array(np.zeros(missing.shape), mask=~missing),
            cmap=ListedColormap([MISSING_COLOR]),
            shading="flat",
            gid="missing",
        )
    dark = _dark_cells(np.asarray(mesh.to_rgba(np.nan_to_num(logs, nan=vmin)), dtype=np.float64))
    ax.add_collection(_vanishing_patches(mask & dark, VANISHING_COLOR))
    ax.add_collection(_vanishing_patches(mask & ~dark, "black"))
    ax.set_xlim(-0.5, n_steps - 0.5)
    ax.set_ylim(n_layers - 0.5, -0.5)  # input layer at the top
    _step_axis(ax, steps)
    _label_layers(ax, layers)
    ax.set_title(title)

    cbar = fig.colorbar(mesh, ax=ax, pad=0.01, aspect=4.0 * figsize[1])
    cbar.set_label("log10 ‖grad‖")
    if vanishing_threshold is not None and vmin <= math.log10(vanishing_threshold) <= vmax:
        cbar.ax.axhline(math.log10(vanishing_threshold), color="white", linewidth=1.5)
        cbar.ax.axhline(math.log10(vanishing_threshold), color="black", linestyle="--")

    handles: list[Patch] = []
    if vanishing_threshold is not None or mask.any():
        text = "zero" if vanishing_threshold is None else f"< {_fmt(vanishing_threshold)}"
        handles.append(
            Patch(
                facecolor=cmap(0.0),
                edgecolor=VANISHING_COLOR,
                hatch=VANISHING_HATCH,
                label=f"vanishing ({text})",
            )
        )
    if nonfinite:
        handles.append(Patch(facecolor=NONFINITE_COLOR, label="non-finite (NaN / inf)"))
    if missing.any():
        handles.append(Patch(facecolor=MISSING_COLOR, label="not logged"))
    if (grid[np.isfinite(grid) & ~missing] <= 0).any():
        ax.text(
            1.0,
            1.0,
            f"zero norms drawn at $10^{{{math.log10(floor):.1f}}}$",
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="0.35",
        )
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower left",
            ncol=len(handles),
            frameon=False,
            fontsize=8,
            handleheight=1.4,
        )
    return fig


# --------------------------------------------------------------------------- dead units


def _highlighted(fractions: FloatArray, threshold: float | None) -> list[int]:
    """Layers drawn in color: all when there are few (≤ 10); else those reaching the
    threshold, or at least the :data:`MIN_HIGHLIGHT` deadest, at most
    :data:`MAX_LEGEND_LAYERS`, in model order."""
    n_layers = fractions.shape[1]
    if n_layers <= 10:
        return list(range(n_layers))
    peak = np.where(np.isfinite(fractions), fractions, -1.0).max(axis=0)
    order = np.argsort(-peak, kind="stable")
    reached = 0 if threshold is None else int((peak >= threshold).sum())
    count = min(max(reached, MIN_HIGHLIGHT), MAX_LEGEND_LAYERS)
    return sorted(int(i) for i in order[:count])


def _event_points(
    steps: FloatArray,
    layers: Sequence[str],
    fractions: FloatArray,
    events: Sequence[tuple[int, str]],
) -> tuple[list[float], list[float]]:
    """x and y of each event's marker: on its layer's line, or at 100% if unknown."""
    index = {name: i for i, name in enumerate(layers)}
    xs: list[float] = []
    ys: list[float] = []
    for step, layer in events:
        column = index.get(layer)
        values = fractions[:, column] if column is not None else np.full_like(steps, np.nan)
        ok = np.isfinite(values)
        xs.append(float(step))
        ys.append(float(np.interp(step, steps[ok], values[ok])) if ok.any() else 1.0)
    return xs, ys


def dead_units_chart(
    steps: Sequence[int],
    layers: Sequence[str],
    fractions: npt.ArrayLike,
    threshold: float | None = 0.5,
    events: Sequence[tuple[int, str]] = (),
    title: str = "Dead units per activation layer",
    figsize: tuple[float, float] = (10.0, 5.0),
) -> Figure:
    """Fraction of dead units of each activation layer over the steps.

    One line per layer (``dead_units/<layer>``), a dashed line at the rescue
    threshold, and a marker on the layer's line at each swap / recycle event.
    With more than 10 layers, only the layers that reach the threshold (at least
    the :data:`MIN_HIGHLIGHT` deadest, at most :data:`MAX_LEGEND_LAYERS`) are
    drawn in color and named; the others are thin grey lines under one legend
    entry.

    Args:
        steps: the steps of the measuring windows, one per row of ``fractions``.
        layers: activation layer names in model order.
        fractions: dead fractions in [0, 1], shape ``[n_steps, n_layers]``; NaN or
            masked entries leave a gap in the line.
        threshold: the rescue threshold drawn as a dashed line; ``None`` for none.
        events: ``(step, layer)`` of each swap / recycle event; a layer not in
            ``layers`` is marked at the top of the chart.
        title: the figure title.
        figsize: width and height in inches.

    Returns:
        The figure, with one axes.

    Raises:
        ValueError: if the shape of ``fractions`` does not match ``steps`` and ``layers``.

    Example:
        >>> fig = dead_units_chart(
        ...     [0, 100, 200], ["net.0.act", "net.2.act"],
        ...     [[0.1, 0.0], [0.6, 0.05], [0.98, 0.1]], events=[(200, "net.0.act")],
        ... )
        >>> len(fig.axes[0].get_lines())  # two layers, the threshold, the events
        4
    """
    _check_axes(steps, layers)
    grid, missing = _grid(fractions, len(steps), len(layers), "fractions")
    grid = np.where(missing, np.nan, grid)
    x = np.asarray(steps, dtype=np.float64)
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    shown = _highlighted(grid, threshold)
    colors = dict(zip(shown, _layer_colors(len(shown))))
    labels = shorten_names(layers)
    marker = "o" if len(steps) <= 30 else None
    for i, label in enumerate(labels):
        if i in colors:
            ax.plot(
                x,
                grid[:, i],
                color=colors[i],
                linewidth=1.8,
                marker=marker,
                markersize=3,
                label=label,
                zorder=3,
            )
        else:
            ax.plot(x, grid[:, i], color="0.72", linewidth=0.9, label="_" + label, zorder=2)
    others = len(layers) - len(shown)
    if others:
        ax.plot(
            [],
            [],
            color="0.72",
            linewidth=0.9,
            label=f"{others} other layer{'s' if others > 1 else ''}",
        )
    if threshold is not None:
        ax.axhline(
            threshold,
            color="0.2",
            linestyle="--",
            linewidth=1.2,
            label=f"rescue threshold ({threshold:.0%})",
            zorder=1,
        )
    if events:
        event_x, event_y = _event_points(x, layers, grid, events)
        ax.plot(
            event_x,
            event_y,
            linestyle="none",
            marker="*",
            markersize=14,
            markerfacecolor="gold",
            markeredgecolor="black",
            label="swap / recycle event",
            zorder=4,
        )
    ax.set_ylim(-0.03, 1.03)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("step")
    ax.set_ylabel("dead units (% of the layer)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, borderaxespad=0.0
    )
    return fig


# --------------------------------------------------------------------------- clipping


def clip_chart(
    steps: Sequence[int],
    raw_norm: npt.ArrayLike,
    threshold: float | npt.ArrayLike,
    clipped_norm: npt.ArrayLike | None = None,
    skipped_steps: Sequence[int] = (),
    title: str = "Gradient clipping",
    rollback_steps: Sequence[int] = (),
    figsize: tuple[float, float] = (10.0, 4.5),
) -> Figure:
    """Raw global gradient norm against the clipping threshold, on a log scale.

    Steps where the raw norm exceeds the threshold get a red dot; non-finite raw
    norms (NaN / inf) are marked at the top edge; skipped steps get a vertical
    dotted line, rollbacks (``SpikeRecovery``) a purple dashed one.

    Args:
        steps: the logged steps.
        raw_norm: ``grad_norm/total`` at each step. NaN / inf are marked as
            non-finite gradients; masked entries (not logged) leave a gap.
        threshold: ``clip/threshold``: one number, or one per step (NaN while an
            adaptive policy warms up).
        clipped_norm: ``grad_norm/total_clipped`` at each step, if known (NaN or
            masked where unknown).
        skipped_steps: steps whose optimizer step was skipped.
        title: the figure title.
        rollback_steps: steps where ``SpikeRecovery`` rolled back.
        figsize: width and height in inches.

    Returns:
        The figure, with one axes.

    Raises:
        ValueError: if a series does not have one value per step.

    Example:
        >>> fig = clip_chart([0, 1, 2, 3], [1.0, 8.0, float("nan"), 1.2], 2.0,
        ...                  clipped_norm=[1.0, 2.0, 0.0, 1.2], skipped_steps=[2])
        >>> fig.axes[0].get_yscale()
        'log'
    """
    _check_axes(steps)
    n_steps = len(steps)
    x = np.asarray(steps, dtype=np.float64)
    raw, raw_missing = _floats(raw_norm)
    if raw.shape != (n_steps,):
        raise ValueError(f"`raw_norm` must have one value per step ({n_steps}), got {raw.shape}")
    fixed = np.asarray(threshold, dtype=np.float64)
    limit = (
        np.full(n_steps, float(fixed))
        if fixed.ndim == 0
        else _series(threshold, n_steps, "threshold")
    )
    clipped = None if clipped_norm is None else _series(clipped_norm, n_steps, "clipped_norm")
    bad = ~np.isfinite(raw) & ~raw_missing
    raw = np.where(raw_missing, np.nan, raw)

    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    ax.set_yscale("log")
    ax.plot(
        x,
        np.where(bad, np.nan, raw),
        color="tab:blue",
        linewidth=1.4,
        label="raw norm (grad_norm/total)",
        zorder=3,
    )
    if fixed.ndim == 0:
        ax.axhline(
            float(limit[0]),
            color="tab:orange",
            linestyle="--",
            linewidth=1.5,
            label=f"clip threshold ({_fmt(float(limit[0]))})",
            zorder=2,
        )
    else:
        ax.plot(
            x,
            limit,
            color="tab:orange",
            linestyle="--",
            linewidth=1.5,
            label="clip threshold",
            zorder=2,
        )
    with np.errstate(invalid="ignore"):
        over = np.isfinite(raw) & np.isfinite(limit) & (raw > limit)
    if over.any():
        ax.plot(
            x[over],
            raw[over],
            linestyle="none",
            marker="o",
            markersize=3.5,
            color="tab:red",
            label=f"clipped step (raw > threshold): {int(over.sum())}",
            zorder=5,
        )
    if clipped is not None:
        ax.plot(
            x,
            np.where(np.isfinite(clipped) & (clipped > 0), clipped, np.nan),
            color="tab:green",
            linewidth=1.2,
            alpha=0.9,
            label="clipped norm (grad_norm/total_clipped)",
            zorder=4,
        )
    if len(skipped_steps):
        ax.vlines(
            list(skipped_steps),
            0.0,
            1.0,
            transform=ax.get_xaxis_transform(),
            colors="0.3",
            linestyles=":",
            linewidth=1.4,
            label=f"skipped step: {len(skipped_steps)}",
            zorder=1,
        )
    if len(rollback_steps):
        ax.vlines(
            list(rollback_steps),
            0.0,
            1.0,
            transform=ax.get_xaxis_transform(),
            colors="tab:purple",
            linestyles="--",
            linewidth=1.6,
            label=f"rollback (SpikeRecovery): {len(rollback_steps)}",
            zorder=1,
        )
    if bad.any():
        ax.plot(
            x[bad],
            np.full(int(bad.sum()), 0.97),
            transform=ax.get_xaxis_transform(),
            linestyle="none",
            marker="^",
            markersize=9,
            color=NONFINITE_COLOR,
            clip_on=False,
            label="non-finite raw norm (NaN / inf)",
            zorder=5,
        )
    _pad_top(ax, bool(bad.any()))
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (log)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, borderaxespad=0.0
    )
    return fig


def _pad_top(ax: Axes, markers: bool) -> None:
    """Room above the data for the non-finite markers (a log axis pads too little)."""
    if not markers:
        return
    low, high = ax.get_ylim()
    if low > 0 and high > low:
        ax.set_ylim(low, high * (high / low) ** 0.12)


# --------------------------------------------------------------------------- output


def save_png(fig: Figure, path: str | PathLike[str], dpi: int = DEFAULT_DPI) -> Path:
    """Write ``fig`` as a PNG (parent folders created) and release it.

    Args:
        fig: a figure from this module (or any matplotlib figure).
        path: where to write; the content is PNG whatever the suffix.
        dpi: resolution; 150 gives sharp text at a moderate size.

    Returns:
        The path written, as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile
        >>> fig = clip_chart([0, 1], [1.0, 3.0], 2.0)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = save_png(fig, Path(tmp) / "clip.png")
        ...     out.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
        True
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    _close(fig)
    return out


def _close(fig: Figure) -> None:
    """Forget ``fig`` in pyplot's registry if it is there (without importing pyplot)."""
    from matplotlib._pylab_helpers import Gcf

    Gcf.destroy_fig(fig)
