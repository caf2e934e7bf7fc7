"""Frontiers, SLA tables and the two figures of a simulator sweep.

Frontier. A policy's points over concurrency C trace (per-user speed u_C, throughput T_C);
between neighbouring concurrencies the curve is linear in u (a concurrency in between gives
a point in between). The throughput a policy sustains at a per-user SLA s is

    T(s) = max( {T_C : u_C ≥ s} ∪ {interpolated T on every segment [u_{C'}, u_C] ∋ s} ),

the best configuration meeting the SLA (undefined when s exceeds every u_C: no concurrency is
fast enough). "saturated" marks s below every u_C: each simulated concurrency meets it, so
T(s) is the best of them and a larger C than was simulated might give more. The per-user
speed at matched throughput, u(T), is the same construction with the axes swapped.
"""

from __future__ import annotations

import json
import os
import pathlib

__all__ = ["curves", "throughput_at", "per_user_at", "sla_table", "format_sla_table", "plot_frontier",
           "plot_concurrency", "write_points"]

# Distinct colours per policy (matplotlib's tab10 order); unknown names cycle through the rest.
_COLOURS = {"mtp1": "tab:gray", "fixed3": "tab:olive", "fixed5": "tab:brown", "fixed7": "tab:pink",
            "causal": "tab:blue", "async": "tab:red"}
_SPARE = ("tab:green", "tab:purple", "tab:cyan", "tab:orange")


def curves(points: list) -> dict:
    """{(profile, workload): {policy: [points sorted by concurrency]}}."""
    out: dict = {}
    for p in points:
        out.setdefault((p["profile"], p["workload"]), {}).setdefault(p["policy"], []).append(p)
    for by_policy in out.values():
        for pts in by_policy.values():
            pts.sort(key=lambda p: p["concurrency"])
    return out


def _envelope(pts: list, x_key: str, y_key: str, x: float):
    """max y over points with x_i ≥ x and over segments (neighbours in C) that contain x; None if none."""
    best = None
    for p in pts:
        if p[x_key] is not None and p[x_key] >= x:
            best = p[y_key] if best is None else max(best, p[y_key])
    for a, b in zip(pts, pts[1:]):
        xa, xb = a[x_key], b[x_key]
        lo, hi = min(xa, xb), max(xa, xb)
        if lo <= x <= hi and hi > lo:
            y = a[y_key] + (b[y_key] - a[y_key]) * (x - xa) / (xb - xa)
            best = y if best is None else max(best, y)
    return best


def throughput_at(pts: list, sla: float):
    """T(s) of one policy's points (see the module docstring); None if no point reaches s."""
    return _envelope(pts, "per_user_tok_s", "throughput_tok_s_gpu", sla)


def per_user_at(pts: list, throughput: float):
    """u(T): best per-user speed at a throughput of at least T; None if T is never reached."""
    return _envelope(pts, "throughput_tok_s_gpu", "per_user_tok_s", throughput)


def sla_table(points: list, slas: list, baseline: str = "mtp1") -> list:
    """Rows {profile, workload, sla, baseline, values: {policy: (T, gain % or None, saturated)}}."""
    rows = []
    for (profile, workload), by_policy in curves(points).items():
        base_pts = by_policy.get(baseline)
        for s in slas:
            base = throughput_at(base_pts, s) if base_pts else None
            values = {}
            for name, pts in by_policy.items():
                t = throughput_at(pts, s)
                gain = None if t is None or not base else 100.0 * (t / base - 1.0)
                saturated = t is not None and s < min(p["per_user_tok_s"] for p in pts)
                values[name] = (t, gain, saturated)
            rows.append({"profile": profile, "workload": workload, "sla": s, "baseline": baseline,
                         "values": values})
    return rows


def format_sla_table(rows: list, policies: list) -> str:
    """The printed table: throughput (tok/s/GPU) per policy at each SLA, gain over the baseline."""
    head = ["profile", "workload", "SLA tok/s/user"] + policies
    body = []
    for row in rows:
        cells = [row["profile"], row["workload"], f"{row['sla']:g}"]
        for name in policies:
            t, gain, saturated = row["values"].get(name, (None, None, False))
            if t is None:
                cells.append("unreached")
                continue
            text = f"{t:,.0f}"
            if name != row["baseline"]:
                text += " (n/a)" if gain is None else f" ({gain:+.0f}%)"
            if saturated:
                text += "*"
            cells.append(text)
        body.append(cells)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    lines.append(f"Throughput in tok/s/GPU at each per-user speed SLA (frontier interpolated over concurrency); "
                 f"(±x%): gain over {rows[0]['baseline'] if rows else 'mtp1'}; 'unreached': no simulated "
                 f"concurrency is that fast; *: every simulated concurrency meets the SLA (the largest "
                 f"simulated C bounds the number).")
    return "\n".join(lines)


