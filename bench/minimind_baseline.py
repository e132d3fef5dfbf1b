"""Side by side with MiniMind: its model class and padded batches vs our training path, same process, same shape.

    git clone https://github.com/jingyaogong/minimind /path/to/minimind     # MiniMind's code is not vendored here
    pip install transformers                                                # MiniMind's model needs it (bench only)
    python bench/minimind_baseline.py --minimind_repo /path/to/minimind --data_path some_pretrain.jsonl

What is timed, per optimizer step, on the same JSONL and the same tokenizer (ours, loaded through transformers for
MiniMind, so both see identical token counts):
  minimind     MiniMind's MiniMindForCausalLM (model/model_minimind.py) fed by its PretrainDataset
               (dataset/lm_dataset.py: every document cut to max_seq_len and padded to it, pads -> label -100)
               through a DataLoader, and its train_epoch step: autocast off on CPU (fp32), loss = res.loss +
               res.aux_loss, backward, clip 1.0, torch.optim.AdamW(model.parameters()).
  ours         bench/train_throughput.py's Runner, i.e. train_pretrain.py's step: packed windows from the memmap
               (no padding), background prefetch, our model (same shape), fused chunked loss, fused AdamW; in
               bf16 autocast (our CPU default) and in fp32 (and compiled with --compile 1).
Default shape = the issue's CPU reference: MiniMind-3 at d512 L8 (8 heads, 4 KV heads, intermediate
ceil(512*pi/64)*64 = 1664, vocab 6400, tied), batch 8 x 340. Rounds are interleaved (M O O M O O ...); the median
step time is reported. "useful" tokens are the positions that carry a loss (MiniMind: labels != -100 after its
shift; ours: every position of a packed window).
"""
import os

# OpenMP threads spin while waiting for work; on a CPU shared with other processes that stalls every parallel op
# (2 threads measured up to 2.7x slower on a loaded 2-core machine). libgomp reads this when torch is imported, so
# it is set before that; an OMP_WAIT_POLICY already in the environment wins. (dev/LOG.md)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

from minimind import DEFAULT_TOKENIZER  # noqa: E402
from minimind.data import PackedWindows, pretokenize  # noqa: E402
from minimind.tokenizer import Tokenizer  # noqa: E402
from minimind.flags import add_common_args  # noqa: E402
from minimind_shim import stub_datasets  # noqa: E402
from train_throughput import Runner  # noqa: E402


def import_minimind(repo: str):
    """MiniMind's model and dataset modules from a clone. Without the `datasets` package, its load_dataset('json')
    is stood in by a plain JSON-lines reader (the dataset code itself runs unchanged)."""
    stub_datasets()
    if not os.path.isfile(os.path.join(repo, "model", "model_minimind.py")):
        raise SystemExit(f"error: --minimind_repo {repo}: no model/model_minimind.py (git clone "
                         f"https://github.com/jingyaogong/minimind there)")
    sys.path.insert(0, os.path.abspath(repo))
    for name in [m for m in sys.modules if m == "dataset" or m.startswith("dataset.")]:
        del sys.modules[name]  # our repo has a dataset/ folder too: make sure MiniMind's is the one imported
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from dataset.lm_dataset import PretrainDataset
    return MiniMindConfig, MiniMindForCausalLM, PretrainDataset


