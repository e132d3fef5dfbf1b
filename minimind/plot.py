"""Pictures: a run's metrics.jsonl as curves, and a data file's token lengths as a histogram (PNG files).

matplotlib is an optional extra (`pip install matplotlib`, or `pip install -e '.[plot]'`): training and data
tools work without it, and asking for a picture without it ends in one line saying how to install it. We draw on
a bare `matplotlib.figure.Figure` (no pyplot): no window, no global state, works on a headless server.

    plot_metrics(OUT_DIR/metrics.jsonl, PNG)      loss (+ val_loss), learning rate, tokens/s, grad norm, and
                                                  whatever else the run logged (DPO reward margin/accuracy, ...)
    plot_lengths({"sft.jsonl": lengths}, 512, PNG) per-record token length, with the --max_seq_len cut marked
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile

import numpy as np

from .errors import DataError, MiniMindError, UsageError

INSTALL_HINT = "pip install matplotlib"

# Panels in reading order: (title, y label, metric keys drawn together, log-scale y?, smooth?). Log scale None:
# only when the values span more than 3x. Smoothing only for noisy per-step values (not the lr schedule).
PANELS = [
    ("Loss", "loss (nats / token)", ("loss", "val_loss"), None, True),
    ("Learning rate", "lr", ("lr",), False, False),
    ("Throughput", "tokens / s", ("tokens_per_s",), False, True),
    ("Gradient norm (before clipping)", "grad norm", ("grad_norm",), None, True),
    ("DPO reward margin", "chosen - rejected", ("reward_margin",), False, True),
    ("DPO reward accuracy", "share chosen > rejected", ("reward_accuracy",), False, True),
    ("Distillation", "loss part", ("kl", "ce"), None, True),
]
NOT_PLOTTED = {"step", "time", "tokens"}   # x axis, wall clock, running token count


def require_matplotlib() -> None:
    """UsageError (one line, how to install) unless matplotlib can be imported."""
    _figure_class()


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(f"drawing a PNG needs matplotlib: {INSTALL_HINT}") from None
    return Figure


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl
# ---------------------------------------------------------------------------------------------------------------
def metrics_file(path: str) -> str:
    """A run's OUT_DIR or its metrics.jsonl -> the metrics.jsonl path (UsageError if there is none)."""
    file = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UsageError(f"{path}: no metrics.jsonl there; give a run's --out_dir or its metrics.jsonl")
    return file


