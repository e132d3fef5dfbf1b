"""Personal data in text: find e-mail addresses, phone numbers, ID-card and bank-card numbers, IP addresses.

A model trained on a phone number can recite it: the "train an LLM from scratch" checklists remove such strings
before training. Each kind is a regular expression for the shape plus, where one exists, the arithmetic check the
number carries, so ordinary numbers (dates, prices, line numbers, timestamps, hashes) are left alone:

  email      local@domain.tld, tld a common generic one or two letters (so `x@y.shape` in numpy code is not hit)
  id_card    mainland China resident ID: 6-digit region, birth date 19xx/20xx, 3 digits, ISO 7064 MOD 11-2
             check character (GB 11643-1999). A random 18-digit number passes the date test rarely and the
             checksum 1 time in 11.
  bank_card  13-19 digits starting 2-6 (UnionPay 62, Visa 4, Mastercard 2/5, Amex/JCB 3), optionally in groups of
             4 with spaces or dashes, passing the Luhn check (1 random number in 10 passes it: an 11-19 digit
             number that looks like a card and passes Luhn is treated as one)
  phone      mainland mobile 1[3-9]xxxxxxxxx (optionally +86), mainland landline 0xx(x)-xxxxxxx(x) (the dash
             required: a bare 0-prefixed number is too often something else), international +CC with 7-14 more
             digits, North American (xxx) xxx-xxxx / xxx-xxx-xxxx
  ipv4       four 0-255 parts; at least one part has two or more digits, so section numbers like 1.2.3.4 and
             version strings like 2.0.1.0 are not hit (8.8.8.8 is not personal data either)
  ipv6       what Python's ipaddress accepts, with at least three groups (so C++'s `Add::dec` is not an address)

Kinds are tried in that order and a span claimed by one is not matched again (an ID number is not also a card).
Digit runs are bounded by non-alphanumerics, so a hex hash or an identifier containing digits is never cut.
"""
from __future__ import annotations

import ipaddress
import re

KINDS = ("email", "id_card", "bank_card", "phone", "ipv4", "ipv6")
PLACEHOLDERS = {"email": "[EMAIL]", "id_card": "[ID_CARD]", "bank_card": "[BANK_CARD]", "phone": "[PHONE]",
                "ipv4": "[IP]", "ipv6": "[IP]"}

