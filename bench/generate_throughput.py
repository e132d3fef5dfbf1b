"""Generation speed: new tokens/s of minimind.generate at batch 1 and 16, side by side with MiniMind's generate().

    python bench/generate_throughput.py                          # CPU (and GPU if present), 30M shape
    python bench/generate_throughput.py --device cpu --new_tokens 256 --batch_sizes 1 16
    python bench/generate_throughput.py --device cuda --hidden_size 768 --num_hidden_layers 8 --new_tokens 512

Greedy decoding, random weights (speed does not depend on them), no stop id, so every row makes exactly
--new_tokens tokens. Prefill is included in the time, as a user would see it. Runs are interleaved and the best of
--repeats is kept, so background load hurts all columns alike. On CPU an extra row uses int8 weight-only
quantization (minimind.generate.quantize_int8; the MiniMind column stays fp32), and a first line prints the
batch-1 bound: tokens/s if a token cost only its weight reads, at the rate matrix-vector products reach here.

The side-by-side reference is MiniMind's own model file (github jingyaogong/minimind, model/model_minimind.py),
kept out of the repo in .bench_ref/ (git-ignored; it needs `transformers`, a bench-only dependency). Both models
get the same weights (the parameter names are the same), so the script also reports whether the greedy tokens
agree. Without the reference file the MiniMind column is skipped.
"""
import argparse
import copy
import importlib.util
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minimind.config import ModelConfig  # noqa: E402
from minimind.generate import Int8Linear, generate, quantize_int8  # noqa: E402
from minimind.model import MiniMindForCausalLM  # noqa: E402

REF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".bench_ref", "model_minimind.py")


def load_reference(path):
    """MiniMind's model module, or None (with the reason) when the file or transformers is missing."""
    if not os.path.isfile(path):
        return None, f"{path} not found"
    try:
        spec = importlib.util.spec_from_file_location("model_minimind", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod, ""
    except ImportError as e:
        return None, f"cannot import it ({e}); pip install transformers"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(runs: dict, device, repeats: int) -> dict:
    """Time each run `repeats` times, interleaved (a, b, c, a, b, c, ...) so background load hits all alike;
    keep each one's best time and its last output."""
    for fn in runs.values():
        fn(8)  # warm-up (and CUDA graph capture / compile)
    best, outs = {k: float("inf") for k in runs}, {}
    for _ in range(repeats):
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            outs[name] = fn(None)
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, outs


def weight_read_bound(model, repeats: int = 10) -> tuple[float, float]:
    """Batch-1 decoding reads every weight matrix once per token. The bound: the model's weight matrices (output
    head included), each applied to one vector in model order, as decoding applies them -> (tokens/s, GB/s)
    if a token cost nothing else. Measured this way, not by copying a tensor: it is the read rate the matrix-vector
    kernel reaches on this machine (caches included). An int8 model is timed with its own kernel
    (Int8Linear.forward), so its bound says what that kernel allows, whatever the bytes."""
    mats = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in mats)
    p = next(model.parameters())    # the activations' dtype and device (an int8 model keeps fp32 norms/embeddings)
    xs = {m.in_features: torch.randn(1, m.in_features, dtype=p.dtype, device=p.device) for m in mats}

    def one_token():
        for m in mats:
            if isinstance(m, Int8Linear):
                m(xs[m.in_features])
            else:
                torch.nn.functional.linear(xs[m.in_features], m.weight)
    for _ in range(3):
        one_token()
    t0 = time.perf_counter()
    for _ in range(repeats):
        one_token()
    per_token = (time.perf_counter() - t0) / repeats
    return 1 / per_token, nbytes / per_token / 1e9


def ours(model, prompts, new_tokens, **kw):
    def run(n):
        out = generate(model, prompts, max_new_tokens=n or new_tokens, stop_ids=(), **kw)
        assert n or all(len(o) == new_tokens for o in out)
        return out
    return run