class MiniMindRunner:
    """MiniMind's pretraining step on CPU, as in its trainer/train_pretrain.py (fp32: it disables autocast on CPU)."""

    def __init__(self, repo, data_path, tokenizer_dir, hidden_size, layers, batch_size, seq_len, accumulation, lr):
        from torch.utils.data import DataLoader
        from transformers import AutoTokenizer
        MiniMindConfig, MiniMindForCausalLM, PretrainDataset = import_minimind(repo)
        torch.manual_seed(42)
        self.config = MiniMindConfig(hidden_size=hidden_size, num_hidden_layers=layers, use_moe=False)
        self.model = MiniMindForCausalLM(self.config)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        ds = PretrainDataset(data_path, tokenizer, max_length=seq_len)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(42)).tolist()
        self.loader_args = dict(dataset=ds, batch_size=batch_size, sampler=order, num_workers=0)
        self.batches = iter(DataLoader(**self.loader_args))
        self.accumulation, self.tokens_per_step = accumulation, batch_size * seq_len * accumulation
        self.times, self.useful = [], []

    def next_batch(self):
        from torch.utils.data import DataLoader
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(DataLoader(**self.loader_args))
            return next(self.batches)

    def step(self):
        useful = 0
        for _ in range(self.accumulation):
            input_ids, labels = self.next_batch()
            useful += int((labels[:, 1:] != -100).sum())
            res = self.model(input_ids, labels=labels)
            loss = (res.loss + res.aux_loss) / self.accumulation
            self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return useful

    def run(self, steps, record=True):
        t0, useful = time.perf_counter(), 0
        for _ in range(steps):
            useful += self.step()
        if record:
            self.times.append((time.perf_counter() - t0) / steps)
            self.useful.append(useful / (steps * self.tokens_per_step))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--minimind_repo", required=True, help="a clone of github.com/jingyaogong/minimind")
    p.add_argument("--data_path", default="dataset/default/pretrain.jsonl", help="pretraining JSONL ({'text'})")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer directory used by both")
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_seq_len", type=int, default=340)
    p.add_argument("--accumulation_steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps per implementation per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num_threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--compile", type=int, default=0, choices=[0, 1],
                   help="1 = also time ours with --use_compile 1 (compiling takes a minute or two on a CPU)")
    args = p.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    mm = MiniMindRunner(args.minimind_repo, args.data_path, args.tokenizer, args.hidden_size, args.num_hidden_layers,
                        args.batch_size, args.max_seq_len, args.accumulation_steps, 5e-4)
    # Ours: train_pretrain.py's flags; preset 64M's head layout (8 heads, 4 KV heads) at the requested width.
    q = argparse.ArgumentParser()
    add_common_args(q, data_path=args.data_path, out_dir="/tmp/minimind-bench", from_weight="none", epochs=1,
                    batch_size=args.batch_size, learning_rate=5e-4, max_seq_len=args.max_seq_len)
    base = q.parse_args(["--preset", "64M", "--hidden_size", str(args.hidden_size), "--num_hidden_layers",
                         str(args.num_hidden_layers), "--accumulation_steps", str(args.accumulation_steps),
                         "--tokenizer", args.tokenizer, "--device", "cpu"])
    tokenizer = Tokenizer.load(args.tokenizer)
    windows = PackedWindows(pretokenize(args.data_path, tokenizer), args.max_seq_len)
    variants = [("ours bf16", {"dtype": "bfloat16"}), ("ours fp32", {"dtype": "float32"})]
    if args.compile:
        variants.append(("ours bf16+compile", {"dtype": "bfloat16", "use_compile": "1"}))
    ours = {name: Runner(base, flags, tokenizer, windows, torch.device("cpu")) for name, flags in variants}

    n_mm = sum(p.numel() for p in mm.model.parameters())
    n_ours = ours["ours bf16"].model.num_parameters()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} | cpu threads {torch.get_num_threads()} | torch {torch.__version__} | "
          f"params MiniMind {n_mm / 1e6:.2f}M, ours {n_ours / 1e6:.2f}M | batch {args.batch_size} x "
          f"{args.max_seq_len} x {args.accumulation_steps} | data {args.data_path}")
    mm.run(args.warmup, record=False)
    for r in ours.values():
        r.run(args.warmup, record=False)
    for _ in range(args.rounds):
        mm.run(args.steps)
        for r in ours.values():
            r.run(args.steps)

    t_mm = statistics.median(mm.times)
    useful_share = statistics.mean(mm.useful)
    mm_useful = mm.tokens_per_step * useful_share / t_mm
    print(f"{'implementation':18s} {'ms/step':>9s} {'tokens/s':>9s} {'useful share':>13s} {'useful tok/s':>13s} "
          f"{'vs MiniMind':>12s} {'spread':>7s}")
    print(f"{'MiniMind fp32':18s} {t_mm * 1e3:9.0f} {mm.tokens_per_step / t_mm:9.0f} {useful_share:13.1%} "
          f"{mm_useful:13.0f} {1.0:11.2f}x {(max(mm.times) - min(mm.times)) / t_mm:7.0%}")
    for name, r in ours.items():
        t = statistics.median(r.times)
        tps = r.tokens_per_step / t
        print(f"{name:18s} {t * 1e3:9.0f} {tps:9.0f} {1.0:13.1%} {tps:13.0f} {tps / mm_useful:11.2f}x "
              f"{(max(r.times) - min(r.times)) / t:7.0%}")


if __name__ == "__main__":
    main()
