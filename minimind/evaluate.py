"""Evaluation: perplexity and bits per byte, multiple-choice accuracy by log-likelihood, ROUGE-L and BLEU.

  perplexity()        a JSONL text file -> token perplexity and bits per byte (lm-evaluation-harness's rolling
                      windows: every token is scored exactly once, with up to max_len tokens of context)
  multiple_choice()   MMLU / C-Eval / CMMLU style questions (our JSONL or their CSV) -> accuracy per subject,
                      by the log-likelihood the model gives each answer (the lm-evaluation-harness method)
  generation_eval()   an SFT-format test file -> the model's replies scored by ROUGE-L and BLEU-4
"""
from __future__ import annotations

import csv
import glob
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

from .errors import DataError
from .jsonio import json_lines
from .model import MiniMindForCausalLM
from .tokenizer import Tokenizer

LETTERS = "ABCDEFGHIJ"


# ---------------------------------------------------------------------------------------------------------------
# Log-likelihood of token sequences (shared by perplexity and multiple choice)
# ---------------------------------------------------------------------------------------------------------------
def _rows_per_batch(batch_size: int, length: int, keep: int, vocab: int, budget: int = 1 << 26) -> int:
    """At most batch_size rows, and few enough that the kept logits (rows x keep x vocab) stay ~256 MB in fp32."""
    return max(1, min(batch_size, budget // max(1, keep * vocab), budget // max(1, length * 64)))


@torch.inference_mode()
def score_continuations(model: MiniMindForCausalLM, requests: Sequence[tuple[Sequence[int], int]],
                        batch_size: int = 16, progress: str | None = None) -> list[float]:
    """For each (ids, n): sum of log p(ids[t] | ids[:t]) over the last n tokens of ids (in nats).

    Inputs are left-padded into batches (every row ends at the same column), so only the last max(n) positions
    need logits. Requests whose inputs coincide (e.g. one question, four one-letter answers) run once.
    """
    device = next(model.parameters()).device
    unique: dict[tuple, int] = {}
    need: list[int] = []                     # per unique input: how many final positions must be scored
    for ids, n in requests:
        if not 1 <= n < len(ids):
            raise ValueError(f"cannot score the last {n} of {len(ids)} tokens (the first token has no context)")
        key = tuple(ids[:-1])
        if key not in unique:
            unique[key] = len(need)
            need.append(0)
        need[unique[key]] = max(need[unique[key]], n)
    inputs = list(unique)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))   # similar lengths together, longest first
    logps: list[torch.Tensor | None] = [None] * len(inputs)            # per unique input: (need, vocab) log-probs
    vocab = model.config.vocab_size
    acc = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    bar = tqdm(total=len(order), desc=progress, disable=progress is None, leave=False)
    i = 0
    while i < len(order):
        L = len(inputs[order[i]])
        rows = _rows_per_batch(batch_size, L, max(need[j] for j in order[i:i + batch_size]), vocab)
        batch = order[i:i + rows]
        keep = max(need[j] for j in batch)
        ids = torch.zeros(len(batch), L, dtype=torch.long)
        attn = torch.zeros(len(batch), L, dtype=torch.long)
        for r, j in enumerate(batch):
            x = inputs[j]
            ids[r, L - len(x):] = torch.tensor(x)
            attn[r, L - len(x):] = 1
        ids, attn = ids.to(device), attn.to(device)
        padded = bool((attn == 0).any())
        logits = model(ids, attention_mask=attn if padded else None,
                       position_ids=(attn.cumsum(1) - 1).clamp(min=0), logits_to_keep=keep)
        lp = torch.log_softmax(logits.to(acc), dim=-1)
        for r, j in enumerate(batch):
            logps[j] = lp[r, keep - need[j]:].cpu()
        bar.update(len(batch))
        i += len(batch)
    bar.close()
    out = []
    for ids, n in requests:
        lp = logps[unique[tuple(ids[:-1])]]
        targets = torch.tensor(ids[-n:])
        out.append(float(lp[-n:].gather(1, targets[:, None]).sum()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Perplexity and bits per byte
# ---------------------------------------------------------------------------------------------------------------
def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], int]]:
    """Split a document into windows that score every token exactly once (lm-evaluation-harness's
    loglikelihood_rolling). Returns (ids, n): score the last n tokens of ids. The first window starts with the
    prefix token (<|im_start|>, which opens every document in pretraining); later ones carry up to max_len tokens
    of context before the tokens they score."""
    windows, done = [], 0
    first = min(max_len, len(tokens))
    if first:
        windows.append(([prefix] + tokens[:first], first))
        done = first
    while done < len(tokens):
        n = min(max_len, len(tokens) - done)
        end = done + n
        windows.append((tokens[max(0, end - max_len - 1):end], n))
        done = end
    return windows


