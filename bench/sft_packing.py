"""SFT padding waste: pad-to-max (MiniMind's way) vs length-grouped batches vs packing, side by side in one process.

    python bench/sft_packing.py                                   # CPU: tiny model, 6,000 GSM8K conversations
    python bench/sft_packing.py --device cuda --preset 64M --steps 20    # GPU: MiniMind's train_full_sft defaults

Prints, for each way of batching the same conversations (over the whole epoch):
  real share        positions that hold a conversation token (the rest is padding)
  supervised share  positions whose target is an assistant token (the loss is computed there)
  pos/s             positions computed per second (forward + backward + AdamW step), measured
  real tok/s        real share x pos/s: conversation tokens trained per second; speedup is vs pad-to-max
                    (and the same from CPU time, which a busy machine disturbs less than wall time)
"packed, dense mask": the same packed batches with the (B,1,T,T) SDPA mask reference instead of the default
backend. Rounds give each mode the same work (B x T positions) and interleave the modes (A B C A B C ...), so machine
noise hits them alike. length-grouped batches hold as many tokens as a packed one (~B*T / mean length
conversations): at equal batch size in conversations it would run 4x smaller steps, which is a different test.
"""
import argparse
import copy
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minimind import DEFAULT_TOKENIZER  # noqa: E402
from minimind.config import preset  # noqa: E402
from minimind.data import LengthGroupedBatches, PackedConversations, load_sft  # noqa: E402
from minimind.loss import IGNORE  # noqa: E402
from minimind.model import AttentionMask, MiniMindForCausalLM, document_positions  # noqa: E402
from minimind.resume import RunState  # noqa: E402
from minimind.runtime import Runtime, pick_device, pick_dtype  # noqa: E402
from minimind.tokenizer import Tokenizer  # noqa: E402
from minimind.train import configure_optimizer, train_step  # noqa: E402

SHARED = os.environ.get("MINIMIND_SHARED_DATA",
                        os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                     "shared", "data"))


def pad_to_max(examples, rows, T, pad_id):
    """MiniMind's SFTDataset: every conversation padded to max_seq_len, one per row."""
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for r, i in enumerate(rows):
        e = examples[i]
        x[r, :len(e.ids)] = torch.tensor(e.ids)
        y[r, :len(e.targets)] = torch.tensor(e.targets)
    return x, y


