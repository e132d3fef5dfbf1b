"""Build the embedded RL task offline: arithmetic prompts with verifiable answers, for train_grpo.py.

    python dataset/build_rl.py [--out dataset/default/rl.jsonl] [--n 2000] [--seed 0]

One JSON object a line, our prompt+answer form: {"prompt": "What is 17 + 25?", "answer": "#### 42"} (GSM8K's
answer marker, so the built-in reward compares numbers). Sums, differences and small products, in English and
Chinese; a reward is either right or wrong, no reward model needed. Takes well under a second.
"""
import argparse
import json
import os
import random

EN = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Please calculate {a} {op} {b}."]
ZH = ["{a} {op} {b} 等于多少？", "计算 {a} {op} {b}。"]


def build(out: str, n: int = 2000, seed: int = 0) -> str:
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for _ in range(n):
            op = rng.choice("+-*")
            a, b = (rng.randint(0, 99), rng.randint(0, 99)) if op != "*" else (rng.randint(0, 12), rng.randint(0, 12))
            value = a + b if op == "+" else a - b if op == "-" else a * b
            template = rng.choice(ZH if rng.random() < 0.2 else EN)
            f.write(json.dumps({"prompt": template.format(a=a, op=op, b=b), "answer": f"#### {value}"},
                               ensure_ascii=False) + "\n")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="dataset/default/rl.jsonl", help="output JSONL file")
    p.add_argument("--n", type=int, default=2000, help="number of prompts")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args()
    print(f"wrote {build(args.out, args.n, args.seed)} ({args.n} prompts)")