@dataclass
class PerplexityResult:
    documents: int
    tokens: int
    bytes: int
    nll: float   # total, in nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(1, self.tokens))

    @property
    def bits_per_byte(self) -> float:
        """Tokenizer-independent: total information in bits / UTF-8 bytes of text (comparable across vocabularies)."""
        return self.nll / math.log(2) / max(1, self.bytes)

    def as_dict(self) -> dict:
        return dict(documents=self.documents, tokens=self.tokens, bytes=self.bytes, nll=self.nll,
                    perplexity=self.perplexity, bits_per_byte=self.bits_per_byte)


def read_texts(path: str, tokenizer: Tokenizer | None = None, limit: int | None = None) -> list[str]:
    """Texts of a JSONL file: {"text": ...} records, or chat records ({"conversations": [...]}) rendered as the
    tokenizer's own chat template writes them (what the model was trained on); plain ChatML without a tokenizer."""
    texts = []
    for lineno, _, obj in json_lines(path):
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            texts.append(obj["text"])
        elif isinstance(obj, dict) and isinstance(obj.get("conversations"), list):
            conv = obj["conversations"]
            try:
                texts.append(tokenizer.render_text(conv) if tokenizer is not None else Tokenizer.chat_text(conv))
            except DataError as e:   # a record the template cannot write: say which line
                raise DataError(f"{path}:{lineno}: {e}") from None
        else:
            raise DataError(f"{path}:{lineno}: expected {{\"text\": str}} or {{\"conversations\": [...]}}")
        if limit and len(texts) >= limit:
            break
    if not texts:
        raise DataError(f"{path}: no records")
    return texts


def perplexity(model: MiniMindForCausalLM, tokenizer: Tokenizer, texts: Iterable[str], max_len: int = 512,
               batch_size: int = 8, progress: bool = True) -> PerplexityResult:
    """Token perplexity and bits per byte of the texts (each scored as its own document)."""
    texts = list(texts)
    windows, nbytes, ntokens = [], 0, 0
    for ids, text in zip(tokenizer.encode_batch(texts), texts):
        windows += rolling_windows(ids, tokenizer.bos_id, max_len)
        ntokens += len(ids)
        nbytes += len(text.encode("utf-8"))
    scores = score_continuations(model, windows, batch_size, "perplexity" if progress else None)
    return PerplexityResult(len(texts), ntokens, nbytes, -sum(scores))


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice (MMLU / C-Eval / CMMLU)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Question:
    question: str
    choices: list[str]
    answer: int          # index into choices
    subject: str
    where: str = ""      # FILE:LINE, for error messages


def _answer_index(answer, n: int, where: str) -> int:
    letter = str(answer).strip().upper()
    if len(letter) != 1 or letter not in LETTERS[:n]:
        hint = " (C-Eval's test split hides its answers: evaluate on val)" if letter == "" else ""
        raise DataError(f"{where}: answer {answer!r} is not one of {', '.join(LETTERS[:n])}{hint}")
    return LETTERS.index(letter)


def _subject_from_filename(path: str) -> str:
    name = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"(_|\.)(test|val|dev|train)$", "", name)