def write_points(points: list, path) -> pathlib.Path:
    """points.json: the list of points, keys sorted, so the same seed writes the same bytes."""
    target = pathlib.Path(os.fspath(path))
    target.write_text(json.dumps(points, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return target


def _colour(name: str, seen: dict) -> str:
    if name in _COLOURS:
        return _COLOURS[name]
    return seen.setdefault(name, _SPARE[len(seen) % len(_SPARE)])


def _grid(fig, rows: int, cols: int):
    axes = fig.subplots(rows, cols, squeeze=False)
    return axes


def plot_frontier(points: list, path, *, slas=(), policies=None, dpi: int = 72) -> pathlib.Path:
    """Throughput (tok/s/GPU) against per-user speed (tok/s), one panel per (profile, workload),
    one line per policy through its concurrencies (the paper's Fig. 7 layout); SLAs dashed."""
    figure, canvas = _matplotlib()
    groups = curves(points)
    profiles = list(dict.fromkeys(k[0] for k in groups))
    workloads = list(dict.fromkeys(k[1] for k in groups))
    fig = figure(figsize=(3.6 * len(workloads), 2.9 * len(profiles)), dpi=dpi)
    canvas(fig)
    axes = _grid(fig, len(profiles), len(workloads))
    spare: dict = {}
    for i, prof in enumerate(profiles):
        for j, wl in enumerate(workloads):
            ax = axes[i][j]
            for name, pts in groups.get((prof, wl), {}).items():
                if policies and name not in policies:
                    continue
                ax.plot([p["per_user_tok_s"] for p in pts], [p["throughput_tok_s_gpu"] for p in pts],
                        marker="o", markersize=2.5, linewidth=1.2, color=_colour(name, spare), label=name)
            for s in slas:
                ax.axvline(s, color="black", linestyle="--", linewidth=0.6, alpha=0.5)
            ax.set_xscale("log")
            _plain_ticks(ax.xaxis)
            ax.set_title(f"{prof} · {wl}", fontsize=8)
            ax.tick_params(labelsize=6)
            if i == len(profiles) - 1:
                ax.set_xlabel("per-user speed (tok/s)", fontsize=7)
            if j == 0:
                ax.set_ylabel("throughput (tok/s/GPU)", fontsize=7)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.suptitle("Throughput vs per-user speed (closed-loop simulation, schedule_verify reference backend)",
                 fontsize=9)
    fig.tight_layout()
    target = pathlib.Path(os.fspath(path))
    fig.savefig(os.fspath(target), format="png")
    return target


def plot_concurrency(points: list, path, *, policies=None, dpi: int = 72) -> pathlib.Path:
    """Two rows per profile: throughput and mean verify budget (drafts per request per round) against
    concurrency, one column per workload (the paper's Fig. 8 layout)."""
    figure, canvas = _matplotlib()
    groups = curves(points)
    profiles = list(dict.fromkeys(k[0] for k in groups))
    workloads = list(dict.fromkeys(k[1] for k in groups))
    fig = figure(figsize=(3.6 * len(workloads), 2.4 * 2 * len(profiles)), dpi=dpi)
    canvas(fig)
    axes = _grid(fig, 2 * len(profiles), len(workloads))
    spare: dict = {}
    for i, prof in enumerate(profiles):
        for j, wl in enumerate(workloads):
            top, bottom = axes[2 * i][j], axes[2 * i + 1][j]
            for name, pts in groups.get((prof, wl), {}).items():
                if policies and name not in policies:
                    continue
                cs = [p["concurrency"] for p in pts]
                colour = _colour(name, spare)
                top.plot(cs, [p["throughput_tok_s_gpu"] for p in pts], marker="o", markersize=2.5, linewidth=1.2,
                         color=colour, label=name)
                bottom.plot(cs, [p["verify_budget"] for p in pts], marker="o", markersize=2.5, linewidth=1.2,
                            color=colour, label=name)
            for ax in (top, bottom):
                ax.set_xscale("log", base=2)
                _plain_ticks(ax.xaxis)
                ax.tick_params(labelsize=6)
            top.set_title(f"{prof} · {wl}", fontsize=8)
            if j == 0:
                top.set_ylabel("throughput (tok/s/GPU)", fontsize=7)
                bottom.set_ylabel("verify budget (drafts/req)", fontsize=7)
            if i == len(profiles) - 1:
                bottom.set_xlabel("concurrency (requests)", fontsize=7)
    axes[0][0].legend(fontsize=6, loc="best")
    fig.suptitle("Throughput and verification budget vs concurrency", fontsize=9)
    fig.tight_layout()
    target = pathlib.Path(os.fspath(path))
    fig.savefig(os.fspath(target), format="png")
    return target


def _plain_ticks(axis) -> None:
    """Plain numbers on a log axis, no labelled minor ticks (they overlap at this figure size)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _matplotlib():
    """Figure and Agg canvas classes, without pyplot so no global backend state is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the simulator's figures need matplotlib: pip install matplotlib") from exc
    return Figure, FigureCanvasAgg


