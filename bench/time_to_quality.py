"""Time to quality: MiniMind's own trainer and ours, side by side, both at once; one evaluator scores every
snapshot on held-out text in bits per byte; printed: when each run reached MiniMind's final held-out loss.

    git clone https://github.com/jingyaogong/minimind .bench_ref/minimind    # MiniMind's code is not vendored
    pip install transformers                                                 # MiniMind's trainer needs it (bench only)
    python bench/time_to_quality.py --minimind_repo .bench_ref/minimind \\
        --data_path ../shared/data/pretrain/zh_poetry.train.jsonl --train_lines 8000 --heldout_lines 500 \\
        --ours "same flags:" "batch 6:--batch_size 6" "muon:--optimizer muon --batch_size 6"
    python bench/time_to_quality.py --minimind_repo ... --smoke        # a few steps of each, to see it work
    python bench/time_to_quality.py ... --no_minimind --target_bpb 2.671 --ours "a:" "b:--learning_rate 1e-3"
                                                    # ours only (a sweep), timed to a loss known from an earlier run

What runs (each its own process, all started together, --threads CPU threads each):
  minimind   MiniMind's trainer/train_pretrain.py, unmodified, run from its clone with MiniMind's user flags
             (--batch_size --max_seq_len --learning_rate --epochs --hidden_size --num_hidden_layers,
             --accumulation_steps 1, --device cpu). A small launcher only (1) stands in for the `datasets` package
             when it is missing (a JSON-lines reader, as bench/minimind_baseline.py does) and (2) copies each weight
             file MiniMind saves (every --save_interval steps and at the end) to a timestamped snapshot.
  ours:NAME  train_pretrain.py with the same flags, MiniMind's tokenizer (--tokenizer clone/model), MiniMind's shape
             (a MiniMind config.json via --config), a resumable checkpoint every ~1/snapshots of the run, plus the
             extra flags given after NAME: in --ours "NAME:FLAGS".
Then ONE evaluator (our model code; MiniMind's .pth weights load into it, minimind/checkpoint.py) scores every
snapshot on the held-out lines (the --heldout_lines after the training lines), each document as both trainers
see it ([bos] text [eos], cut at --max_seq_len): bits per byte = sum of -log2 p(token) / UTF-8 bytes of the text
the scored tokens cover. With one tokenizer for both, bits per byte is the same ranking as loss; it also stays
fair if a run is given another tokenizer. Times are wall seconds since each process started (setup included), as a
user sees them; the snapshot spacing is the resolution of "time to reach".

Everything this writes goes under --work (default: a temp dir). Never run it on a busy machine and trust small
differences: the runs share the CPU, so each one's speed depends on the others (they are started together so that
they suffer alike).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------------------------------------------------
# The launcher: runs MiniMind's trainer unmodified, snapshotting each weight file it writes
# ---------------------------------------------------------------------------------------------------------------
def launch_minimind(repo: str, snap_dir: str, threads: int, argv: list[str]) -> None:
    import runpy
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, HERE)
    from minimind_shim import stub_datasets
    stub_datasets()   # MiniMind's PretrainDataset calls load_dataset('json', ...)
    sys.path = [q for q in sys.path if os.path.abspath(q or ".") != ROOT]   # our dataset/ must not shadow its
    save = torch.save

    def save_and_snapshot(obj, f, *a, **kw):
        save(obj, f, *a, **kw)
        if isinstance(f, str) and f.endswith(".pth") and "_resume" not in os.path.basename(f) \
                and os.path.abspath(os.path.dirname(f)) != os.path.abspath(os.path.join(repo, "checkpoints")):
            shutil.copy(f, os.path.join(snap_dir, f"{time.time():.3f}.pth"))  # the wall time it was written
    torch.save = save_and_snapshot
    os.chdir(os.path.join(repo, "trainer"))      # its paths (../model, ../checkpoints) are relative to trainer/
    sys.argv = ["train_pretrain.py", *argv]
    sys.path.insert(0, os.path.join(repo, "trainer"))
    runpy.run_path("train_pretrain.py", run_name="__main__")


# ---------------------------------------------------------------------------------------------------------------
# The evaluator: bits per byte on held-out documents, any snapshot
# ---------------------------------------------------------------------------------------------------------------
def heldout_rows(tokenizer, texts: list[str], seq_len: int):
    """Each document as the trainers see it: [bos] + ids + [eos], cut at seq_len; with the bytes its targets cover."""
    rows = []
    for t in texts:
        ids = tokenizer.encode(t)[:seq_len - 2]
        rows.append(([tokenizer.bos_id, *ids, tokenizer.eos_id], len(tokenizer.decode(ids).encode("utf-8"))))
    return rows


def bits_per_byte(model, rows, batch: int = 32) -> float:
    import torch
    import torch.nn.functional as F
    bits, nbytes = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            part = rows[i:i + batch]
            T = max(len(r) for r, _ in part)
            x = torch.zeros(len(part), T, dtype=torch.long)   # right padding: causal attention never sees it
            keep = torch.zeros(len(part), T - 1, dtype=torch.bool)
            for j, (ids, _) in enumerate(part):
                x[j, :len(ids)] = torch.tensor(ids)
                keep[j, :len(ids) - 1] = True
            logits = model(x[:, :-1]).float()
            nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            bits += (nll * keep).sum().item() / math.log(2)
            nbytes += sum(b for _, b in part)
    return bits / max(1, nbytes)


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------
def minimind_config(hidden: int, layers: int) -> dict:
    """MiniMind's MiniMindConfig defaults for this shape (model/model_minimind.py), as a config.json ours reads."""
    return {"model_type": "minimind", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 8,
            "num_key_value_heads": 4, "intermediate_size": math.ceil(hidden * math.pi / 64) * 64, "vocab_size": 6400,
            "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
            "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minimind_repo", default=os.path.join(ROOT, ".bench_ref", "minimind"),
                   help="a clone of github.com/jingyaogong/minimind (kept out of this repo)")
    p.add_argument("--data_path", default=os.path.join(ROOT, "..", "shared", "data", "pretrain",
                                                       "zh_poetry.train.jsonl"))
    p.add_argument("--train_lines", type=int, default=8000, help="the first N lines train both")
    p.add_argument("--heldout_lines", type=int, default=500, help="the next N lines are held out")
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_hidden_layers", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_seq_len", type=int, default=340)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--snapshots", type=int, default=10, help="weights saved per run, for the time-to-loss curve")
    p.add_argument("--ours", nargs="*", default=["same flags:"],
                   help='runs of ours, each "NAME:EXTRA FLAGS" (e.g. "muon:--optimizer muon --batch_size 6")')
    p.add_argument("--work", default=None, help="folder for data, runs and snapshots (default: a temp dir)")
    p.add_argument("--score_only", action="store_true",
                   help="score the snapshots of a finished run in --work again (no training)")
    p.add_argument("--no_minimind", action="store_true",
                   help="run and score ours only (e.g. a learning-rate sweep); --target_bpb stands in for MiniMind's "
                        "final loss (its training is deterministic: an earlier run's figure holds)")
    p.add_argument("--target_bpb", type=float, default=None, help="with --no_minimind: the loss to time runs to")
    p.add_argument("--smoke", action="store_true", help="tiny: 200 lines, d64 L2, seq 64 (checks it works)")
    args = p.parse_args()
    if args.target_bpb is not None and not args.no_minimind:
        raise SystemExit("error: --target_bpb goes with --no_minimind (when MiniMind runs, its final loss is the target)")
    if args.smoke:
        args.train_lines, args.heldout_lines, args.hidden_size, args.num_hidden_layers = 200, 20, 64, 2
        args.batch_size, args.max_seq_len, args.snapshots = 4, 64, 2
    repo = os.path.abspath(args.minimind_repo)
    if not os.path.isfile(os.path.join(repo, "trainer", "train_pretrain.py")):
        raise SystemExit(f"error: --minimind_repo {repo}: no trainer/train_pretrain.py (git clone "
                         f"https://github.com/jingyaogong/minimind there)")
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="ttq-"))
    os.makedirs(work, exist_ok=True)

    from minimind.checkpoint import load_config, load_model
    from minimind.tokenizer import Tokenizer

    # --- data: the first train_lines train, the next heldout_lines are held out ---------------------------------
    if not os.path.isfile(args.data_path):
        raise SystemExit(f"error: --data_path {args.data_path}: no such file (a JSONL of {{\"text\": ...}} lines)")
    with open(args.data_path, encoding="utf-8") as f:
        lines = [ln for _, ln in zip(range(args.train_lines + args.heldout_lines), f)]
    train, heldout = lines[:args.train_lines], lines[args.train_lines:]
    if len(heldout) < 1:
        raise SystemExit(f"error: --data_path {args.data_path}: fewer than {args.train_lines + 1} lines")
    train_path = os.path.join(work, "train.jsonl")
    with open(train_path, "w", encoding="utf-8") as f:
        f.writelines(train)
    tok_dir = os.path.join(repo, "model")
    tokenizer = Tokenizer.load(tok_dir)
    rows = heldout_rows(tokenizer, [json.loads(ln)["text"] for ln in heldout], args.max_seq_len)
    config = os.path.join(work, "config.json")
    with open(config, "w") as f:
        json.dump(minimind_config(args.hidden_size, args.num_hidden_layers), f)
    minimind_steps = math.ceil(len(train) / args.batch_size) * args.epochs

    # --- start every run at once -----------------------------------------------------------------------------
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": ROOT, "MINIMIND_CACHE": os.path.join(work, "cache")}
    flags = ["--batch_size", args.batch_size, "--max_seq_len", args.max_seq_len, "--learning_rate",
             args.learning_rate, "--epochs", args.epochs]            # the user flags both trainers share
    shape = ["--hidden_size", args.hidden_size, "--num_hidden_layers", args.num_hidden_layers]  # ours: --config
    runs = {}   # name -> (process, start time, log file, how to list snapshots)
    snap = os.path.join(work, "minimind_snapshots")
    os.makedirs(snap, exist_ok=True)
    mm_out = os.path.join(work, "minimind_out")
    cmd = [sys.executable, os.path.abspath(__file__), "_launch_minimind", repo, snap, str(args.threads),
           *map(str, flags + shape), "--accumulation_steps", "1", "--device", "cpu", "--num_workers", "0",
           "--save_dir", mm_out, "--data_path", train_path, "--log_interval", str(max(1, minimind_steps // 20)),
           "--save_interval", str(max(1, minimind_steps // args.snapshots))]
    if not args.no_minimind:
        runs["minimind"] = cmd
    for spec in args.ours:
        name, _, extra = spec.partition(":")
        out = os.path.join(work, "ours_" + "".join(c if c.isalnum() else "_" for c in name))
        if not args.score_only:
            shutil.rmtree(out, ignore_errors=True)
        runs["ours: " + name] = [sys.executable, os.path.join(ROOT, "train_pretrain.py"), *map(str, flags),
                                 "--data_path", train_path, "--tokenizer", tok_dir, "--config", config,
                                 "--num_threads", str(args.threads), "--out_dir", out, "--keep_checkpoints", "0",
                                 "--save_interval", "AUTO", "--log_interval", "10", *extra.split()]
    # our save interval: ~1/snapshots of our step count, which a dry run of the data path would tell; the
    # packed-window count is enough: tokens / max_seq_len windows, batch_size x accumulation per step.
    from minimind.data import PackedWindows, pretokenize
    os.environ["MINIMIND_CACHE"] = env["MINIMIND_CACHE"]
    packed = PackedWindows(pretokenize(train_path, tokenizer), args.max_seq_len)
    windows = len(packed)
    state = os.path.join(work, "runs.json")   # start and end times, so --score_only can score a finished run
    if not args.score_only:
        procs, starts, ends = {}, {}, {}
        for name, cmd in runs.items():
            if "AUTO" in cmd:   # argparse keeps a flag's last value: the extra flags win
                last = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
                bt, n_rows = int(last.get("--batch_tokens", -1)), int(last["--batch_size"])
                if bt < 0:     # the default: --batch_size counts documents (train_pretrain.py)
                    n_rows = packed.rows_for_documents(n_rows, packed.mean_document(tokenizer.eos_id))
                per_step = round(bt / args.max_seq_len) if bt > 0 else n_rows * int(last.get("--accumulation_steps", 1))
                cmd[cmd.index("AUTO")] = str(max(1, windows // per_step * args.epochs // args.snapshots))
            log = open(os.path.join(work, name.replace(": ", "_").replace(" ", "_") + ".log"), "w")
            procs[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log)
            starts[name] = time.time()
            print(f"started {name}: {' '.join(cmd[1:])}", flush=True)
        while len(ends) < len(procs):    # poll: each run's own end time, whichever finishes first
            for name, (proc, log) in procs.items():
                if name not in ends and proc.poll() is not None:
                    ends[name] = time.time() - starts[name]
                    log.close()
                    if proc.returncode:
                        raise SystemExit(f"error: {name} failed (exit {proc.returncode}); see {log.name}")
                    print(f"finished {name} in {ends[name]:.0f} s", flush=True)
            time.sleep(1)
        with open(state, "w") as f:
            json.dump({"starts": starts, "ends": ends}, f)
    if not os.path.isfile(state):
        raise SystemExit(f"error: --score_only: {state} not found (run the benchmark first with the same --work)")
    with open(state) as f:
        saved = json.load(f)
    starts, ends = saved["starts"], saved["ends"]

    # --- score every snapshot with one evaluator -------------------------------------------------------------
    curves = {}
    for name in runs:
        t0 = starts[name]
        if name == "minimind":
            points = [(float(f[:-4]) - t0, os.path.join(snap, f)) for f in sorted(os.listdir(snap))]
        else:
            out = runs[name][runs[name].index("--out_dir") + 1]
            ck = os.path.join(out, "checkpoints")
            points = [(os.stat(os.path.join(ck, d, "trainer_state.json")).st_mtime - t0, os.path.join(ck, d))
                      for d in sorted(os.listdir(ck)) if d.startswith("step_")] if os.path.isdir(ck) else []
            points.append((os.stat(os.path.join(out, "model.safetensors")).st_mtime - t0, out))
        shape = load_config(config) if name == "minimind" else None  # a .pth does not say its head count
        curves[name] = [(t, bits_per_byte(load_model(path, config=shape), rows))
                        for t, path in tqdm(sorted(points), desc=f"score {name}", unit="snapshot")]

    # the loss to reach: MiniMind's final held-out loss (or --target_bpb); t_mm: when MiniMind finished (or None)
    if "minimind" in curves:
        t_mm, target = curves["minimind"][-1]
    else:
        t_mm, target = None, args.target_bpb
    print(f"\nheld-out: {len(rows)} documents, {sum(b for _, b in rows)} bytes | shape d{args.hidden_size} "
          f"L{args.num_hidden_layers} | flags batch {args.batch_size} seq {args.max_seq_len} lr {args.learning_rate} "
          f"epochs {args.epochs} | {args.threads} thread(s) each, all runs at once | work {work}")
    print(f"{'run':<28}{'wall s':>8}{'final bpb':>11}{'reaches MiniMind final at':>27}{'time ratio':>12}"
          f"{'bpb at MiniMind end':>21}")
    for name, curve in curves.items():
        reach = next((t for t, b in curve if b <= target), None) if target is not None else None
        at_end = ([b for t, b in curve if t <= t_mm] or [curve[0][1]]) if t_mm else [None]
        print(f"{name:<28}{ends[name]:>8.0f}{curve[-1][1]:>11.4f}"
              f"{(f'{reach:.0f} s' if reach is not None else 'not reached' if target else '-'):>27}"
              f"{(f'{t_mm / reach:.2f}x' if reach and t_mm else '-'):>12}"
              f"{(f'{at_end[-1]:.4f}' if at_end[-1] is not None else '-'):>21}")
    print("\ncurves (wall s, bits/byte):")
    for name, curve in curves.items():
        print(f"  {name}: " + ", ".join(f"({t:.0f}, {b:.3f})" for t, b in curve))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_launch_minimind":
        launch_minimind(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
    else:
        main()
