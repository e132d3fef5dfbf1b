"""Pictures (minimind/plot.py, plot_metrics.py, prepare_data.py stats --plot): real PNG files from metrics.jsonl
lines shaped like RunLog's and from token lengths; without matplotlib, one line saying how to install it, and the
end-of-training hook (quiet=True) returns None instead of raising."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minimind import plot
from minimind.errors import DataError, UsageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mpl():
    return pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install matplotlib")


def write_run(folder: Path, steps=range(0, 100, 2), val_every=20, dpo=False) -> Path:
    """metrics.jsonl as RunLog.log writes it: training lines, and val_loss lines of their own."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(steps):
        row = {"step": s, "time": 0.5 * s, "loss": 9.0 * np.exp(-s / 40) + 2 + 0.1 * np.sin(s), "lr": 5e-4 * (1 - s / 200),
               "grad_norm": 3.0 / (1 + s), "tokens": 1024 * (s + 1)}
        if i:
            row["tokens_per_s"] = 2000 + 10 * (s % 7)
        if dpo:
            row.update(reward_margin=s / 50, reward_accuracy=min(1.0, 0.5 + s / 200))
        lines.append(row)
        if val_every and s and s % val_every == 0:
            lines.append({"step": s, "time": 0.5 * s + 0.1, "val_loss": 9.0 * np.exp(-s / 40) + 2.2})
    file = folder / "metrics.jsonl"
    file.write_text("".join(json.dumps({k: (float(v) if isinstance(v, np.floating) else v) for k, v in r.items()})
                            + "\n" for r in lines))
    return file


def png_pixels(mpl, path) -> np.ndarray:
    import matplotlib.image
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(str(path))


def test_metrics_png_has_the_runs_curves(mpl, tmp_path):
    file = write_run(tmp_path / "run", dpo=True)
    png = plot.plot_metrics(str(tmp_path / "run"))          # OUT_DIR form; default name beside the log
    assert png == str(tmp_path / "run" / "metrics.png")
    img = png_pixels(mpl, png)
    assert img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 0.05   # drawn, not blank
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp-")]
    fig = plot.metrics_figure(plot.read_metrics(str(file)), "run")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["Loss", "Learning rate", "Throughput", "Gradient norm (before clipping)",
                      "DPO reward margin", "DPO reward accuracy"]
    loss_ax = fig.axes[0]
    val = next(line for line in loss_ax.get_lines() if line.get_label().startswith("val_loss"))
    assert list(val.get_xdata()) == [20, 40, 60, 80]          # one marker per evaluation, at its step
    assert fig.axes[3].get_yscale() == "log"                  # grad norm spans 3 .. 0.03


def test_unknown_numeric_metrics_get_their_own_panel(mpl, tmp_path):
    file = tmp_path / "metrics.jsonl"
    file.write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 10, "kl": 0.1 * s, "ce": 2.0, "aux": s})
                            + "\n" for s in range(5)))
    fig = plot.metrics_figure(plot.read_metrics(str(file)), "x")
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["Loss", "Distillation", "aux"]


def test_read_metrics_keeps_the_latest_run(tmp_path):
    file = tmp_path / "metrics.jsonl"
    first = [{"step": s, "loss": 5.0} for s in range(10)]
    resumed = [{"step": s, "loss": 1.0} for s in range(6, 12)]          # resumed from the step-6 checkpoint
    file.write_text("".join(json.dumps(r) + "\n" for r in first + resumed) + '{"step": 12, "lo')   # killed mid-line
    rows = plot.read_metrics(str(file))
    assert [r["step"] for r in rows] == list(range(12))
    assert [r["loss"] for r in rows] == [5.0] * 6 + [1.0] * 6
    fresh = [{"step": s, "loss": 2.0} for s in range(3)]                # a new run in the same folder
    file.write_text("".join(json.dumps(r) + "\n" for r in first + fresh))
    assert [r["loss"] for r in plot.read_metrics(str(file))] == [2.0] * 3


def test_bad_metrics_lines_name_file_and_line(tmp_path):
    file = tmp_path / "metrics.jsonl"
    file.write_text('{"step": 0, "loss": 1}\nnot json\n{"step": 1, "loss": 1}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a JSON line"):
        plot.read_metrics(str(file))
    with pytest.raises(UsageError, match="no metrics.jsonl"):
        plot.read_metrics(str(tmp_path / "nowhere"))


def test_end_of_training_hook_never_raises(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert plot.plot_metrics(str(empty / "metrics.jsonl"), str(empty / "m.png"), quiet=True) is None
    with pytest.raises(UsageError, match="nothing to plot"):
        plot.plot_metrics(str(empty / "metrics.jsonl"))
    write_run(tmp_path / "run")
    for name in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)      # as if matplotlib were not installed
    capsys.readouterr()
    assert plot.plot_metrics(str(tmp_path / "run"), quiet=True) is None
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and err.count("\n") == 1
    assert not (tmp_path / "run" / "metrics.png").exists()
    with pytest.raises(UsageError, match="pip install matplotlib"):
        plot.plot_metrics(str(tmp_path / "run"))
    with pytest.raises(UsageError, match="pip install matplotlib"):
        plot.plot_lengths({"a": np.arange(1, 10)}, 5, str(tmp_path / "h.png"))


def test_length_histogram(mpl, tmp_path):
    rng = np.random.default_rng(0)
    lengths = {"sft.jsonl": rng.lognormal(4, 1, 2000).astype(int) + 1, "dpo.jsonl": rng.integers(10, 300, 500)}
    png = plot.plot_lengths(lengths, 256, str(tmp_path / "h.png"))
    assert png_pixels(mpl, png).std() > 0.05
    with pytest.raises(UsageError, match="no records"):
        plot.plot_lengths({"a": np.zeros(0, int)}, 256, str(tmp_path / "e.png"))
    assert not (tmp_path / "e.png").exists()


def test_plot_metrics_cli(mpl, tmp_path, capsys):
    import plot_metrics   # the top-level script, in-process (tests/conftest.py puts the repo root on sys.path)
    from minimind import cli
    file = write_run(tmp_path / "run")
    plot_metrics.main([str(file), "--out", str(tmp_path / "curves.png")])
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curves.png'}"
    png_pixels(mpl, tmp_path / "curves.png")
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: plot_metrics.main([str(tmp_path / "missing")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_prepare_data_stats_plot(mpl, tmp_path):
    data = tmp_path / "pretrain.jsonl"
    data.write_text("".join(json.dumps({"text": "word " * n}) + "\n" for n in (3, 10, 40, 80, 200)))
    r = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "stats", "--data_path", str(data),
                        "--max_seq_len", "64", "--plot", str(tmp_path / "len.png")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"length histogram: {tmp_path / 'len.png'}" in r.stdout
    png_pixels(mpl, tmp_path / "len.png")
