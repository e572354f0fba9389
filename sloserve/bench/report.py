"""Benchmark reports: JSON results, Markdown tables, and PNG plots.

Plots need matplotlib (imported only when plotting, so JSON and tables work without it). They
draw on matplotlib's Agg canvas through `Figure`, not pyplot, so no global backend or figure
state is touched: safe in servers, threads and tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sloserve.bench.analysis import THRESHOLD, RunStats, latency_samples, trim
from sloserve.bench.capacity import CapacityResult
from sloserve.bench.types import RequestRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MISSING = "-"


def write_results(out: Path, payload: Mapping[str, Any]) -> None:
    """Writes results as JSON: sorted keys and indent 2, so reruns diff cleanly.

    NaN and infinity are refused: they are not JSON, and other tools would choke on them.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False)
    out.write_text(text + "\n")


# -- tables --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttainmentRow:
    """Per-class attainment of one system at one arrival rate."""

    system: str
    rate: float  # req/s
    attainment: Mapping[str, float]
    drained: bool = True
    passed: bool | None = None  # at the search's threshold, when known


def rows_from_capacity(system: str, result: CapacityResult) -> list[AttainmentRow]:
    """One row per trial of a capacity search."""
    return [
        AttainmentRow(system, t.rate, t.stats.attainment, t.stats.drain.drained, t.passed)
        for t in result.trials
    ]


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def _percent(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1%}"


def _yes_no(value: bool | None) -> str:
    return MISSING if value is None else ("yes" if value else "no")


def markdown_table(rows: Sequence[AttainmentRow]) -> str:
    """Per-class attainment at each rate, per system: systems in first-seen order, rates up.

    One column per class seen in any row; a class missing at a rate shows as a dash.
    """
    classes = sorted({name for row in rows for name in row.attainment})
    systems = list(dict.fromkeys(row.system for row in rows))
    ordered = sorted(rows, key=lambda r: (systems.index(r.system), r.rate))
    header = ["system", "rate (req/s)", *classes, "drained", "passed"]
    body = [
        [
            row.system,
            f"{row.rate:.3g}",
            *(_percent(row.attainment.get(name)) for name in classes),
            _yes_no(row.drained),
            _yes_no(row.passed),
        ]
        for row in ordered
    ]
    return _table(header, body)


def outcome_table(stats: RunStats) -> str:
    """Where every request of one run went, per class: the overload view (attainment of
    what was admitted, and what was turned away, demoted, failed or left unfinished)."""
    header = [
        "class", "arrived", "attainment", "admitted", "admitted attainment", "late",
        "rejected (reason)", "best effort", "errors", "incomplete",
    ]  # fmt: skip
    body = []
    for name, c in sorted(stats.classes.items()):
        reasons = ", ".join(f"{k} {v}" for k, v in c.rejected_by_reason.items())
        rejected = f"{c.rejected} ({reasons})" if reasons else str(c.rejected)
        cells = [name, str(c.arrived), _percent(c.attainment), str(c.admitted)]
        cells += [_percent(c.admitted_attainment), str(c.late), rejected]
        cells += [str(c.best_effort), str(c.errors), str(c.incomplete)]
        body.append(cells)
    return _table(header, body)


@dataclass(frozen=True)
class CapacityRow:
    system: str
    capacity: float  # req/s at 90% attainment
    capacity_99: float | None = None
    lower_bound: bool = False  # no rate failed: the true capacity may be higher
    # Every rate tried failed, down to the search's floor: the capacity is below this rate
    # (reported as 0), and a ratio against it is at least ours / this rate.
    below: float | None = None

    @classmethod
    def from_result(cls, system: str, result: CapacityResult) -> CapacityRow:
        below = result.lowest_failing if result.status == "below_min_rate" else None
        return cls(
            system, result.capacity, result.capacity_99, result.status == "no_failure", below
        )


def _ratio(numerator: float, denominator: CapacityRow) -> str:
    if denominator.capacity > 0:
        return f"{numerator / denominator.capacity:.2f}x"
    if denominator.below is not None and numerator > 0:
        return f"> {numerator / denominator.below:.2f}x"
    return MISSING


def _bound_mark(row: CapacityRow) -> tuple[str, float]:
    """The mark and rate that `row`'s capacity stands for: "<" a rate that failed first."""
    if row.capacity <= 0 and row.below is not None:
        return "< ", row.below
    return (">= " if row.lower_bound else ""), row.capacity


def _capacity(row: CapacityRow) -> str:
    mark, rate = _bound_mark(row)
    return f"{mark}{rate:.3g}"


def _fraction_of_bound(row: CapacityRow, fluid_bound: float | None) -> str:
    # A system below every rate it tried reads "< x%", not 0.0%: it may serve some load.
    if not fluid_bound:
        return MISSING
    mark, rate = _bound_mark(row)
    return mark + _percent(rate / fluid_bound)


