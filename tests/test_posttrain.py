"""Post-training: SFT packing with document masking, reasoning rendering, truncation counts, DPO's reference
log-probs (precomputed == on the fly, gradients only through the policy, margin rises), distillation."""
import json
import math
import random
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script
from minimind.checkpoint import save_model
from minimind.config import ModelConfig
from minimind.data import (Example, LengthGroupedBatches, PackedConversations, Sampler, load_dpo, load_sft, pack,
                           pad_batch, sft_example, with_reasoning)
from minimind.loss import IGNORE, distill_loss
from minimind.model import AttentionMask, MiniMindForCausalLM, document_positions, flex_attention
from minimind.tokenizer import Tokenizer, train_bpe

sys.path.insert(0, str(ROOT))
import train_dpo  # noqa: E402  (the script's DPO pieces: reference_logprobs, dpo_batch_loss)


def posttrain_model(vocab_size, seed=0, dtype=torch.float32) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, rope_theta=1e4)
    return MiniMindForCausalLM(cfg).to(dtype).eval()


def posttrain_convs(n=24, seed=0):
    """Conversations of varied length and shape: system turns, several turns, CJK, a trailing user turn."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "数据", "模型", "训练", "42", "x+y", "\n"]
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    convs = []
    for i in range(n):
        conv = [{"role": "system", "content": say(3)}] if i % 3 == 0 else []
        for _ in range(1 + i % 3):
            conv += [{"role": "user", "content": say(rng.randint(2, 20))},
                     {"role": "assistant", "content": say(rng.randint(1, 30))}]
        if i % 5 == 0:
            conv.append({"role": "user", "content": say(4)})
        convs.append(conv)
    return convs


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------
def test_pack_places_every_item_once_within_capacity_deterministically():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=2000).tolist()
    bins = pack(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))       # each exactly once
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    lower = math.ceil(sum(lengths) / 512)
    assert len(bins) <= math.ceil(11 / 9 * lower) + 1                             # best-fit-decreasing bound
    assert pack(lengths, 512) == bins                                             # deterministic
    with pytest.raises(ValueError):
        pack([10, 513], 512)


def test_document_positions_restart_per_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 1, 1, 1, 1, 1, 1, 2]])
    want = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 0]])
    assert torch.equal(document_positions(doc), want)
    m = AttentionMask.documents(doc, "sdpa").dense[:, 0]
    for b in range(2):
        for i in range(8):
            for j in range(8):
                assert bool(m[b, i, j]) == (j <= i and bool(doc[b, i] == doc[b, j]))


@pytest.fixture(scope="module")
def packed_sft(tokenizer):
    examples = [Example(*e) for c in posttrain_convs() if (e := sft_example(tokenizer, c, 96)) is not None]
    return examples, PackedConversations(examples, 128, tokenizer.pad_id)


def test_packed_windows_hold_every_conversation_once_with_its_own_targets(packed_sft, tokenizer):
    examples, data = packed_sft
    assert sorted(i for w in data.windows for i in w) == list(range(len(examples)))
    assert len(data) < len(examples)                                  # several conversations share a window
    x, y, doc = data.get(range(len(data)))
    assert x.shape == y.shape == doc.shape == (len(data), 128)
    for row, w in enumerate(data.windows):
        pos = 0
        for d, i in enumerate(w):
            e, n = examples[i], len(examples[i].ids)
            assert x[row, pos:pos + n].tolist() == e.ids
            assert y[row, pos:pos + n].tolist() == e.targets      # the last token predicts its OWN next token
            assert (doc[row, pos:pos + n] == d).all()
            pos += n
        assert (doc[row, pos:] == -1).all() and (y[row, pos:] == IGNORE).all()
        assert (x[row, pos:] == tokenizer.pad_id).all()
    # The Sampler addresses windows: same (epoch, step, micro) -> same windows; every window once per epoch.
    s1, s2 = Sampler(len(data), 2, seed=3), Sampler(len(data), 2, seed=3)
    seen = np.concatenate([s1.indices(0, k, 0) for k in range(s1.steps_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == s1.steps_per_epoch * 2
    assert np.array_equal(s1.indices(1, 2, 0), s2.indices(1, 2, 0))


def test_packing_isolation_logits_equal_each_conversation_alone(packed_sft, tokenizer):
    """A token never attends across conversations, and RoPE positions restart: logits match a solo run."""
    examples, data = packed_sft
    model = posttrain_model(tokenizer.vocab_size)
    rows = [0, 1]
    x, y, doc = data.get(rows)
    with torch.no_grad():
        packed = model(x, doc_ids=doc)                              # CPU default up to 1024 tokens: dense mask
        assert AttentionMask.documents(doc).dense is not None
        varlen = model(x, position_ids=document_positions(doc), mask=AttentionMask.documents(doc, "varlen"))
        torch.testing.assert_close(varlen, packed, atol=1e-5, rtol=0)  # per-document SDPA = the dense reference
        for row in rows:
            pos = 0
            for i in data.windows[row]:
                n = len(examples[i].ids)
                alone = model(torch.tensor([examples[i].ids]))[0]
                torch.testing.assert_close(packed[row, pos:pos + n], alone, atol=1e-5, rtol=0)
                pos += n
        # and the loss of the packed batch is the token-weighted mean of the solo losses
        solo = [(model(torch.tensor([examples[i].ids]), targets=torch.tensor([examples[i].targets])),
                 sum(t != IGNORE for t in examples[i].targets)) for r in rows for i in data.windows[r]]
        want = sum(l * n for l, n in solo) / sum(n for _, n in solo)
        torch.testing.assert_close(model(x, targets=y, doc_ids=doc), want, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_path_equals_sdpa_fallback(packed_sft, tokenizer):
    if flex_attention is None:
        pytest.skip("FlexAttention needs torch >= 2.5")
    examples, data = packed_sft
    model = posttrain_model(tokenizer.vocab_size)
    x, _, doc = data.get([0, 1])
    pos = document_positions(doc)
    with torch.no_grad():
        ref = model(x, position_ids=pos, mask=AttentionMask.documents(doc, "sdpa"))
        try:
            flex = model(x, position_ids=pos, mask=AttentionMask.documents(doc, "flex"))
        except Exception as e:  # some builds cannot run flex_attention on CPU at all
            pytest.skip(f"flex_attention cannot run on this device: {type(e).__name__}")
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=0)


def test_varlen_and_dense_mask_paths_train_identically(packed_sft, tokenizer):
    """Per-document SDPA (the CPU default) and the dense (B,1,T,T) mask give the same loss and gradients."""
    _, data = packed_sft
    model = posttrain_model(tokenizer.vocab_size).train()
    x, y, doc = data.get([0, 1, 2])
    pos = document_positions(doc)
    grads = {}
    for backend in ("varlen", "sdpa"):
        model.zero_grad()
        loss = model(x, targets=y, position_ids=pos, mask=AttentionMask.documents(doc, backend))
        loss.backward()
        grads[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["varlen"][0], grads["sdpa"][0], atol=1e-6, rtol=1e-6)
    for g, ref_g in zip(grads["varlen"][1], grads["sdpa"][1]):
        torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-4)


def test_length_grouped_batches_pad_only_to_their_longest(packed_sft, tokenizer):
    examples, _ = packed_sft
    groups = LengthGroupedBatches(examples, 4, tokenizer.pad_id)
    assert sorted(i for g in groups.groups for i in g) == list(range(len(examples)))
    for g in range(len(groups)):
        x, y = groups.get([g])
        assert x.shape[1] == max(len(examples[i].ids) for i in groups.groups[g])
    assert groups.stats()["real"] > 0.8          # similar lengths together: little padding


# ---------------------------------------------------------------------------------------------------------------
# Reasoning and truncation
# ---------------------------------------------------------------------------------------------------------------
def test_reasoning_keep_renders_minimind3_think_block_and_drop_ignores_it(tokenizer):
    conv = [{"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "\n5", "reasoning_content": "\nadd them\n"}]
    kept = with_reasoning(conv, "keep")
    assert kept[1]["content"] == "<think>\nadd them\n</think>\n\n5"     # MiniMind-3's chat_template layout
    assert conv[1]["content"] == "\n5"                                   # the record itself is untouched
    assert with_reasoning(conv, "drop") == [conv[0], {"role": "assistant", "content": "\n5"}]
    ids, targets = sft_example(tokenizer, conv, 256, reasoning="keep")
    supervised = tokenizer.decode([t for t in targets if t != IGNORE])
    # '<think>\n' is the template's (a thinking prompt ends with it), the rest of the block is the model's
    assert supervised == "add them\n</think>\n\n5<|im_end|>"
    assert tokenizer.decode(ids).startswith("<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n<think>")
    ids, targets = sft_example(tokenizer, conv, 256, reasoning="drop")
    assert tokenizer.decode([t for t in targets if t != IGNORE]) == "\n5<|im_end|>"
    assert "think" not in tokenizer.decode(ids)


def test_truncation_is_counted_and_cuts_only_the_end(tokenizer, tmp_path):
    long_reply = " ".join(["word"] * 200)
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_reply}],   # cut
             [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "ok"}],  # no reply fits
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "short"}]]     # whole
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in convs])
    examples, dropped = load_sft(path, tokenizer, 64)
    assert dropped == 1 and [e.truncated for e in examples] == [True, False]
    cut = examples[0]
    assert len(cut.ids) == 64 and cut.targets[-1] != IGNORE             # the window ends inside the reply
    assert tokenizer.eos_id not in cut.targets                          # ... whose <|im_end|> was lost
    whole = examples[1]
    assert whole.targets[-1] == tokenizer.eos_id                        # nothing after the final <|im_end|>


def test_sft_cli_packing_reports_counts_and_trains(tokenizer, tmp_path):
    base = tmp_path / "base"
    save_model(posttrain_model(tokenizer.vocab_size), tokenizer, str(base))
    recs = [{"conversations": c} for c in posttrain_convs(40)]
    recs[0]["conversations"][-1 if recs[0]["conversations"][-1]["role"] == "assistant" else -2][
        "reasoning_content"] = "think " * 100                             # long enough to be truncated
    path = write_jsonl(tmp_path / "sft.jsonl", recs)
    r = run_script("train_full_sft.py", "--from_weight", base, "--data_path", path, "--out_dir", tmp_path / "out",
                   "--max_seq_len", 128, "--batch_size", 2, "--max_steps", 3, "--device", "cpu", "--dtype", "float32",
                   "--num_threads", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    examples, dropped = load_sft(path, tokenizer, 128)
    n_cut = sum(e.truncated for e in examples)
    assert examples[0].truncated and dropped == 0
    assert f"{n_cut} truncated at --max_seq_len" in r.stdout and "0 dropped" in r.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------------------------
def test_dpo_precomputed_reference_equals_on_the_fly(tokenizer, tiny_data):
    pairs, _ = load_dpo(tiny_data["dpo"], tokenizer, 128)
    pairs = pairs[:12]
    reference = posttrain_model(tokenizer.vocab_size, seed=1)
    cache = train_dpo.reference_logprobs(reference, pairs, 5, tokenizer.pad_id, torch.device("cpu"), torch.float32)
    assert cache.shape == (12, 2)
    idx = [7, 2, 11, 0]  # a batch in another order and padding than the precompute's
    x, y = pad_batch([pairs[i][0] for i in idx] + [pairs[i][1] for i in idx], tokenizer.pad_id)
    with torch.no_grad():
        live = train_dpo.sequence_logprobs(reference, x, y)
    torch.testing.assert_close(live, torch.cat([cache[idx, 0], cache[idx, 1]]), atol=1e-5, rtol=1e-6)


def test_dpo_gradients_flow_only_through_the_policy(tokenizer, tiny_data):
    pairs, _ = load_dpo(tiny_data["dpo"], tokenizer, 128)
    pairs = pairs[:3]
    reference = posttrain_model(tokenizer.vocab_size, seed=1).requires_grad_(False)
    policy = posttrain_model(tokenizer.vocab_size, seed=2).train()
    x, y = pad_batch([c for c, _ in pairs] + [r for _, r in pairs], tokenizer.pad_id)
    loss, m = train_dpo.dpo_batch_loss(policy, reference, (x, y), beta=0.1)
    margin, acc = m["reward_margin"], m["reward_accuracy"]
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    grads = [p.grad.clone() for p in policy.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # The precomputed path (reference log-probs as a plain tensor) gives the same loss and gradients.
    policy.zero_grad()
    cache = train_dpo.reference_logprobs(reference, pairs, 8, tokenizer.pad_id, torch.device("cpu"), torch.float32)
    ref = torch.cat([cache[:, 0], cache[:, 1]])
    assert not ref.requires_grad
    loss2, m2 = train_dpo.dpo_batch_loss(policy, None, (x, y, ref), beta=0.1)
    margin2 = m2["reward_margin"]
    loss2.backward()
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=1e-6)
    for g, p in zip(grads, policy.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_dpo_cli_reward_margin_rises(tokenizer, tiny_data, tmp_path):
    base = tmp_path / "sft"
    save_model(posttrain_model(tokenizer.vocab_size), tokenizer, str(base))
    with open(tiny_data["dpo"], encoding="utf-8") as f:
        lines = f.readlines()[:8]
    data = tmp_path / "dpo.jsonl"
    data.write_text("".join(lines), encoding="utf-8")
    r = run_script("train_dpo.py", "--from_weight", base, "--data_path", data, "--out_dir", tmp_path / "out",
                   "--max_seq_len", 128, "--batch_size", 4, "--epochs", 6, "--learning_rate", 2e-3,
                   "--log_interval", 1, "--precompute_ref", 1, "--device", "cpu", "--dtype", "float32",
                   "--num_threads", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "precomputed" in r.stdout
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    margins = [row["reward_margin"] for row in rows if "reward_margin" in row]
    assert len(margins) == 12 and margins[0] == pytest.approx(0, abs=1e-6)   # policy == reference at step 0
    assert np.mean(margins[-4:]) > 0.05 and np.mean(margins[-4:]) > np.mean(margins[:4])
    assert rows[-1]["reward_accuracy"] >= 0.5


# ---------------------------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------------------------
def test_distill_loss_equals_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 3
    t = torch.randn(2, 5, 7, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[0, :2] = IGNORE
    T, alpha = 2.5, 0.3
    kl_sum, ce_sum, n = 0.0, 0.0, 0
    for b in range(2):
        for i in range(5):
            if y[b, i] == IGNORE:
                continue
            zs = [math.exp(v / T) for v in s[b, i].tolist()]
            zt = [math.exp(v / T) for v in t[b, i].tolist()]
            ps, pt = [z / sum(zs) for z in zs], [z / sum(zt) for z in zt]
            kl_sum += sum(a * math.log(a / c) for a, c in zip(pt, ps))
            e = [math.exp(v) for v in s[b, i].tolist()]
            ce_sum += -math.log(e[int(y[b, i])] / sum(e))
            n += 1
    want = alpha * kl_sum / n * T * T + (1 - alpha) * ce_sum / n
    loss, kl, ce = distill_loss(s, t, y, T, alpha)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert kl.item() == pytest.approx(kl_sum / n, rel=1e-12) and ce.item() == pytest.approx(ce_sum / n, rel=1e-12)
    # the teacher gets no gradient; the student's matches finite differences
    s.requires_grad_(True)
    t.requires_grad_(True)
    distill_loss(s, t, y, T, alpha)[0].backward()
    assert t.grad is None or not t.grad.any()
    assert torch.autograd.gradcheck(lambda a: distill_loss(a, t.detach(), y, T, alpha)[0],
                                    (s.detach().requires_grad_(),))


def test_distill_refuses_a_teacher_with_another_tokenizer(tokenizer, tmp_path):
    other = train_bpe(iter(["a completely different little corpus for a tokenizer"] * 50), vocab_size=300,
                      show_progress=False)
    assert other.fingerprint() != tokenizer.fingerprint()
    save_model(posttrain_model(other.vocab_size), other, str(tmp_path / "teacher"))
    student = tmp_path / "student"
    save_model(posttrain_model(tokenizer.vocab_size), tokenizer, str(student))
    data = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in posttrain_convs(4)])
    r = run_script("train_distill.py", "--teacher", tmp_path / "teacher", "--from_weight", student,
                   "--data_path", data, "--out_dir", tmp_path / "out", "--device", "cpu")
    assert r.returncode == 2
    assert r.stderr.startswith("error: --teacher") and "tokenizer" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1                     # one line, no traceback
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_distill_cli_student_moves_toward_teacher(tokenizer, tmp_path):
    teacher = tmp_path / "teacher"
    save_model(posttrain_model(tokenizer.vocab_size, seed=5), tokenizer, str(teacher))
    data = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": c} for c in posttrain_convs(16)])
    r = run_script("train_distill.py", "--teacher", teacher, "--preset", "tiny", "--hidden_size", 32,
                   "--num_hidden_layers", 1, "--data_path", data, "--out_dir", tmp_path / "out", "--alpha", 1.0,
                   "--temperature", 2.0, "--max_seq_len", 128, "--batch_size", 2, "--max_steps", 12, "--epochs", 20,
                   "--learning_rate", 3e-3, "--log_interval", 1, "--device", "cpu", "--dtype", "float32",
                   "--num_threads", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    kls = [json.loads(l)["kl"] for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
           if '"kl"' in l]
    assert len(kls) >= 8 and np.mean(kls[-3:]) < 0.8 * np.mean(kls[:3])
    assert Tokenizer.load(str(tmp_path / "out")).fingerprint() == tokenizer.fingerprint()
