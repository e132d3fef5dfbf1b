"""What a run shows and keeps: one tqdm bar, a metrics.jsonl beside the model, optional swanlab, a loss-curve PNG.

Only rank 0 logs. metrics.jsonl has one JSON object a line: {"step", "time", "loss", "lr", "grad_norm", "tokens",
"tokens_per_s", ... or "val_loss"}; `python plot_metrics.py OUT_DIR` draws it.
"""
from __future__ import annotations

import json
import os
import time

from tqdm import tqdm

from .checkpoint import unwrap
from .plot import plot_metrics


def swanlab_logged_in() -> bool:
    """True when `swanlab login` has stored a key (or SWANLAB_API_KEY is set): the cloud is then reachable."""
    if os.environ.get("SWANLAB_API_KEY"):
        return True
    try:
        from swanlab.sdk.internal.settings import Settings  # reads the .netrc that `swanlab login` writes
        return bool(Settings().api_key)
    except Exception:  # noqa: BLE001 - another swanlab version: look for the file ourselves
        root = os.environ.get("SWANLAB_ROOT") or os.path.join(os.path.expanduser("~"), ".swanlab")
        return os.path.isfile(os.path.join(root, ".netrc"))


def swanlab_mode(asked: str) -> tuple[str, str]:
    """(swanlab's mode name, why) for --swanlab_mode: auto = cloud when logged in, else offline."""
    if asked == "auto":
        return ("online", "logged in") if swanlab_logged_in() else ("offline", "not logged in: run `swanlab login`")
    return {"cloud": "online"}.get(asked, asked), "--swanlab_mode " + asked


class RunLog:
    """Progress bar + metrics.jsonl (+ swanlab). Only rank 0 (enabled=True) writes anything."""

    def __init__(self, args, total: int, start: int = 0, enabled: bool = True, desc: str = "train"):
        self.enabled, self.out_dir = enabled, args.out_dir
        self.last = None  # (time, tokens) at the previous training-loss line, for tokens/s
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, disable=not enabled)
        self.file = None
        self.swan = None
        self.postfix = {}
        self.t0 = time.perf_counter()
        if not enabled:
            return
        os.makedirs(args.out_dir, exist_ok=True)
        self.file = open(os.path.join(args.out_dir, "metrics.jsonl"), "a", encoding="utf-8")
        if getattr(args, "use_swanlab", 0):
            import swanlab  # imported lazily: most runs do not need it
            mode, why = swanlab_mode(getattr(args, "swanlab_mode", "auto"))
            where = {"online": "the swanlab cloud", "offline": f"{args.out_dir}/swanlog (upload later with "
                     f"`swanlab sync`)", "local": f"{args.out_dir}/swanlog (view with `swanlab watch`)"}[mode]
            tqdm.write(f"swanlab: logging to {where} ({why})")
            self.swan = swanlab.init(project=args.swanlab_project, experiment_name=os.path.basename(args.out_dir),
                                     config=vars(args), mode=mode, logdir=os.path.join(args.out_dir, "swanlog"))

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def log(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if "loss" in metrics and "tokens" in metrics:  # throughput since the previous training-loss line
            if self.last is not None and now > self.last[0]:
                metrics["tokens_per_s"] = round((metrics["tokens"] - self.last[1]) / (now - self.last[0]))
            self.last = (now, metrics["tokens"])
        metrics = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in metrics.items()}  # keeps 1e-7
        self.postfix.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()
                             if k != "tokens"})
        self.bar.set_postfix(self.postfix, refresh=False)  # loss, lr, tokens/s (+ val_loss); tqdm adds the ETA
        self.file.write(json.dumps({"step": step, "time": round(now - self.t0, 3), **metrics}) + "\n")
        self.file.flush()
        if self.swan is not None:
            import swanlab
            swanlab.log(metrics, step=step)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()  # also on an error: the bar must end its line before `error: ...` is printed
        return False

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
            self.file = None
        if self.swan is not None:
            import swanlab
            swanlab.finish()
            self.swan = None

    def plot(self) -> str | None:
        """Draw metrics.jsonl as OUT_DIR/metrics.png (skipped, with a hint, where matplotlib is missing)."""
        if not self.enabled:
            return None
        png = plot_metrics(os.path.join(self.out_dir, "metrics.jsonl"), os.path.join(self.out_dir, "metrics.png"),
                           quiet=True)
        if png:
            print(f"loss curve: {png}")
        return png


def announce(run, *lines: str) -> None:
    """Rank 0 prints what this run is (model size, device, precision, ranks, output dir), then the script's lines,
    then what one optimizer step is (samples, tokens, steps per epoch) and how it learns (optimizer, schedule)."""
    if not run.rt.main:
        return
    m = unwrap(run.model)
    print(f"model {m.num_parameters() / 1e6:.2f}M params | device {run.rt.device} | dtype "
          f"{str(run.rt.dtype).replace('torch.', '')} | ranks {run.rt.world} | out {run.args.out_dir}")
    for line in lines:
        print(line)
    if getattr(run, "sampler", None) is not None:
        print(step_line(run))


def step_line(run) -> str:
    """'step: 16 samples (16 x 1 micro-batches x 1 ranks) = 5440 token slots of --max_seq_len 340 | 186 steps/epoch
    | adamw, cosine LR'. Slots: packed windows fill them all; padded rows (--packing 0, DPO) fewer."""
    args, s = run.args, run.sampler
    samples = args.batch_size * s.accum * s.world    # (--packing 0 samples a whole group of batch_size at once)
    rows = samples * (2 if (run.fingerprint or {}).get("stage") == "dpo" else 1)  # a DPO pair is two rows
    line = [f"step: {samples} samples ({args.batch_size} x {s.accum} micro-batches x {s.world} ranks) = "
            f"{rows * args.max_seq_len} token slots of --max_seq_len {args.max_seq_len} | "
            f"{s.steps_per_epoch} steps/epoch"]
    opt = getattr(args, "optimizer", "adamw")
    how = f"{opt} (muon_lr {args.muon_lr:g})" if opt == "muon" else opt
    how += f", {getattr(args, 'lr_schedule', 'cosine')} LR (peak {args.learning_rate:g})"
    if getattr(args, "time_budget", 0):
        how += f" over a {args.time_budget:g}-minute budget"
    return " | ".join(line + [how])


def packing_note(seq_len: int, batch_size: int, mean: float, rows: int, batch_tokens: int) -> str:
    """Pretraining: how many documents a packed window holds, and what --batch_size means next to MiniMind's.

    MiniMind pads each document to its own row, so its --batch_size B carries B documents' real tokens per step;
    a packed window of ours carries seq_len real tokens, several short documents. By default (--batch_tokens -1) a
    micro-batch is B documents' worth of windows, so MiniMind's flags give MiniMind's steps per epoch."""
    if not mean:
        return "packing: no document ends in the first 10M tokens"
    held = f"packing: a {seq_len}-token window holds {seq_len / mean:.2f} documents (mean {mean:.0f} tokens, cut at {seq_len})"
    if batch_tokens < 0:
        return (f"{held}; --batch_size {batch_size} documents (as MiniMind counts them) = {rows} windows per "
                f"micro-batch (--batch_tokens -1, the default; 0 = {batch_size} whole windows)")
    if batch_tokens > 0:
        return f"{held}; --batch_tokens {batch_tokens} sets the step"
    return (f"{held}; MiniMind's --batch_size {batch_size} would carry ~{batch_size * mean:.0f} real tokens per step: "
            f"--batch_tokens -1 (the default) gives its steps per epoch")