def read_metrics(path: str) -> list[dict]:
    """The lines of metrics.jsonl, of the latest run in it.

    A resumed run appends to the same file, starting again a little before where the log stopped, and a fresh
    run in the same folder starts again at step 0. When the step goes backwards, the later lines win: the earlier
    ones from that step on are dropped. A half-written last line (a killed run) is ignored.
    """
    file = metrics_file(path)
    rows: list[dict] = []
    with open(file, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break   # cut off mid-write
            raise DataError(f"{file}:{n}: not a JSON line; metrics.jsonl holds one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
            raise DataError(f"{file}:{n}: expected an object with a numeric 'step'")
        last = next((r["step"] for r in reversed(rows) if _same_kind(r, row)), None)
        if last is not None and last >= row["step"]:   # restart/resume: drop everything from this step on
            rows = [r for r in rows if r["step"] < row["step"]]
        rows.append(row)
    return rows


def _same_kind(a: dict, b: dict) -> bool:
    """A training line and a val_loss line may share a step; two lines of the same kind may not."""
    return ("val_loss" in a) == ("val_loss" in b)


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts)
    return np.asarray(x, float), np.asarray(y, float)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average: follows the trend without the lag of an EMA. Near the ends the window shrinks
    symmetrically, so the first and last points are the raw values (not pulled towards their neighbours)."""
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    half = np.minimum(window // 2, np.minimum(i, len(y) - 1 - i))
    lo, hi = i - half, i + half + 1
    return (c[hi] - c[lo]) / (hi - lo)


def _wide(y: np.ndarray) -> bool:
    y = y[y > 0]
    return len(y) > 1 and y.max() / y.min() > 3


def plot_metrics(metrics_path: str, png_path: str | None = None, quiet: bool = False) -> str | None:
    """Draw a run's metrics.jsonl (or its OUT_DIR) as a grid of curves in one PNG; returns the PNG's path.

    png_path: default metrics.png beside metrics.jsonl. quiet=True (the end of a training run): never raises for
    a missing matplotlib or an unusable log; prints one note instead and returns None.
    """
    try:
        require_matplotlib()
        file = metrics_file(metrics_path)
        fig = metrics_figure(read_metrics(file), os.path.basename(os.path.dirname(os.path.abspath(file))), file)
        return _save(fig, png_path or os.path.join(os.path.dirname(os.path.abspath(file)), "metrics.png"))
    except (MiniMindError, OSError) as e:   # OSError: e.g. a read-only folder; the run itself is fine
        if not quiet:
            raise
        print(f"note: no loss-curve PNG: {e}", file=sys.stderr)
        return None


def metrics_figure(rows: list[dict], run: str, file: str = "metrics.jsonl"):
    """The matplotlib Figure for read_metrics() rows: one panel per metric group that has values."""
    Figure = _figure_class()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    known = {k for _, _, keys, _, _ in PANELS for k in keys}
    extra = sorted({k for r in rows for k, v in r.items()
                    if k not in known | NOT_PLOTTED and isinstance(v, (int, float)) and not isinstance(v, bool)})
    panels = [p for p in PANELS + [(k, k, (k,), None, True) for k in extra]
              if any(len(_series(rows, k)[0]) for k in p[2])]
    if not panels:
        raise UsageError(f"{file}: no metric lines yet (nothing to plot); it fills as the run logs "
                         f"(--log_interval)")
    cols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.0 * cols, 3.2 * nrows), dpi=80, layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (title, ylabel, keys, log, smooth) in zip(axes, panels):
        ys = []
        for i, key in enumerate(keys):
            x, y = _series(rows, key)
            if not len(x):
                continue
            ys.append(y)
            color = f"C{i}"
            if key == "val_loss":   # few points: markers, so a single evaluation still shows
                ax.plot(x, y, "o-", color="C3", ms=4, lw=1.5, label=f"val_loss (last {y[-1]:.3f})")
            elif smooth and len(x) >= 20:   # noisy: faint raw curve under a smoothed one
                ax.plot(x, y, color=color, alpha=0.3, lw=0.8)
                ax.plot(x, _smooth(y, max(5, len(x) // 15)), color=color, lw=1.6,
                        label=f"{key} (smoothed; last {y[-1]:.4g})")
            else:                           # few points get markers; a schedule (lr) is a plain line
                ax.plot(x, y, ".-" if len(x) < 20 else "-", color=color, lw=1.4, label=f"{key} (last {y[-1]:.4g})")
        all_y = np.concatenate(ys)
        if log or (log is None and _wide(all_y)):
            if (all_y > 0).all():
                ax.set_yscale("log")
                narrow = all_y.max() / all_y.min() < 10   # under a decade: more ticks, or only one shows
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if narrow else (1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))   # 0.5, 1, 2 (not 2x10^0)
                ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3, which="both")
        if title == "Learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.legend(fontsize=8, loc="best")   # names the curves and their last values
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    last_step = max(r["step"] for r in rows)
    seconds = rows[-1].get("time") if isinstance(rows[-1].get("time"), (int, float)) else None  # of this process
    finals = [f"{k} {_series(rows, k)[1][-1]:.4g}" for k in ("loss", "val_loss") if len(_series(rows, k)[0])]
    fig.suptitle(f"run {run}: step {last_step}" + (f" after {seconds:.0f} s" if seconds is not None else "")
                 + (" | final " + ", ".join(finals) if finals else ""), fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Token lengths (prepare_data.py stats --plot)
# ---------------------------------------------------------------------------------------------------------------
def plot_lengths(series: dict[str, np.ndarray], max_seq_len: int, png_path: str, unit: str = "tokens") -> str:
    """Histogram of per-record lengths (one colour per data file), the --max_seq_len window as a dashed line and
    the share of records longer than it (what training cuts) in the legend. Returns png_path."""
    Figure = _figure_class()
    series = {k: np.asarray(v) for k, v in series.items() if len(v)}
    if not series:
        raise UsageError(f"--plot {png_path}: no records to draw")
    lo = max(1, min(int(v.min()) for v in series.values()))
    hi = max(max(int(v.max()) for v in series.values()), max_seq_len + 1)
    log_x = hi / lo > 50   # lengths spread over orders of magnitude: equal-ratio bins read better
    bins = np.geomspace(lo, hi + 1, 40) if log_x else np.linspace(0, hi + 1, 41)
    fig = Figure(figsize=(7.5, 4.0), dpi=80, layout="constrained")
    ax = fig.subplots()
    for i, (name, v) in enumerate(series.items()):
        cut = float((v > max_seq_len).mean())
        ax.hist(v, bins=bins, alpha=0.55 if len(series) > 1 else 0.85, color=f"C{i}",
                label=f"{os.path.basename(name)}: {len(v):,} records, median {int(np.median(v)):,}, "
                      f"{cut:.1%} > {max_seq_len}")
    ax.axvline(max_seq_len, color="C3", ls="--", lw=1.5, label=f"--max_seq_len {max_seq_len} (longer is cut)")
    if log_x:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))   # 20, 50, 100 (not 10^2)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"{unit} per record" + (" (log scale)" if log_x else ""))
    ax.set_ylabel("records")
    ax.set_title(f"Length per record ({unit})", fontsize=12)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    return _save(fig, png_path)


def _save(fig, png_path: str) -> str:
    """Write the PNG atomically: a temp file in the same folder, renamed when complete."""
    folder = os.path.dirname(os.path.abspath(png_path))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {png_path}: folder {folder} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", pil_kwargs={"optimize": True})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, png_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return png_path
