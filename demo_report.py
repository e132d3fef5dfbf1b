"""What each training stage learned: the pretrained, SFT and DPO models of one `bash train.sh` run, side by side.

    python demo_report.py out                 # after `bash train.sh` (its last stage runs this)
    python demo_report.py /tmp/q --tiny       # after `bash train.sh --quick --out /tmp/q` (data built with --tiny)

Everything it prints is measured now, on questions and text that dataset/build_default.py's demo_set() rebuilds
deterministically from the same code and seed as the training files:
  1. the training loss of each stage (first and last logged value) and the loss-curve PNGs;
  2. the same prompts answered by all three models (greedy decoding, our engine), under the answer the data's
     own code gives (the docstring's first paragraph, the module, the signature);
  3. the identity questions in English and Chinese, against the answer the data teaches;
  4. the hit rate on 60 fixed questions in the builder's templates ("Which module provides `x`?", "What is
     the signature of `f`?"), in three groups: asked word for word in sft.jsonl ("seen"); a fact sft.jsonl
     teaches, asked in words no training file uses ("rephrased"); a fact no training reply states, only the
     docstring pretraining read ("new"). Rephrased + new are the held-out questions. A trivial guesser's score is
     printed beside the models';
  5. the same questions as multiple choice: does the model find the right reply more likely than wrong ones
     phrased like it (chance 1 in 4)? Knowledge shows up here before the model can say it;
  6. perplexity on held-out text: documentation of modules no training file contains, and Q&A chats about them.
The held-out text is also written to OUT/demo/ (so `eval_model.py --ppl_path` can repeat the numbers) and the
results to OUT/demo/report.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

from minimind import cli
from minimind import evaluate as ev
from minimind.checkpoint import load_model
from minimind.errors import UsageError
from minimind.generate import complete_chats
from minimind.plot import read_metrics
from minimind.runtime import pick_device, pick_dtype
from minimind.tokenizer import Tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dataset"))
import build_default  # noqa: E402  (dataset/ is a folder of scripts, not a package)

STAGES = ("pretrain", "sft", "dpo")
COMPARE_PROMPTS = [
    "What does `os.path.join` do?",
    "Which module provides `deque`?",
    "What is the signature of `math.gcd`?",
    "`json.dumps` 是做什么的？",
]
# What each comparison prompt asks about: (kind, object), so the printout can show the answer the data would give.
COMPARE_FACTS = {
    COMPARE_PROMPTS[0]: ("what", "os.path.join"), COMPARE_PROMPTS[1]: ("module", "collections.deque"),
    COMPARE_PROMPTS[2]: ("sig", "math.gcd"), COMPARE_PROMPTS[3]: ("what", "json.dumps"),
}
IDENTITY_PROMPTS = [("Who are you?", build_default.IDENTITY_EN), ("你是谁？", build_default.IDENTITY_ZH)]
WIDTH = 150  # replies are shown on one line, cut to this many characters


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------
_MODULE_IN_REPLY = re.compile(r"`([A-Za-z_][\w.]*)` module|from ([A-Za-z_][\w.]*) import|(built-in)")


def named_module(reply: str) -> str | None:
    """The module a "which module" reply names first ("builtins" for "... is a built-in"), or None."""
    m = _MODULE_IN_REPLY.search(reply)
    if not m:
        return None
    return "builtins" if m.group(3) else (m.group(1) or m.group(2))


def hit(question: dict, reply: str) -> bool:
    """module: the first module the reply names is the right one. sig: the reply contains the exact signature."""
    if question["kind"] == "module":
        return named_module(reply) == question["expected"]
    reply = " ".join(reply.split())
    return re.search(r"(?<![\w.])" + re.escape(question["expected"]), reply) is not None


def trivial_guess(question: dict, modules_asked: list[str]) -> bool:
    """A guesser that knows the data but nothing about the name: the commonest module of the set for "which
    module", and `name()` (no arguments; the name copied from the question) for "signature"."""
    if question["kind"] == "module":
        return question["expected"] == max(sorted(set(modules_asked)), key=modules_asked.count)
    name = re.search(r"`([^`]+)`", question["question"]).group(1)
    return question["expected"] == f"{name}()"


