"""RL: rewards, group advantages, the GRPO/CISPO loss against a float64 hand computation, packed rollouts, the
script end to end (with exact resume), and a tiny model that GRPO measurably teaches addition."""
import copy
import json
import math
import random

import pytest
import torch

from conftest import run_script
from minimind.config import ModelConfig
from minimind.data import Example, pad_batch, sft_example
from minimind.errors import DataError, UsageError
from minimind.loss import IGNORE, token_logprobs
from minimind.model import MiniMindForCausalLM
from minimind.rewards import (correctness, format_ok, gt_hits, load_reward_fn, parse_number, repetition, score,
                              tool_validity)
from minimind.rl import (Prompt, group_advantages, heldout_reward, load_prompts, pack_rollouts, policy_loss,
                         reply_logprobs, rollout, rollout_turns)


# ---------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------
def test_numbers_are_parsed_robustly():
    assert parse_number("so 3 + 4 = 7") == 7
    assert parse_number("The answer is 1,234.") == 1234
    assert parse_number("... #### -12") == -12
    assert parse_number("first 5, then \\boxed{3/4} and 9") == 0.75
    assert parse_number("x2 v1.2.3 nothing") is None
    assert correctness("<think>maybe 5</think> it is 42.0", "Natalia sold ... #### 42") == 1.0
    assert correctness("<think>42</think> it is 41", "42") == 0.0     # the thought does not count
    assert correctness(" Paris. ", "paris") == 1.0 and correctness("Lyon", "paris") == 0.0
    assert gt_hits("the rate is 7.21 and it is sunny", [7.21, "sunny", "rain"]) == pytest.approx(2 / 3)


