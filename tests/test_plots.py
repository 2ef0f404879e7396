"""The pictures: what each figure holds, checked against numpy, and that it renders."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.collections import LineCollection, PatchCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.legend import Legend

from lightning_gradguard.plots import (
    MAX_LAYER_LABELS,
    NONFINITE_COLOR,
    clip_chart,
    dead_units_chart,
    gradient_flow_heatmap,
    save_png,
    shorten_names,
    vanishing_mask,
)

STEPS = list(range(0, 200, 10))
LAYERS = [f"model.encoder.layers.{i}.mlp.fc" for i in range(7)] + ["model.head"]


def render(fig: Figure) -> None:
    """Draw the figure for real (hatches, masked cells, log axes all rasterized)."""
    fig.savefig(io.BytesIO(), format="png", dpi=40)


def vanishing_profile(seed: int = 0) -> np.ndarray:
    """Norms falling 10x per layer from the head to the input, some zero, NaN and inf."""
    rng = np.random.default_rng(seed)
    depth = np.arange(len(LAYERS))[::-1]
    norms = 10.0 ** (-depth)[None, :] * np.exp(rng.normal(0, 0.5, (len(STEPS), len(LAYERS))))
    norms[:, 0] = 0.0
    norms[3, 2] = np.nan
    norms[-1, 5:] = np.inf
    return norms


def marked_cells(fig: Figure) -> int:
    """Cells covered by the heatmap's vanishing hatches (rectangles of height 1)."""
    total = 0.0
    for collection in fig.axes[0].collections:
        if isinstance(collection, PatchCollection) and collection.get_gid() == "vanishing":
            for path in collection.get_paths():
                xs, ys = path.vertices[:, 0], path.vertices[:, 1]
                assert ys.max() - ys.min() == pytest.approx(1.0)
                total += xs.max() - xs.min()
    return round(total)


def legend_texts(legend: Legend | None) -> list[str]:
    assert legend is not None
    return [text.get_text() for text in legend.get_texts()]


# ------------------------------------------------------------------------- heatmap


def test_heatmap_axes_labels_and_colorbar() -> None:
    fig = gradient_flow_heatmap(STEPS, LAYERS, vanishing_profile())
    ax, cbar = fig.axes
    assert cbar.get_ylabel() == "log10 ‖grad‖"
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == shorten_names(LAYERS)
    assert labels[0].endswith("layers.0.mlp.fc") and labels[-1] == "model.head"
    bottom, top = ax.get_ylim()
    assert top < bottom  # input layer (row 0) at the top
    assert ax.get_xlabel() == "step"
    assert ax.get_title()
    render(fig)
    ticks = [t for t in ax.get_xticks() if -0.5 <= t <= len(STEPS) - 0.5]
    shown = {ax.xaxis.get_major_formatter()(t, i) for i, t in enumerate(ticks)}
    assert shown <= {str(s) for s in STEPS}
    assert "0" in shown


def test_heatmap_vanishing_marks_match_numpy() -> None:
    norms = vanishing_profile()
    threshold = 1e-4
    fig = gradient_flow_heatmap(STEPS, LAYERS, norms, vanishing_threshold=threshold)
    finite = np.isfinite(norms)
    expected = int((finite & (np.where(finite, norms, 1.0) < threshold)).sum())
    assert expected > 0
    assert marked_cells(fig) == expected
    assert vanishing_mask(norms, threshold).sum() == expected
    assert legend_texts(fig.legends[0]) == ["vanishing (< 0.0001)", "non-finite (NaN / inf)"]
    render(fig)


def test_heatmap_zero_norms_are_floored_and_marked() -> None:
    norms = np.full((4, 3), 0.5)
    norms[:, 1] = 0.0
    fig = gradient_flow_heatmap([0, 1, 2, 3], ["a", "b", "c"], norms)
    values = fig.axes[0].collections[0].get_array()
    assert values is not None and np.isfinite(values).all()
    assert marked_cells(fig) == 4
    assert legend_texts(fig.legends[0]) == ["vanishing (< 1e-07)"]
    render(fig)


def test_heatmap_without_threshold_marks_only_zeros() -> None:
    norms = np.array([[1e-12, 0.0], [1.0, 0.0]])
    fig = gradient_flow_heatmap([0, 1], ["a", "b"], norms, vanishing_threshold=None)
    assert marked_cells(fig) == 2
    assert legend_texts(fig.legends[0]) == ["vanishing (zero)"]