def make_loss_fn(backend, dtype):
    """Next-token loss; packed batches (x, y, doc_ids) get document masking by `backend` (AttentionMask.documents)."""
    def loss_fn(model, batch):
        x, y, *doc_ids = batch
        if not doc_ids:
            return model(x, targets=y), {}
        if backend == "auto":
            return model(x, targets=y, doc_ids=doc_ids[0]), {}
        mask = AttentionMask.documents(doc_ids[0], backend, dtype if backend == "sdpa" else None)
        return model(x, targets=y, mask=mask, position_ids=document_positions(doc_ids[0])), {}
    return loss_fn


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_path", default=os.path.join(SHARED, "sft", "en_gsm8k.train.jsonl"))
    p.add_argument("--n", type=int, default=6000, help="conversations (the first N lines)")
    p.add_argument("--max_seq_len", type=int, default=768, help="MiniMind's train_full_sft default")
    p.add_argument("--batch_size", type=int, default=16, help="rows per step (MiniMind's default)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=2, help="timed rounds (after one warm-up round)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--num_threads", type=int, default=1,
                   help="CPU threads (0 = PyTorch's default). 1 by default: on a shared 2-core machine, OpenMP threads "
                        "spin-waiting for a busy core made steps 2-5x slower and ratios meaningless")
    p.add_argument("--backend", default="auto", choices=["auto", "flex", "varlen", "sdpa"],
                   help="document masking of the 'packed' row (auto: flex on CUDA, varlen elsewhere); the 'packed, "
                        "dense mask' row always uses the (B,1,T,T) SDPA mask reference")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    tok = Tokenizer.load(DEFAULT_TOKENIZER)
    with open(args.data_path, encoding="utf-8") as f, tempfile.NamedTemporaryFile(
            "w", suffix=".jsonl", delete=False, encoding="utf-8") as tmp:
        for _, line in zip(range(args.n), f):
            tmp.write(line)
    try:
        examples, dropped = load_sft(tmp.name, tok, args.max_seq_len)
    finally:
        os.remove(tmp.name)
    T, B = args.max_seq_len, args.batch_size
    real = sum(len(e.ids) for e in examples)
    sup = sum(sum(t != IGNORE for t in e.targets) for e in examples)
    packed = PackedConversations(examples, T, tok.pad_id)
    # Same tokens per step as a packed batch (B windows of T): groups of ~B*T/mean-length conversations.
    group = max(1, round(B * T / (real / len(examples))))
    grouped = LengthGroupedBatches(examples, group, tok.pad_id)
    stats = {"pad-to-max": {"real": real / (len(examples) * T), "supervised": sup / (len(examples) * T)},
             "length-grouped": grouped.stats(), "packed, dense mask": packed.stats(), "packed": packed.stats()}

    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(examples))
    wperm = rng.permutation(len(packed))
    gperm = rng.permutation(len(grouped))
    makers = {  # step s -> a batch (a fresh slice of the data each step, as in training)
        "pad-to-max": lambda s: pad_to_max(examples, perm[s * B:(s + 1) * B], T, tok.pad_id),
        "length-grouped": lambda s: grouped.get([gperm[s % len(grouped)]]),   # one group = one batch
        "packed, dense mask": lambda s: packed.get(wperm[(s * B) % len(packed):(s * B) % len(packed) + B]),
        "packed": lambda s: packed.get(wperm[(s * B) % len(packed):(s * B) % len(packed) + B]),
    }
    loss_fns = {name: make_loss_fn("sdpa" if name == "packed, dense mask" else args.backend, dtype)
                for name in makers}
    torch.manual_seed(args.seed)
    base = MiniMindForCausalLM(preset(args.preset, vocab_size=tok.vocab_size))
    runs = {}
    for name in makers:
        model = copy.deepcopy(base).to(device).train()
        opt = configure_optimizer(model, 1e-4, 0.01, device)
        runs[name] = dict(model=model, opt=opt, time=0.0, cpu=0.0, pos=0, next=0,
                          state=RunState(argparse.Namespace(grad_clip=1.0), Runtime(0, 0, 1, device, dtype), model,
                                         opt, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), tok))

    print(f"{len(examples)} conversations ({dropped} dropped, {sum(e.truncated for e in examples)} truncated) | "
          f"{args.preset} {base.num_parameters() / 1e6:.1f}M | {device} {str(dtype).replace('torch.', '')} | "
          f"batch {B} x {T} (length-grouped: {group} conversations) | {args.steps} timed rounds, modes interleaved"
          f" | threads {torch.get_num_threads()} | packed: {args.backend}")
    # A round gives every mode the same work: batches until it has computed B x T positions (one batch for
    # pad-to-max and packed; several short ones for length-grouped). Round 0 warms up and is not timed.
    for s in range(args.steps + 1):
        for name, make in makers.items():
            r = runs[name]
            done = 0
            while done < B * T:
                batch = tuple(t.to(device) for t in make(r["next"]))
                r["next"] += 1
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0, c0 = time.perf_counter(), time.process_time()
                loss = train_step(r["state"], [batch], 1e-4, loss_fns[name]).loss
                loss.item()                      # waits for the device
                done += batch[0].numel()
                if s == 0:
                    continue
                r["time"] += time.perf_counter() - t0
                r["cpu"] += time.process_time() - c0   # CPU seconds of this process: robust to a busy machine
                r["pos"] += batch[0].numel()
                if device.type == "cuda":
                    r["peak"] = max(r.get("peak", 0), torch.cuda.max_memory_allocated())
    # Real tokens/s over an epoch = (the mode's real share over ALL its batches) x (positions computed per second).
    # Using the global share, not the few sampled batches', keeps the figure free of sampling luck.
    for name, r in runs.items():
        r["rate"] = stats[name]["real"] * r["pos"] / r["time"]
        r["rate_cpu"] = stats[name]["real"] * r["pos"] / r["cpu"]
    base = runs["pad-to-max"]
    print(f"{'mode':<20}{'real share':>11}{'supervised':>11}{'batches/epoch':>14}{'pos/s':>9}{'real tok/s':>12}"
          f"{'speedup':>9}{'(CPU-time)':>11}")
    for name, r in runs.items():
        st = stats[name]
        per_epoch = math.ceil(len(examples) / B) if name == "pad-to-max" else \
            len(grouped) if name == "length-grouped" else math.ceil(len(packed) / B)
        print(f"{name:<20}{st['real']:>11.1%}{st['supervised']:>11.1%}{per_epoch:>14}{r['pos'] / r['time']:>9,.0f}"
              f"{r['rate']:>12,.0f}{r['rate'] / base['rate']:>8.2f}x{r['rate_cpu'] / base['rate_cpu']:>10.2f}x")
    if device.type == "cuda":  # includes the weights and AdamW states of all three model copies
        print("peak GiB during a step: " + ", ".join(f"{n} {r['peak'] / 2**30:.2f}" for n, r in runs.items()))


if __name__ == "__main__":
    main()