def capacity_table(
    rows: Sequence[CapacityRow],
    fluid_bound: float | None = None,
    baselines: Sequence[str] = (),
    best_of: Sequence[str] = (),
) -> str:
    """Capacity per system, as a fraction of the fluid bound (§6) and as ratios to baselines.

    A capacity that is only a lower bound is marked ">=", one below every rate tried "<" (its
    fraction of the fluid bound too).
    Ratio columns: one per named baseline, capacity(system) / capacity(baseline), measured in
    the same run (§7); "> r" where the baseline failed every rate it tried. With `best_of`
    (tuned variants of a baseline), one more: the ratio to whichever of them has the highest
    capacity, named in the header (§5: the best variant per scenario).
    """
    by_name = {row.system: row for row in rows}
    unknown = [name for name in (*baselines, *best_of) if name not in by_name]
    if unknown:
        raise ValueError(f"baselines {unknown} are not among the systems {list(by_name)}")
    columns = [by_name[name] for name in baselines]
    header = ["system", "capacity (req/s)", "capacity @99% (req/s)", "of fluid bound"]
    header += [f"vs {name}" for name in baselines]
    if best_of:
        best = max((by_name[name] for name in best_of), key=lambda row: row.capacity)
        columns.append(best)
        header.append(f"vs best tuned ({best.system})")
    body = [
        [
            row.system,
            _capacity(row),
            MISSING if row.capacity_99 is None else f"{row.capacity_99:.3g}",
            _fraction_of_bound(row, fluid_bound),
            *(_ratio(row.capacity, column) for column in columns),
        ]
        for row in rows
    ]
    return _table(header, body)


# -- plots ---------------------------------------------------------------------------------

_LINE_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _new_figure(columns: int) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5 * columns, 4.5), layout="constrained")
    axes = [figure.add_subplot(1, columns, i + 1) for i in range(columns)]
    return figure, axes


def _save(figure: Figure, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=120)


def _class_colors(classes: Sequence[str]) -> dict[str, Any]:
    """A color per class, the same in every plot (classes are sorted first)."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(sorted(classes))}


def plot_attainment(
    out: Path,
    series: Mapping[str, Sequence[tuple[float, Mapping[str, float]]]],
    threshold: float = THRESHOLD,
) -> None:
    """Attainment against arrival rate: one line per system x class, threshold drawn.

    `series` maps a system to its (rate, {class: attainment}) points, in any order. Color
    tells the class, line style and marker the system.
    """
    figure, (axes,) = _new_figure(1)
    colors = _class_colors(sorted({c for points in series.values() for _, a in points for c in a}))
    for i, (system, points) in enumerate(series.items()):
        ordered = sorted(points, key=lambda p: p[0])
        for name, color in colors.items():
            xy = [(rate, a[name]) for rate, a in ordered if name in a]
            if not xy:
                continue
            rates, values = zip(*xy, strict=True)
            axes.plot(
                rates,
                values,
                color=color,
                linestyle=_LINE_STYLES[i % len(_LINE_STYLES)],
                marker=_MARKERS[i % len(_MARKERS)],
                label=f"{system} / {name}",
            )
    axes.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"{threshold:.0%}")
    axes.set_xlabel("arrival rate (req/s)")
    axes.set_ylabel("SLO attainment")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    _save(figure, out)


def _cdf(axes: Axes, values: Sequence[float], **style: Any) -> None:
    # Starts at (min, 0), so a single value still draws a visible step.
    xs = np.sort(np.asarray(values))
    xs = np.concatenate([xs[:1], xs])
    ys = np.arange(len(xs)) / (len(xs) - 1)
    axes.step(xs, ys, where="post", **style)


def plot_latency_distributions(
    out: Path,
    records_by_system: Mapping[str, Sequence[RequestRecord]],
    trim_fraction: float = 0.1,
) -> None:
    """CDFs of TTFT and of per-request mean TPOT, per system x class, side by side.

    Uses the same samples as the statistics (requests served in their class, trimmed the same
    way), so the curves match the reported percentiles.
    """
    figure, (ttft_axes, tpot_axes) = _new_figure(2)
    samples = {s: latency_samples(trim(r, trim_fraction)) for s, r in records_by_system.items()}
    colors = _class_colors(sorted({c for per_class in samples.values() for c in per_class}))
    for i, (system, per_class) in enumerate(samples.items()):
        linestyle = _LINE_STYLES[i % len(_LINE_STYLES)]
        for name, lat in sorted(per_class.items()):
            style = {"color": colors[name], "linestyle": linestyle, "label": f"{system} / {name}"}
            if lat.ttft_s:
                _cdf(ttft_axes, lat.ttft_s, **style)
            if lat.tpot_s:
                _cdf(tpot_axes, lat.tpot_s, **style)
    for axes, what in ((ttft_axes, "TTFT (s)"), (tpot_axes, "mean TPOT per request (s)")):
        axes.set_xlabel(what)
        axes.set_ylabel("fraction of requests")
        axes.set_ylim(0, 1.02)
        axes.grid(alpha=0.3)
        if axes.has_data():
            axes.legend(fontsize="small")
    _save(figure, out)