def data_answer(kind: str, dotted: str) -> str | None:
    """The answer the builder's code gives for this object on this Python (docstring / module / signature)."""
    module_name, _, attr = dotted.rpartition(".")
    obj = getattr(build_default.import_quietly(module_name), attr, None)
    if obj is None:
        return None
    if kind == "module":
        return f"`{module_name}`"
    if kind == "sig":
        sig = build_default._signature(obj, False)
        return f"`{dotted}{sig}`" if sig else None
    return build_default.first_paragraph(build_default._own_doc(obj), min_chars=40) or None


def one_line(text: str, width: int = WIDTH) -> str:
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= width else text[:width - 1] + "…"


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------
def loss_summary(stage_dir: str) -> dict | None:
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    rows = [r for r in read_metrics(path) if isinstance(r.get("loss"), (int, float))]   # the latest run's lines
    if not rows:
        return None
    png = os.path.join(stage_dir, "metrics.png")
    return dict(first=rows[0]["loss"], last=rows[-1]["loss"], steps=rows[-1].get("step"),
                png=png if os.path.isfile(png) else None)


def picks(model, tokenizer: Tokenizer, questions) -> list[bool]:
    """Per question: whether its right reply (choices[0]) has the highest log-likelihood among its choices, as a
    multiple-choice benchmark scores (sum of log p over the reply's tokens, given the question)."""
    requests = []
    for q in questions:
        for reply in q["choices"]:
            ids, mask = tokenizer.render_chat([{"role": "user", "content": q["question"]},
                                               {"role": "assistant", "content": reply}], last_reply_only=True)
            first = mask.index(1)
            last = len(mask) - 1 - mask[::-1].index(1)
            requests.append((ids[:last + 1], last + 1 - first))
    scores = ev.score_continuations(model, requests, batch_size=32)
    out, i = [], 0
    for q in questions:
        n = len(q["choices"])
        out.append(max(range(n), key=lambda j: scores[i + j]) == 0)
        i += n
    return out


def right_form(question: dict, reply: str) -> bool:
    """Whether the reply has the form of an answer of this kind (names a module / shows a `name(...)` signature)."""
    if question["kind"] == "module":
        return named_module(reply) is not None
    return re.search(r"`[\w.]+\(.*\)`", reply) is not None