def test_format_tools_and_repetition():
    assert format_ok("<think>a</think>b") and format_ok("plain") and format_ok("a</think>b", think_opened=True)
    assert not format_ok("<think>a") and not format_ok("<think>a</think><think>b</think>")
    assert not format_ok("<tool_call><tool_call>{}</tool_call>") and not format_ok("b <think>a</think>")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    good = '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    bad = '<tool_call>{"name": "nope", "arguments": {}}</tool_call><tool_call>{oops</tool_call>'
    assert tool_validity(good, tools) == 1.0 and tool_validity(bad, tools) == 0.0
    assert tool_validity(good + bad, json.dumps(tools)) == pytest.approx(1 / 3)
    assert tool_validity("no call", tools) is None
    assert repetition("one two three four five") == 0.0 and repetition("go go go go go go go") > 0.7
    r_ok, parts = score("it is 7", {"reference": "7"})
    r_loop, _ = score("7 7 7 7 7 7 7 7", {"reference": "7"})
    r_open, _ = score("<think>7", {"reference": "7"})
    assert parts["correct"] == 1.0 and r_ok == 1.0 and r_loop < r_ok and r_open < r_ok


def test_user_reward_function(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def short(messages, reply, record):\n    return -len(reply) / 10\n")
    fn = load_reward_fn(f"{f}:short")
    r, parts = score("abcd", {"messages": [], "record": {}}, user_fn=fn)
    assert parts["user"] == pytest.approx(-0.4) and r == pytest.approx(-0.4)
    with pytest.raises(UsageError, match="no function"):
        load_reward_fn(f"{f}:missing")
    with pytest.raises(UsageError, match="module:function"):
        load_reward_fn("my_reward")


# ---------------------------------------------------------------------------------------------------------------
# Advantages and the loss, against float64 by hand
# ---------------------------------------------------------------------------------------------------------------
def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    a = group_advantages(r, 4)
    assert torch.allclose(a[:4], torch.tensor([.5, -.5, -.5, .5], dtype=torch.float64) / (0.5 + 1e-4))
    assert torch.all(a[4:] == 0)                                  # a group that all agrees: no signal
    assert torch.allclose(group_advantages(r, 4, scale=False)[:4], torch.tensor([.5, -.5, -.5, .5], dtype=torch.float64))


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_policy_loss_matches_hand_computation(loss_type):
    torch.manual_seed(0)
    K, eps, eps_high, beta = 7, 0.2, 1.3, 0.05
    logp = (torch.rand(K, dtype=torch.float64) * -3).requires_grad_()
    old = logp.detach() + torch.tensor([0.0, 0.5, -0.5, 0.1, -0.1, 1.0, -1.0], dtype=torch.float64)
    ref = logp.detach() + torch.randn(K, dtype=torch.float64) * 0.3
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5, 0.5, 1.5, -2.0], dtype=torch.float64)
    loss, metrics = policy_loss(logp, old, adv, ref, loss_type, eps, eps_high, beta, num_tokens=10)
    loss.backward()
    want, grad = 0.0, []
    for t in range(K):
        lp, o, rf, A = logp[t].item(), old[t].item(), ref[t].item(), adv[t].item()
        ratio = math.exp(lp - o)
        kl = math.exp(rf - lp) - (rf - lp) - 1
        dkl = -math.exp(rf - lp) + 1                                    # d kl / d logp
        if loss_type == "grpo":
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            surrogate = min(ratio * A, clipped * A)
            dsur = ratio * A if ratio * A <= clipped * A else 0.0       # the clipped branch has no gradient
        else:
            w = min(ratio, eps_high)
            surrogate, dsur = w * A * lp, w * A
        want += (-surrogate + beta * kl) / 10
        grad.append((-dsur + beta * dkl) / 10)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(logp.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert metrics["kl"].item() == pytest.approx(sum(math.exp(r - l) - (r - l) - 1 for r, l in
                                                     zip(ref.tolist(), logp.tolist())) / K)


def test_packed_rollouts_score_like_separate_sequences():
    torch.manual_seed(0)
    m = MiniMindForCausalLM(ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))
    P, R = [[1, 5, 6, 7], [1, 8], [1, 9, 9, 9, 9, 3]], [[4, 2], [3, 3, 3], [7]]
    x, y, doc, adv = pack_rollouts(P, R, torch.tensor([1.0, 2.0, 3.0]))
    assert x.shape == (1, sum(len(p) + len(r) - 1 for p, r in zip(P, R)))   # one row, no padding
    assert adv.tolist() == [1, 1, 2, 2, 2, 3]
    lp = reply_logprobs(m, x, y, doc)
    alone = []
    for p, r in zip(P, R):
        logits = m(torch.tensor([p + r]))[:, :-1]
        alone.append(token_logprobs(logits, torch.tensor([[IGNORE] * (len(p) - 1) + r]))[0][len(p) - 1:])
    assert torch.allclose(lp, torch.cat(alone), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Reading RL files
# ---------------------------------------------------------------------------------------------------------------
def test_load_prompts_formats(tmp_path, tokenizer):
    f = tmp_path / "rl.jsonl"
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"prompt": "2+2=", "answer": "4"},
        {"question": "Natalia ...?", "answer": "She sold 48/2 = 24 ... #### 72"},
        {"conversations": [{"role": "system", "content": "", "tools": json.dumps(tools)},
                           {"role": "user", "content": "汇率?"}, {"role": "assistant", "content": ""}], "gt": ["7.21"]},
    ]) + "\n")
    prompts, dropped = load_prompts(str(f), tokenizer, 512)
    assert dropped == 0 and [p.reference for p in prompts] == ["4", "#### 72".join(["She sold 48/2 = 24 ... ", ""]), None]
    assert prompts[2].gt == ["7.21"] and prompts[2].tools[0]["function"]["name"] == "calc"
    assert tokenizer.decode(prompts[0].ids).endswith("<|im_start|>assistant\n") and not prompts[0].think_opened
    thinking, _ = load_prompts(str(f), tokenizer, 512, thinking_ratio=1.0)        # MiniMind's --thinking_ratio
    assert all(p.think_opened for p in thinking) and tokenizer.decode(thinking[0].ids).endswith("<think>\n")
    rlaif = tmp_path / "rlaif.jsonl"
    rlaif.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "hello"}]}) + "\n")
    with pytest.raises(DataError, match=r"rlaif.jsonl:1: .*--reward module:function"):
        load_prompts(str(rlaif), tokenizer, 512)
    assert len(load_prompts(str(rlaif), tokenizer, 512, need_reference=False)[0]) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected 'prompt'"):
        load_prompts(str(bad), tokenizer, 512)