def test_heatmap_nonfinite_cells_are_masked_in_their_own_color() -> None:
    norms = np.ones((5, 2))
    norms[4, :] = [np.nan, np.inf]
    norms[2, 0] = -np.inf
    fig = gradient_flow_heatmap(range(5), ["a", "b"], norms)
    mesh = fig.axes[0].collections[0]
    values = mesh.get_array()
    assert isinstance(values, np.ma.MaskedArray)
    assert int(np.ma.getmaskarray(values).sum()) == 3
    assert mesh.get_cmap().get_bad() == pytest.approx(to_rgba(NONFINITE_COLOR))
    assert "non-finite (NaN / inf)" in legend_texts(fig.legends[0])
    assert marked_cells(fig) == 0
    render(fig)


def test_heatmap_masked_cells_are_not_logged_not_nonfinite() -> None:
    norms = np.ma.masked_array(np.full((6, 4), 1e-9), mask=False)
    norms.mask[::2, 1:3] = True  # a layer outside max_layers_logged on those steps
    norms[5, 0] = np.nan
    fig = gradient_flow_heatmap(range(6), ["a", "b", "c", "d"], norms)
    ax = fig.axes[0]
    overlay = next(c for c in ax.collections if c.get_gid() == "missing")
    shown = overlay.get_array()
    assert shown is not None and int(np.ma.count(shown)) == 6
    assert marked_cells(fig) == 24 - 6 - 1
    assert legend_texts(fig.legends[0]) == [
        "vanishing (< 1e-07)",
        "non-finite (NaN / inf)",
        "not logged",
    ]
    render(fig)


def test_heatmap_all_nonfinite_does_not_raise() -> None:
    fig = gradient_flow_heatmap([0, 1], ["a"], [[np.nan], [np.inf]])
    render(fig)


def test_heatmap_many_layers_stay_readable() -> None:
    layers = [f"backbone.stages.{i // 10}.blocks.{i % 10}.conv" for i in range(200)]
    norms = np.geomspace(1e-6, 1.0, 200)[None, :].repeat(30, axis=0)
    fig = gradient_flow_heatmap(list(range(30)), layers, norms)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert 20 <= len(labels) <= MAX_LAYER_LABELS
    assert all(len(label) <= 30 for label in labels)
    assert max(t.get_fontsize() for t in ax.get_yticklabels()) <= 8
    assert "200" in ax.get_ylabel()
    render(fig)


def test_heatmap_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match=r"norms.*\(3, 2\)"):
        gradient_flow_heatmap([0, 1, 2], ["a", "b"], np.ones((2, 3)))
    with pytest.raises(ValueError, match="steps"):
        gradient_flow_heatmap([], ["a"], np.ones((0, 1)))


def test_shorten_names_from_the_left_and_distinct() -> None:
    assert shorten_names(["model.encoder.layers.3.attn"], max_chars=15) == ["…layers.3.attn"]
    assert shorten_names(["head", "(root)"]) == ["head", "(root)"]
    assert shorten_names(["x" * 40], max_chars=10) == ["…" + "x" * 9]
    names = ["m.encoder.layers.0.attn", "m.decoder.layers.0.attn", "m.encoder.layers.1.attn"]
    short = shorten_names(names, max_chars=14)
    assert len(set(short)) == 3
    assert short[2] == "…layers.1.attn"
    assert all(name.endswith(s.lstrip("…")) for name, s in zip(names, short))


# ------------------------------------------------------------------------- dead units


def dying_relu() -> tuple[list[int], list[str], np.ndarray]:
    steps = list(range(0, 2000, 100))
    fractions = np.zeros((len(steps), 3))
    fractions[:, 0] = 0.05
    fractions[:, 1] = np.where(np.arange(len(steps)) >= 8, 0.98, 0.1)
    fractions[:, 2] = np.linspace(0.0, 0.3, len(steps))
    return steps, ["net.0.act", "net.2.act", "net.4.act"], fractions


def test_dead_units_lines_threshold_and_events() -> None:
    steps, layers, fractions = dying_relu()
    fig = dead_units_chart(steps, layers, fractions, events=[(1000, "net.2.act")])
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3 + 1 + 1  # layers, threshold, events
    for line, column in zip(lines[:3], fractions.T):
        np.testing.assert_allclose(line.get_ydata(), column)
    threshold = next(line for line in lines if line.get_linestyle() == "--")
    assert list(threshold.get_ydata()) == [0.5, 0.5]
    event = lines[-1]
    assert list(event.get_xdata()) == [1000.0]
    assert list(event.get_ydata()) == pytest.approx([0.98])
    assert legend_texts(ax.get_legend()) == [
        *layers,
        "rescue threshold (50%)",
        "swap / recycle event",
    ]
    low, high = ax.get_ylim()
    assert low <= 0.0 and 1.0 <= high <= 1.05
    assert ax.yaxis.get_major_formatter()(1.0, 0) == "100%"
    render(fig)