def write_jsonl(path: str, records) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("out", help="the --out directory of bash train.sh (holds pretrain/, sft/, dpo/)")
    p.add_argument("--tiny", action="store_true", help="the run used the --tiny data (bash train.sh --quick)")
    p.add_argument("--seed", type=int, default=0, help="the data's seed (build_default.py --seed)")
    p.add_argument("--max_new_tokens", type=int, default=96, help="longest reply, in tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError("--max_new_tokens must be at least 1")
    missing = [s for s in STAGES if not os.path.isfile(os.path.join(args.out, s, "config.json"))]
    if missing:
        raise UsageError(f"{args.out}: no {', '.join(s + '/' for s in missing)} model there; give the --out "
                         f"directory of a finished `bash train.sh` run")
    t0 = time.time()
    device = pick_device(args.device)
    dtype = pick_dtype("auto", device, training=False)
    demo = build_default.demo_set(seed=args.seed, tiny=args.tiny)
    questions = demo["questions"]
    held = [q for q in questions if q["group"] != "seen"]
    demo_dir = os.path.join(args.out, "demo")
    texts_path, chats_path = os.path.join(demo_dir, "heldout_text.jsonl"), os.path.join(demo_dir, "heldout_chat.jsonl")
    write_jsonl(texts_path, [{"text": t} for t in demo["texts"]])
    write_jsonl(chats_path, [{"conversations": c} for c in demo["chats"]])

    prompts = COMPARE_PROMPTS + [q for q, _ in IDENTITY_PROMPTS] + [q["question"] for q in questions]
    results = {}
    for stage in STAGES:
        d = os.path.join(args.out, stage)
        model = load_model(d, device=device, dtype=dtype).eval()
        tok = Tokenizer.load(d)
        max_len = min(512, model.config.max_position_embeddings)
        replies = complete_chats(model, tok, [[{"role": "user", "content": q}] for q in prompts], batch_size=32,
                                 max_new_tokens=args.max_new_tokens, temperature=0.0)
        ppl_text = ev.perplexity(model, tok, demo["texts"], max_len=max_len, batch_size=16, progress=False)
        chat_texts = [tok.render_text(c) for c in demo["chats"]]   # as this tokenizer's template writes them
        ppl_chat = ev.perplexity(model, tok, chat_texts, max_len=max_len, batch_size=16, progress=False)
        results[stage] = dict(
            params=sum(x.numel() for x in model.parameters()),
            replies=dict(zip(prompts, replies)), loss=loss_summary(d),
            ppl_text=ppl_text.perplexity, ppl_chat=ppl_chat.perplexity, bpb_text=ppl_text.bits_per_byte,
            hits={q["question"]: hit(q, r) for q, r in zip(questions, replies[-len(questions):])},
            form={q["question"]: right_form(q, r) for q, r in zip(questions, replies[-len(questions):])},
            picks=dict(zip([q["question"] for q in questions], picks(model, tok, questions))))
        del model

    modules_asked = [q["expected"] for q in questions if q["kind"] == "module"]
    results["trivial"] = dict(hits={q["question"]: trivial_guess(q, modules_asked) for q in questions})

    def rate(stage, group=None, kind=None, what="hits"):
        """(hits, questions) of one stage on one group ("held" = rephrased + new) and kind (None = both)."""
        qs = [q for q in questions if (group is None or q["group"] == group or group == "held" and q in held)
              and (kind is None or q["kind"] == kind)]
        return sum(results[stage][what][q["question"]] for q in qs), len(qs)

    def table(rows, what):
        groups = ("seen", "rephrased", "new")
        print(f"  {'':16}" + "  ".join(f"{g:^13}" for g in groups) + "   held out (rephrased + new)")
        print(f"  {'':16}" + "  ".join(f"{'module':>6} {'sig':>6}" for _ in groups))
        for stage in rows:
            cells = "  ".join(" ".join(f"{'%d/%d' % rate(stage, g, k, what):>6}" for k in ("module", "sig"))
                              for g in groups)
            h = rate(stage, "held", None, what)
            label = stage if stage != "trivial" else "trivial guesser"
            print(f"  {label:16}{cells}   {h[0]:>2}/{h[1]} = {100 * h[0] / max(1, h[1]):.0f}%")

    # --- the printout -------------------------------------------------------------------------------------
    r0 = results["pretrain"]
    print(f"Demo report for {args.out}: {r0['params'] / 1e6:.1f}M-parameter models, greedy decoding, "
          f"{args.max_new_tokens} new tokens at most")

    print("\n[1] training loss (first -> last logged step; nats per token)")
    for stage in STAGES:
        ls = results[stage]["loss"]
        if ls is None:
            print(f"  {stage:8}  no metrics.jsonl")
            continue
        print(f"  {stage:8}  {ls['first']:.2f} -> {ls['last']:.2f} after {ls['steps']} steps   loss curve: "
              + (ls["png"] or f"not drawn (matplotlib missing: pip install matplotlib; then python "
                              f"plot_metrics.py {os.path.join(args.out, stage)})"))

    print("\n[2] the same prompts, three models")
    for q in COMPARE_PROMPTS:
        print(f"  👤 {q}   ({'asked in' if q in demo['asked'] else 'not in'} the training files)")
        want = data_answer(*COMPARE_FACTS[q]) if q in COMPARE_FACTS else None
        if want:
            print(f"     {'(right)':8} {one_line(want)}")
        for stage in STAGES:
            print(f"     {stage:8} {one_line(results[stage]['replies'][q])}")

    print("\n[3] identity (taught by sft.jsonl and dpo.jsonl)")
    identity = {}
    for q, want in IDENTITY_PROMPTS:
        print(f"  👤 {q}   (the data's answer: {want})")
        for stage in STAGES:
            got = results[stage]["replies"][q]
            ok = got.strip() == want
            identity.setdefault(stage, []).append(ok)
            print(f"     {stage:8} {'✓' if ok else '✗'} {one_line(got)}")

    print(f"\n[4] {len(questions)} fixed questions in the training data's templates, scored automatically "
          f"(module: the first module named is right; signature: the exact signature appears)")
    print("  seen      = asked word for word in sft.jsonl")
    print("  rephrased = held out: a fact sft.jsonl teaches, asked in words that no training file uses")
    print("  new       = held out: a fact no training reply states (only pretrain.jsonl's docstring has it)")
    table(STAGES + ("trivial",), "hits")
    print(f"  (trivial guesser: always `{max(sorted(set(modules_asked)), key=modules_asked.count)}`, the commonest "
          f"module here, and `name()` for a signature; {len(demo['modules'])} modules to choose from)")
    print("  replies in the right form (a module named / a `name(...)` signature shown), all 60: "
          + "   ".join(f"{stage} {rate(stage, what='form')[0]}/{len(questions)}" for stage in STAGES))
    print("  some held-out questions (DPO model):")
    shown = [q for g in ("rephrased", "new") for k in ("module", "sig")
             for q in [q for q in questions if q["group"] == g and q["kind"] == k][:2]]
    for q in shown:
        ok = results["dpo"]["hits"][q["question"]]
        print(f"     {'✓' if ok else '✗'} {q['group']:9} {q['question']}  [right: {q['expected']}]  ->  "
              f"{one_line(results['dpo']['replies'][q['question']], 90)}")

    n_choices = len(questions[0]["choices"])
    print(f"\n[5] the same {len(questions)} questions as multiple choice: the right reply or {n_choices - 1} wrong "
          f"ones phrased like it (other modules / other signatures); the model picks the one it finds most likely "
          f"(chance {100 / n_choices:.0f}%)")
    table(STAGES, "picks")

    print(f"\n[6] held-out perplexity (lower is better; {len(build_default.HELDOUT_MODULES)} standard-library modules "
          f"that no training file contains)")
    print(f"  {'':8}  {'documentation text':>18}  {'Q&A chats':>9}")
    for stage in STAGES:
        print(f"  {stage:8}  {results[stage]['ppl_text']:18.1f}  {results[stage]['ppl_chat']:9.1f}")
    print(f"  ({len(demo['texts'])} text chunks and {len(demo['chats'])} chats; repeat with: python eval_model.py "
          f"--load_from {os.path.join(args.out, 'dpo')} --ppl_path {texts_path})")

    report = dict(
        out=args.out, tiny=args.tiny, seed=args.seed, seconds=round(time.time() - t0, 1),
        hit_rates={stage: {f"{g}_{k or 'all'}": rate(stage, g, k) for g in ("seen", "rephrased", "new", "held")
                           for k in ("module", "sig", None)} for stage in STAGES + ("trivial",)},
        choice_rates={stage: {f"{g}_{k or 'all'}": rate(stage, g, k, "picks")
                              for g in ("seen", "rephrased", "new", "held") for k in ("module", "sig", None)}
                      for stage in STAGES},
        form_rates={stage: rate(stage, what="form") for stage in STAGES},
        stages={stage: dict(
            loss=results[stage]["loss"], heldout_hits=rate(stage, "held")[0], heldout_total=len(held),
            identity=identity[stage], ppl_heldout_text=results[stage]["ppl_text"],
            ppl_heldout_chat=results[stage]["ppl_chat"], bits_per_byte_heldout_text=results[stage]["bpb_text"],
            replies=results[stage]["replies"]) for stage in STAGES},
        questions=questions)
    with open(os.path.join(demo_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    print(f"\nreport: {os.path.join(demo_dir, 'report.json')} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    cli.run(main)
