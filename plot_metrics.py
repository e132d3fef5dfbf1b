"""Draw a training run's metrics.jsonl as a PNG: loss (+ val_loss), learning rate, tokens/s, grad norm, and
whatever else the run logged (DPO reward margin/accuracy, distillation KL/CE).

    python plot_metrics.py out/pretrain                       # -> out/pretrain/metrics.png
    python plot_metrics.py out/pretrain/metrics.jsonl --out loss.png

Every train_*.py also writes OUT_DIR/metrics.png at the end of its run when matplotlib is installed
(pip install matplotlib). The drawing itself lives in minimind/plot.py.
"""
import argparse

from minimind import cli
from minimind.plot import plot_metrics


def main(argv=None):
    p = argparse.ArgumentParser(prog="python plot_metrics.py", description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run's --out_dir, or its metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG to write (default: metrics.png beside metrics.jsonl)")
    args = p.parse_args(argv)
    print(f"wrote {plot_metrics(args.run, args.out)}")


if __name__ == "__main__":
    cli.run(main)