def test_dead_units_no_threshold_no_events_and_unknown_layer() -> None:
    steps, layers, fractions = dying_relu()
    fig = dead_units_chart(steps, layers, fractions, threshold=None)
    assert len(fig.axes[0].get_lines()) == 3
    fig = dead_units_chart(steps, layers, fractions, events=[(500, "not.a.layer")])
    assert list(fig.axes[0].get_lines()[-1].get_ydata()) == [1.0]


def test_dead_units_many_layers_name_only_the_dead_ones() -> None:
    rng = np.random.default_rng(1)
    fractions = rng.uniform(0.0, 0.3, (15, 20))
    fractions[8:, 7] = 0.97
    fractions[3, 4] = np.nan
    layers = [f"blocks.{i}.act" for i in range(20)]
    fig = dead_units_chart(list(range(15)), layers, fractions)
    texts = legend_texts(fig.axes[0].get_legend())
    named = [t for t in texts if t.startswith("blocks.")]
    assert "blocks.7.act" in named and len(named) == 3
    assert "17 other layers" in texts
    render(fig)


# ------------------------------------------------------------------------- clipping


def spiky_run() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    steps = np.arange(100)
    rng = np.random.default_rng(2)
    raw = 1.0 + rng.uniform(0.0, 0.5, 100)
    raw[40:43] = [20.0, 300.0, 15.0]
    raw[70], raw[71] = np.inf, np.nan
    threshold = np.full(100, 2.0)
    threshold[:5] = np.nan  # adaptive policy warming up
    clipped = np.minimum(raw, 2.0)
    return steps, raw, threshold, clipped


def test_clip_chart_contents() -> None:
    steps, raw, threshold, clipped = spiky_run()
    fig = clip_chart(steps, raw, threshold, clipped_norm=clipped, skipped_steps=[41, 70, 71])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert legend_texts(ax.get_legend()) == [
        "raw norm (grad_norm/total)",
        "clip threshold",
        "clipped step (raw > threshold): 3",
        "clipped norm (grad_norm/total_clipped)",
        "skipped step: 3",
        "non-finite raw norm (NaN / inf)",
    ]
    skipped = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(skipped) == 1 and len(skipped[0].get_segments()) == 3
    by_label = {line.get_label(): line for line in ax.get_lines()}
    nonfinite = by_label["non-finite raw norm (NaN / inf)"]
    assert list(nonfinite.get_xdata()) == [70, 71]
    assert nonfinite.get_transform() == ax.get_xaxis_transform()  # y in axes units: top edge
    assert all(0.9 < y <= 1.0 for y in nonfinite.get_ydata())
    assert list(by_label["clipped step (raw > threshold): 3"].get_xdata()) == [40, 41, 42]
    assert ax.get_ylim()[1] > 300.0
    render(fig)


def test_clip_chart_fixed_threshold_and_all_nonfinite() -> None:
    fig = clip_chart([0, 1, 2], [0.5, 1.5, 0.7], 1.0)
    texts = legend_texts(fig.axes[0].get_legend())
    assert texts == [
        "raw norm (grad_norm/total)",
        "clip threshold (1)",
        "clipped step (raw > threshold): 1",
    ]
    render(fig)
    fig = clip_chart([0, 1], [np.nan, np.inf], 1.0, skipped_steps=[0, 1])
    render(fig)
    raw = np.ma.masked_array([1.0, np.nan, 5.0], mask=[False, True, False])  # step 1 not logged
    fig = clip_chart([0, 1, 2], raw, 2.0)
    assert "non-finite raw norm (NaN / inf)" not in legend_texts(fig.axes[0].get_legend())
    render(fig)
    with pytest.raises(ValueError, match="raw_norm"):
        clip_chart([0, 1], [1.0], 1.0)


# ------------------------------------------------------------------------- output


def test_save_png_writes_a_png_of_the_figure_size(tmp_path: Path) -> None:
    fig = clip_chart([0, 1, 2], [1.0, 3.0, 1.0], 2.0, figsize=(4.0, 3.0))
    out = save_png(fig, tmp_path / "sub" / "clip.png", dpi=50)
    assert out == tmp_path / "sub" / "clip.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(out)
    assert image.shape[:2] == (150, 200)


def test_plots_leave_pyplot_and_the_backend_alone(tmp_path: Path) -> None:
    code = (
        "import sys, matplotlib\n"
        "backend = matplotlib.rcParams._get_backend_or_none()\n"
        "from lightning_gradguard import plots\n"
        "fig = plots.gradient_flow_heatmap([0, 1], ['a', 'b'], [[1.0, 0.0], [1.0, 1e-9]])\n"
        f"plots.save_png(fig, {str(tmp_path / 'h.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert matplotlib.rcParams._get_backend_or_none() == backend\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert (tmp_path / "h.png").stat().st_size > 0