# An ASCII letter/digit (or a dot, for numbers) on either side means the digits belong to something larger.
_L, _R = r"(?<![0-9A-Za-z.])", r"(?![0-9A-Za-z]|\.\d)"
_TLDS = ("com|net|org|edu|gov|mil|int|info|biz|name|pro|mobi|io|ai|dev|app|xyz|top|site|online|tech|store|club|"
         "cloud|email|work|live|shop|vip|wang|ltd|group|icu|me|co")
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                    r"[A-Za-z0-9])?\.)+(?:" + _TLDS + r"|[A-Za-z]{2})(?![A-Za-z0-9-])", re.I)
_ID_CARD = re.compile(_L + r"[1-9]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]" + _R)
_BANK_CARD = re.compile(_L + r"[2-6]\d{3}(?:[ -]?\d{4}){2,3}(?:[ -]?\d{1,3})?" + _R)
_PHONE = re.compile("|".join([
    _L + r"(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}" + _R,                 # mainland mobile
    _L + r"(?:\(0\d{2,3}\) ?|0\d{2,3}-)[2-9]\d{6,7}" + _R,                       # mainland landline, with area code
    r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?\(?\d{1,4}\)?){2,5}" + _R,                # international, +CC ...
    _L + r"(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[-.])[2-9]\d{2}[-.]\d{4}" + _R,         # North American
]))
_IPV4 = re.compile(_L + r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)" + _R)
_IPV6 = re.compile(r"(?<![0-9A-Za-z:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:|"
                   r"(?:\d{1,3}\.){3}\d{1,3})?(?![0-9A-Za-z:])")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def id_card_ok(s: str) -> bool:
    """GB 11643-1999 check character of an 18-character resident ID (ISO 7064 MOD 11-2)."""
    total = sum(int(c) * w for c, w in zip(s[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == s[17].upper()


def luhn_ok(digits: str) -> bool:
    """Luhn: double every second digit from the right, sum the digits; valid card numbers give a multiple of 10."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _phone_ok(s: str) -> bool:
    digits = sum(c.isdigit() for c in s)
    return 7 <= digits <= 15 if s.startswith("+") else digits >= 10


def _ipv4_ok(s: str) -> bool:
    return any(len(p) >= 2 for p in s.split("."))


def _ipv6_ok(s: str) -> bool:
    if sum(1 for g in s.split(":") if g) < 3:
        return False
    try:
        ipaddress.IPv6Address(s)
        return True
    except ValueError:
        return False


# kind -> (pattern, check on the matched text, cheap test on the whole text that must hold for any hit)
_RULES = {
    "email": (_EMAIL, None, lambda t: "@" in t),
    "id_card": (_ID_CARD, id_card_ok, None),
    "bank_card": (_BANK_CARD, lambda s: 13 <= len(d := re.sub(r"[ -]", "", s)) <= 19 and luhn_ok(d), None),
    "phone": (_PHONE, _phone_ok, None),
    "ipv4": (_IPV4, _ipv4_ok, lambda t: _IPV4_GATE.search(t) is not None),
    "ipv6": (_IPV6, _ipv6_ok, lambda t: "::" in t or t.count(":") >= 7),
}
# Speed: the digit kinds (ID, card, phone) are made only of digits, X and the separators + ( ) . - and space, at least
# 7 characters long. Such runs are rare in prose, so those patterns run only on a window around each run, not
# over the whole text (tested: the same spans as a full scan, on random strings).
_DIGIT_KINDS = ("id_card", "bank_card", "phone")
_RUN = re.compile(r"[+(]?\d[\d ().+-]{5,}[\dXx]")
_IPV4_GATE = re.compile(r"\d\.\d{1,3}\.\d")


def _windows(text: str):
    """(start, end) around each run of digit-like characters; 2 more characters at the end, so the patterns'
    look-ahead (no letter or '.digit' after a number) sees what follows (look-behind sees before `start` anyway)."""
    return [(m.start(), min(len(text), m.end() + 2)) for m in _RUN.finditer(text)]


def find_pii(text: str, kinds=KINDS, windowed: bool = True) -> list[tuple[str, int, int]]:
    """[(kind, start, end)] of the personal data in `text`, sorted, never overlapping.

    windowed=False scans the whole text with every pattern (the reference the fast path is tested against)."""
    spans: list[tuple[str, int, int]] = []
    windows = None
    for kind in KINDS:
        if kind not in kinds:
            continue
        pattern, ok, cheap = _RULES[kind]
        if cheap is not None and not cheap(text):
            continue
        if kind in _DIGIT_KINDS and windowed:
            windows = _windows(text) if windows is None else windows
            matches = (m for s, e in windows for m in pattern.finditer(text, s, e))
        else:
            matches = pattern.finditer(text)
        for m in matches:
            s, e = m.span()
            if ok is not None and not ok(m.group()):
                continue
            if any(s < e2 and s2 < e for _, s2, e2 in spans):
                continue   # claimed by an earlier kind
            spans.append((kind, s, e))
    return sorted(spans, key=lambda x: x[1])


def scrub_text(text: str, kinds=KINDS, counts: dict | None = None) -> str:
    """`text` with each piece of personal data replaced by its typed placeholder ([EMAIL], [PHONE], ...)."""
    spans = find_pii(text, kinds)
    if not spans:
        return text
    out, at = [], 0
    for kind, s, e in spans:
        out += [text[at:s], PLACEHOLDERS[kind]]
        at = e
        if counts is not None:
            counts[kind] = counts.get(kind, 0) + 1
    out.append(text[at:])
    return "".join(out)


def scrub_value(value, kinds=KINDS, counts: dict | None = None):
    """Every string inside a JSON value scrubbed (dict keys and non-strings unchanged): works for any format."""
    if isinstance(value, str):
        return scrub_text(value, kinds, counts)
    if isinstance(value, list):
        return [scrub_value(v, kinds, counts) for v in value]
    if isinstance(value, dict):
        return {k: scrub_value(v, kinds, counts) for k, v in value.items()}
    return value