# ---------------------------------------------------------------------------------------------------------------
# RL learns: a tiny model SFT'd to hedge ("7 or 12") half the time; GRPO on some prompts, measured on the others
# ---------------------------------------------------------------------------------------------------------------
def test_grpo_raises_heldout_reward(tokenizer):
    torch.manual_seed(0)
    rng = random.Random(0)
    problems = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(problems)
    rl_set, held = problems[:60], problems[60:]            # RL never sees the 40 held-out prompts

    def ask(a, b):
        return [{"role": "user", "content": f"{a}+{b}="}]

    # SFT on all 100 sums: half the answers hedge with a second, random number after the sum. The last number is
    # what counts (rewards.parse_number), so a hedged reply is usually wrong: the model knows the sums but
    # commits to them only about half the time. Nothing prompt-specific is left to learn, only the habit.
    examples = []
    for _ in range(20):
        for a, b in problems:
            ans = str(a + b) if rng.random() > 0.5 else f"{a + b} or {rng.randrange(19)}"
            examples.append(Example(*sft_example(tokenizer, ask(a, b) + [{"role": "assistant", "content": ans}], 64)))
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    model = MiniMindForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        x, y = pad_batch(rng.sample(examples, 32), tokenizer.pad_id)
        loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    control = copy.deepcopy(model)                         # the same model, no RL

    def prompts(pairs):
        return [Prompt(tokenizer.render_chat(ask(a, b), add_generation_prompt=True)[0], ask(a, b), str(a + b),
                       None, None, False, {}) for a, b in pairs]
    rl_prompts, held_prompts = prompts(rl_set), prompts(held)
    reward_of = lambda text, p: score(text, vars(p))      # noqa: E731

    # GRPO: 40 steps x 16 prompts x 8 replies, on-policy, the objective and clipping train_grpo.py uses.
    G = 8
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(40):
        batch = rng.sample(rl_prompts, 16)
        ro = rollout(model, tokenizer, [p.ids for p in batch], G, 6, 1.0,
                     seeds=list(range(step * 1000, step * 1000 + len(batch) * G)))
        rewards = torch.tensor([reward_of(t, batch[i // G])[0] for i, t in enumerate(ro.texts)])
        x, y, doc, adv = pack_rollouts(ro.prompt_ids, ro.reply_ids, group_advantages(rewards, G))
        model.train()
        logp = reply_logprobs(model, x, y, doc)
        loss, _ = policy_loss(logp, logp.detach(), adv, loss_type="grpo")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    # Held-out reward: 8 sampled replies (temperature 1: the policy as it is) to each of the 40 held-out prompts,
    # the same seeds for both models.
    def heldout(m):
        return heldout_reward(m, tokenizer, held_prompts, reward_of, 6, temperature=1.0, samples=8, seed=123)[1]
    rl_acc, control_acc = heldout(model), heldout(control)
    print(f"held-out accuracy: GRPO {rl_acc:.3f}, no-RL control {control_acc:.3f}")
    assert control_acc > 0.2                              # SFT gave the model something to build on
    assert rl_acc >= control_acc + 0.15, (rl_acc, control_acc)


# ---------------------------------------------------------------------------------------------------------------
# The script: end to end, metrics, and exact resume
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tokenizer):
    """A random tiny model and 40 arithmetic prompts; then train_grpo.py for 4 steps (2 prompts x 2 micro-batches
    x 4 replies, grpo loss, 2 updates per rollout, KL), saving a checkpoint at step 2."""
    import sys
    from minimind.checkpoint import save_model
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "dataset"))
    from build_rl import build
    tmp = tmp_path_factory.mktemp("grpo")
    data = build(str(tmp / "rl.jsonl"), n=40, seed=0)
    torch.manual_seed(0)
    save_model(MiniMindForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2)), tokenizer,
               str(tmp / "sft"))
    flags = ["--from_weight", tmp / "sft", "--data_path", data, "--max_steps", 4, "--batch_size", 2,
             "--num_generations", 4, "--max_gen_len", 12, "--learning_rate", 1e-3, "--log_interval", 1,
             "--save_interval", 2, "--num_threads", 1, "--dtype", "float32", "--loss_type", "grpo",
             "--num_iterations", 2, "--beta", 0.1]
    r = run_script("train_grpo.py", *flags, "--accumulation_steps", 2, "--out_dir", tmp / "a", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp, flags


def _weights(d):
    from safetensors.torch import load_file
    return load_file(str(d / "model.safetensors"))


def test_train_grpo_script_logs_and_resumes_exactly(grpo_run):
    import shutil
    tmp, flags = grpo_run
    rows = [json.loads(l) for l in (tmp / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert {"reward", "kl", "response_len", "rollout_tokens_per_s", "accuracy", "clip_frac"} <= set(rows[-1])
    assert all(r["kl"] > 0 for r in rows)   # logged after each step's 2nd update: the policy left the reference
    # Resume from step 2's checkpoint in a fresh directory: the same final weights, bit for bit.
    shutil.copytree(tmp / "a" / "checkpoints" / "step_000002", tmp / "b" / "checkpoints" / "step_000002")
    r = run_script("train_grpo.py", *flags, "--accumulation_steps", 2, "--out_dir", tmp / "b", "--from_resume", 1,
                   timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b, start = _weights(tmp / "a"), _weights(tmp / "b"), _weights(tmp / "sft")
    assert any(not torch.equal(a[k], start[k]) for k in a)      # training changed the weights ...
    assert all(torch.equal(a[k], b[k]) for k in a)              # ... and the resumed run changed them identically


@pytest.mark.slow
def test_train_grpo_ddp_equals_one_process(grpo_run):
    """2 ranks x 1 micro-batch = 1 rank x 2 micro-batches: the same prompts, the same rollout seeds, and a
    normaliser over both ranks' tokens, so DDP's averaged gradient is the one process's (up to summation order)."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    tmp, flags = grpo_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), str(ROOT / "train_grpo.py"), *map(str, flags), "--out_dir", str(tmp / "ddp")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ranks 2" in r.stdout
    a, d = _weights(tmp / "a"), _weights(tmp / "ddp")
    assert max((a[k] - d[k]).abs().max().item() for k in a) <= 1e-6
    one = [json.loads(l) for l in (tmp / "a" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(l) for l in (tmp / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in one] == pytest.approx([r["reward"] for r in two], abs=1e-6)   # both ranks' rollouts


def test_train_grpo_refuses_unanswered_prompts(tmp_path, tokenizer):
    from minimind.checkpoint import save_model
    save_model(MiniMindForCausalLM(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1)), tokenizer,
               str(tmp_path / "sft"))
    f = tmp_path / "rlaif.jsonl"
    f.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": ""}]}) + "\n")
    r = run_script("train_grpo.py", "--from_weight", tmp_path / "sft", "--data_path", f, "--out_dir", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "rlaif.jsonl:1:" in r.stderr
    assert "--reward module:function" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# Multi-turn rollouts (train_agent-style): tool calls run, the model continues, tool results are not trained on
# ---------------------------------------------------------------------------------------------------------------
def test_multi_turn_rollouts_run_tools_token_exactly(tokenizer):
    from test_tools import MATH, train_tool_model        # a tiny model that learnt to call the calculator
    from minimind.tools import ToolRegistry, calculator
    model = train_tool_model(tokenizer)
    reg = ToolRegistry([calculator()])
    tools = reg.schemas()
    ids = tokenizer.render_chat([MATH[0]], add_generation_prompt=True, tools=tools)[0]
    prompt = Prompt(ids, [MATH[0]], "9472", None, tools, False, {})
    ro = rollout_turns(model, tokenizer, [prompt], 2, 40, reg, max_turns=3, temperature=0.0)
    assert len(ro.reply_ids) == 2 and ro.reply_masks is not None
    for reply, mask, text in zip(ro.reply_ids, ro.reply_masks, ro.texts):
        assert len(reply) == len(mask) and 0 in mask and mask[0] == 1
        # the model's own tokens, then the tool result as the template writes it, then the model again
        written = tokenizer.decode([t for t, m in zip(reply, mask) if m])
        observed = tokenizer.decode([t for t, m in zip(reply, mask) if not m])
        assert "<tool_call>" in written and "9472" in written.split("</tool_call>")[-1]
        assert '{"result": "9472"}' in observed and "<tool_response>" in observed and "<tool_call>" not in observed
        assert "256 * 37 = 9472." in text and score(text, vars(prompt))[1]["correct"] == 1.0
    assert ro.new_tokens == sum(sum(m) for m in ro.reply_masks) - 2 * 2   # sampled tokens; the 2 <|im_end|> each
    # the same conversation as messages (tools.tool_loop), rendered by the template: the very same ids
    from minimind.tools import tool_loop
    messages = [MATH[0], *tool_loop(model, tokenizer, [MATH[0]], reg, max_rounds=3, max_new_tokens=40)]
    rendered = tokenizer.render_chat(messages, tools=tools)[0]
    assert ro.prompt_ids[0] + ro.reply_ids[0] == rendered[:len(ro.prompt_ids[0]) + len(ro.reply_ids[0])]
    assert tokenizer.decode(rendered[len(ro.prompt_ids[0]) + len(ro.reply_ids[0]):]).strip() == ""
    # packing: the tool result carries no target, every token the model wrote does
    x, y, doc, adv = pack_rollouts(ro.prompt_ids, ro.reply_ids, torch.tensor([1.0, -1.0]), ro.reply_masks)
    assert int((y != IGNORE).sum()) == len(adv) == sum(sum(m) for m in ro.reply_masks)
    assert len(reply_logprobs(model, x, y, doc)) == len(adv)
    # one turn only: the call is made, nothing runs
    one = rollout_turns(model, tokenizer, [prompt], 1, 40, reg, max_turns=1, temperature=0.0)
    assert all(set(m) == {1} for m in one.reply_masks) and "<tool_call>" in one.texts[0]