def read_jsonl_questions(path: str) -> list[Question]:
    out = []
    for lineno, _, obj in json_lines(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        for key in ("question", "choices", "answer"):
            if key not in obj:
                raise DataError(f"{where}: missing field '{key}'")
        choices = obj["choices"]
        if not (isinstance(choices, list) and 2 <= len(choices) <= len(LETTERS)
                and all(isinstance(c, str) for c in choices)):
            raise DataError(f"{where}: 'choices' must be a list of 2-{len(LETTERS)} strings")
        if not isinstance(obj["question"], str):
            raise DataError(f"{where}: 'question' must be a string")
        subject = obj.get("subject") or _subject_from_filename(path)
        out.append(Question(obj["question"], choices, _answer_index(obj["answer"], len(choices), where),
                            str(subject), where))
    if not out:
        raise DataError(f"{path}: no questions: the file is empty or has only blank lines")
    return out


def read_csv_questions(path: str) -> list[Question]:
    """C-Eval (id,question,A,B,C,D,answer[,explanation]), CMMLU (,Question,A,B,C,D,Answer) or headerless MMLU
    (question,A,B,C,D,answer) CSV. The subject is the file name without _test/_val/_dev."""
    subject = _subject_from_filename(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not any(any(c.strip() for c in r) for r in rows):
        raise DataError(f"{path}: no questions: the file is empty")
    head = [c.strip().lower() for c in rows[0]]
    if ("question" in head or {"a", "b"} <= set(head)) and "answer" not in head:
        raise DataError(f"{path}:1: the header has no 'answer' column, so nothing can be scored (C-Eval's test "
                        f"split hides its answers: evaluate on val)")
    if "question" in head and "answer" in head:
        q_col, a_col = head.index("question"), head.index("answer")
        c_cols = [head.index(x.lower()) for x in LETTERS if x.lower() in head]
        body, first = rows[1:], 2
    else:  # MMLU's own CSVs have no header: question, choices..., answer
        q_col, a_col, c_cols = 0, len(rows[0]) - 1, list(range(1, len(rows[0]) - 1))
        body, first = rows, 1
    if len(c_cols) < 2:
        raise DataError(f"{path}:1: need columns A, B, ... for the choices (found {rows[0]})")
    out = []
    for lineno, row in enumerate(body, first):
        if not any(c.strip() for c in row):
            continue
        where = f"{path}:{lineno}"
        if len(row) <= max(q_col, a_col, *c_cols):
            raise DataError(f"{where}: expected {max(q_col, a_col, *c_cols) + 1} columns, got {len(row)}")
        choices = [row[c] for c in c_cols]
        out.append(Question(row[q_col], choices, _answer_index(row[a_col], len(choices), where), subject, where))
    return out


def load_questions(path: str) -> list[Question]:
    """A .jsonl or .csv file, or a directory of them (e.g. C-Eval's val/ or CMMLU's test/)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.jsonl")) + glob.glob(os.path.join(path, "*.csv")))
        if not files:
            raise DataError(f"{path}: no .jsonl or .csv files in this directory")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"{path}: no such file or directory")
    out = []
    for f in files:
        out += read_csv_questions(f) if f.endswith(".csv") else read_jsonl_questions(f)
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def find_dev_split(path: str) -> str | None:
    """Where few-shot examples live by convention: X.test.jsonl -> X.dev.jsonl; .../test/ or .../val/ -> .../dev/;
    C-Eval's foo_val.csv -> ../dev/foo_dev.csv is covered by the directory rule."""
    p = path.rstrip("/")
    candidates = []
    base, name = os.path.split(p)
    for split in ("test", "val", "validation"):
        if name == split:
            candidates.append(os.path.join(base, "dev"))
        for sep in (".", "_"):
            if f"{sep}{split}." in name or name.endswith(f"{sep}{split}"):
                candidates.append(os.path.join(base, name.replace(f"{sep}{split}", f"{sep}dev")))
    return next((c for c in candidates if os.path.exists(c) and os.path.abspath(c) != os.path.abspath(p)), None)


def is_chinese(text: str) -> bool:
    return re.search(r"[\u4e00-\u9fff]", text) is not None


def format_question(q: Question, with_answer: bool, style: str = "letter") -> str:
    """The question block of lm-evaluation-harness's mmlu / cmmlu / ceval tasks (English or Chinese)."""
    zh = is_chinese(q.question + "".join(q.choices))
    if style == "choice":   # ARC-style: the choices are not listed; each is scored as the answer text
        text = (f"问题：{q.question.strip()}\n答案：" if zh else f"Question: {q.question.strip()}\nAnswer:")
        if with_answer:
            text += (q.choices[q.answer] if zh else " " + q.choices[q.answer]) + "\n\n"
        return text
    text = q.question.strip() + "\n" + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(q.choices))
    text += "答案：" if zh else "Answer:"
    if with_answer:
        text += (LETTERS[q.answer] if zh else " " + LETTERS[q.answer]) + "\n\n"
    return text


def question_header(subject: str, zh: bool) -> str:
    s = subject.replace("_", " ")
    return (f"以下是关于{s}的单项选择题，请直接给出正确答案的选项。\n\n" if zh
            else f"The following are multiple choice questions (with answers) about {s}.\n\n")


def build_prompt(q: Question, shots: list[Question], style: str = "letter") -> tuple[str, list[str]]:
    """(context, continuations): the few-shot prompt ending where the answer goes, and each choice's answer text."""
    zh = is_chinese(q.question + "".join(q.choices))
    context = question_header(q.subject, zh) + "".join(format_question(s, True, style) for s in shots)
    context += format_question(q, False, style)
    if style == "choice":
        conts = [c if zh else " " + c for c in q.choices]
    else:
        conts = [LETTERS[i] if zh else " " + LETTERS[i] for i in range(len(q.choices))]
    return context, conts


@dataclass
class MCResult:
    per_subject: dict[str, tuple[int, int]] = field(default_factory=dict)   # subject -> (correct, total)
    per_subject_norm: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:   # over all questions (micro average)
        c = sum(v[0] for v in self.per_subject.values())
        return c / max(1, sum(v[1] for v in self.per_subject.values()))

    @property
    def macro_accuracy(self) -> float:   # mean of the per-subject accuracies
        return sum(c / t for c, t in self.per_subject.values()) / max(1, len(self.per_subject))

    def as_dict(self) -> dict:
        d = {"accuracy": self.accuracy, "macro_accuracy": self.macro_accuracy,
             "questions": sum(t for _, t in self.per_subject.values()),
             "subjects": {s: {"correct": c, "total": t, "accuracy": c / t}
                          for s, (c, t) in sorted(self.per_subject.items())}}
        if self.per_subject_norm:
            c = sum(v[0] for v in self.per_subject_norm.values())
            d["accuracy_norm"] = c / max(1, d["questions"])
        return d


def multiple_choice(model: MiniMindForCausalLM, tokenizer: Tokenizer, questions: list[Question],
                    dev: list[Question] | None = None, shots: int = 0, limit: int | None = None,
                    style: str = "letter", max_len: int = 2048, batch_size: int = 16,
                    progress: bool = True) -> MCResult:
    """Accuracy by log-likelihood: the predicted answer is the choice whose continuation the model finds most likely.

    style 'letter' (MMLU / C-Eval / CMMLU in lm-evaluation-harness): options listed, score " A" / " B" / ...
    style 'choice' (ARC-style, kinder to tiny models): score each choice's text; also reports acc_norm (log-likelihood
    per UTF-8 byte of the choice, which removes the bias towards short answers).
    limit: the first N questions of each subject. shots: examples per prompt, from `dev` (same subject) when
    given, else the first questions of the same subject (never the question itself).
    """
    if style not in ("letter", "choice"):
        raise ValueError(f"style must be 'letter' or 'choice', got {style!r}")
    by_subject: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_subject[q.subject].append(q)
    pool: dict[str, list[Question]] = defaultdict(list)
    for q in (dev if dev is not None else questions):
        pool[q.subject].append(q)
    items = [q for s in sorted(by_subject) for q in by_subject[s][:limit or None]]
    requests, spans, lengths = [], [], []
    for q in items:
        examples = [e for e in pool[q.subject] if e is not q][:shots] if shots else []
        context, conts = build_prompt(q, examples, style)
        ctx = [tokenizer.bos_id] + tokenizer.encode(context)
        start = len(requests)
        for c in conts:
            cont = tokenizer.encode(c)
            ids = (ctx + cont)[-(max_len + 1):]      # keep the end: the question and answer must survive
            requests.append((ids, len(cont)))
            lengths.append(max(1, len(c.strip().encode("utf-8"))))
        spans.append((start, len(requests)))
    scores = score_continuations(model, requests, batch_size, "multiple choice" if progress else None)
    result = MCResult()
    correct, correct_norm = defaultdict(int), defaultdict(int)
    total = defaultdict(int)
    for q, (a, b) in zip(items, spans):
        ll = scores[a:b]
        total[q.subject] += 1
        correct[q.subject] += int(max(range(len(ll)), key=ll.__getitem__) == q.answer)
        if style == "choice":
            norm = [s / n for s, n in zip(ll, lengths[a:b])]
            correct_norm[q.subject] += int(max(range(len(norm)), key=norm.__getitem__) == q.answer)
    result.per_subject = {s: (correct[s], total[s]) for s in total}
    if style == "choice":
        result.per_subject_norm = {s: (correct_norm[s], total[s]) for s in total}
    return result


# ---------------------------------------------------------------------------------------------------------------
# Generation quality: ROUGE-L and BLEU
# ---------------------------------------------------------------------------------------------------------------
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


def segment(text: str) -> list[str]:
    """Lower-cased tokens for ROUGE/BLEU: runs of letters/digits are words; every CJK character and every
    punctuation mark is a token of its own.

    Chinese is scored per character, not per word: a word segmenter (jieba & co.) is a dictionary-dependent
    model of its own whose mistakes and version changes would move the scores, and it would be a run-time
    dependency; characters are exact and reproducible, and character-level ROUGE is the usual choice for Chinese
    generation benchmarks. (Scores are therefore comparable only with other character-level results.)
    """
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison & Dix 1986, Hyyro 2004): one big-int
    operation per token of b instead of a len(a) x len(b) table."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1 of two token lists (Lin 2004, beta = 1): harmonic mean of LCS/len(hyp) and LCS/len(ref)."""
    lcs = lcs_length(hypothesis, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hypothesis), lcs / len(reference)
    return 2 * p * r / (p + r)