def minimind(ref_model, prompts, new_tokens, device):
    ids = torch.tensor(prompts, device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
              eos_token_id=None)

    def run(n):
        return ref_model.generate(ids, max_new_tokens=n or new_tokens, **kw)[:, ids.shape[1]:].tolist()
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto (CPU, plus CUDA if present) | cpu | cuda")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=None, help="default: 256 on CPU, 512 on GPU")
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_hidden_layers", type=int, default=8)
    p.add_argument("--num_attention_heads", type=int, default=8)
    p.add_argument("--num_key_value_heads", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=6400)
    p.add_argument("--repeats", type=int, default=2, help="best of N timed runs")
    p.add_argument("--no_reference", action="store_true", help="skip MiniMind's generate")
    p.add_argument("--use_compile", action="store_true", help="GPU: torch.compile the decode step too")
    p.add_argument("--no_int8", action="store_true", help="CPU: skip the int8 weight-only row")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA GPU is visible")
    ref_mod, why = (None, "--no_reference") if args.no_reference else load_reference(REF)
    if ref_mod is None:
        print(f"MiniMind reference skipped: {why}")

    cfg = ModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                      num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
                      num_key_value_heads=args.num_key_value_heads, qk_norm=True, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = MiniMindForCausalLM(cfg).eval()
    print(f"model: {base.num_parameters() / 1e6:.1f}M params (hidden {cfg.hidden_size}, layers "
          f"{cfg.num_hidden_layers}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, intermediate "
          f"{cfg.intermediate_size}, vocab {cfg.vocab_size}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'device':6} {'weights':8} {'batch':>5} {'new':>5} {'minimind tok/s':>15} {'MiniMind tok/s':>15} "
          f"{'ratio':>6} {'same tokens':>11}")
    for device in devices:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        new_tokens = args.new_tokens or (256 if device.type == "cpu" else 512)
        model = MiniMindForCausalLM(cfg).eval()
        model.load_state_dict(base.state_dict())
        model.to(device=device, dtype=dtype)
        ref_model = None
        if ref_mod is not None:
            rcfg = ref_mod.MiniMindConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                                          num_attention_heads=cfg.num_attention_heads,
                                          num_key_value_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size,
                                          intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
                                          rope_theta=cfg.rope_theta, max_position_embeddings=4096)
            ref_model = ref_mod.MiniMindForCausalLM(rcfg).eval()
            missing, unexpected = ref_model.load_state_dict(base.state_dict(), strict=False)
            assert not unexpected and all(k.startswith("lm_head") for k in missing), (missing, unexpected)
            ref_model.to(device=device, dtype=dtype)
        variants = {f"{str(dtype).replace('torch.', '')}": model}
        if device.type == "cpu" and not args.no_int8:
            variants["int8"] = quantize_int8(copy.deepcopy(model))
        bounds = {}
        if device.type == "cpu":
            for name, m in variants.items():
                bounds[name], rate_gb = weight_read_bound(m)
                print(f"bound (batch 1, {name}): the model's weight matrices read at {rate_gb:.1f} GB/s by its "
                      f"matrix-vector kernel = {bounds[name]:.0f} tokens/s if a token cost nothing else")
        for bs in args.batch_sizes:
            g = torch.Generator().manual_seed(bs)
            prompts = torch.randint(3, cfg.vocab_size, (bs, args.prompt_len), generator=g).tolist()
            runs = {name: ours(m, prompts, new_tokens, compile=args.use_compile) for name, m in variants.items()}
            if ref_model is not None:
                runs["MiniMind"] = minimind(ref_model, prompts, new_tokens, device)
            best, outs = race(runs, device, args.repeats)
            rate = {k: bs * new_tokens / t for k, t in best.items()}
            for name in variants:
                theirs, same = rate.get("MiniMind", float("nan")), ""
                if "MiniMind" in outs:
                    # Sums in a different order (or int8 weights) can flip a near-tie argmax of a random model:
                    # report how many rows agree on their first 32 tokens.
                    agree = sum(a[:32] == b[:32] for a, b in zip(outs[name], outs["MiniMind"]))
                    same = f"{agree}/{bs}"
                share = f"  {rate[name] / bounds[name]:.0%} of the bound" if name in bounds and bs == 1 else ""
                print(f"{device.type:6} {name:8} {bs:5d} {new_tokens:5d} {rate[name]:15.0f} {theirs:15.0f} "
                      f"{rate[name] / theirs:6.2f} {same:>11}{share}", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