def _ngrams(tokens: Sequence[str], n: int) -> dict[tuple, int]:
    counts: dict[tuple, int] = defaultdict(int)
    for i in range(len(tokens) - n + 1):
        counts[tuple(tokens[i:i + n])] += 1
    return counts


def corpus_bleu(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002), one reference each, in [0, 100].

    Clipped n-gram matches and totals are summed over the corpus; BP = exp(1 - r/c) when the output is shorter
    than the references. An order with no match at all gets sacreBLEU's default 'exp' smoothing (1 / 2^k, k
    counting such orders) so a short, weak output scores low rather than exactly 0.
    """
    matches, totals = [0] * max_n, [0] * max_n
    c = r = 0
    for hyp, ref in zip(hypotheses, references):
        c, r = c + len(hyp), r + len(ref)
        for n in range(1, max_n + 1):
            h, g = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(k, g.get(ng, 0)) for ng, k in h.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    if c == 0:
        return 0.0
    log_p, smooth = 0.0, 1
    for m, t in zip(matches, totals):
        if t == 0:
            return 0.0
        if m == 0:
            smooth *= 2
            log_p += math.log(1 / (smooth * t))
        else:
            log_p += math.log(m / t)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return 100 * bp * math.exp(log_p / max_n)


def read_generation_set(path: str, limit: int | None = None) -> tuple[list[list[dict]], list[str], int]:
    """SFT-format records -> (prompts = all turns before the last assistant reply, references, skipped). Records
    without a final assistant turn have no reference and are skipped."""
    prompts, refs, skipped = [], [], 0
    for lineno, _, obj in json_lines(path):
        where = f"{path}:{lineno}"
        conv = obj.get("conversations") if isinstance(obj, dict) else None
        if not isinstance(conv, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and m.get("role") in ("system", "user", "assistant", "tool")
                                                 for m in conv):
            raise DataError(f"{where}: expected {{\"conversations\": [{{\"role\", \"content\"}}, ...]}}")
        if len(conv) < 2 or conv[-1]["role"] != "assistant":
            skipped += 1
            continue
        prompts.append(conv[:-1])
        refs.append(conv[-1]["content"])
        if limit and len(prompts) >= limit:
            break
    return prompts, refs, skipped


def generation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-L F1 and corpus BLEU-4 (both x100) over the pairs, on segment() tokens."""
    hs, rs = [segment(h) for h in hypotheses], [segment(r) for r in references]
    rl = sum(rouge_l(h, r) for h, r in zip(hs, rs)) / max(1, len(hs))
    return {"rouge_l": 100 * rl, "bleu": corpus_bleu(hs, rs), "samples": len(hs)}
