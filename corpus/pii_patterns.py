"""Validated patterns for the PII step's fast path: find e-mail addresses, phone numbers, card numbers,
IP addresses, IBANs, US social security numbers and URLs without a language model.

Each entity type has a cheap RE2 prefilter (run by ``pyarrow.compute`` over a whole text column, so a
document without a candidate never reaches Python), a Python regex that finds candidates, and a
validator that rejects look-alikes: card numbers must pass the Luhn check and match an issuer's
prefix and length, IBANs the mod-97 check and their country's length, SSNs must avoid the area,
group and serial numbers the SSA never issues. Overlaps are resolved longest-first, so the domain
of an e-mail address is part of the e-mail, not a URL::

    >>> find_patterns("Mail jane.doe@example.com or call (555) 234-5678.", PATTERN_ENTITIES)
    [(5, 25, 'EMAIL'), (34, 48, 'PHONE')]
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

Span = tuple[int, int, str]
"""A finding: start and end offsets (characters) in the document, and the entity type."""

BLOCKER = "_BLOCKED"
"""Pseudo-type of a span that looks like PII but failed validation, kept only to shadow what is inside."""

PATTERN_ENTITIES = ("EMAIL", "URL", "PHONE", "CREDIT_CARD", "IBAN", "SSN", "IP_ADDRESS")
"""Entity types the fast path finds, in order of precedence when two spans are equally long."""

# --- prefilters (RE2 syntax: no look-around) -----------------------------------------------------

# Bare domains are only recognised under these TLDs. English words that are also TLDs (it, is, in,
# me, to, at, no, so, by, us…) are left out: a missing space ("the end.It was") must not be a URL.
BARE_TLDS = (
    "com|org|net|edu|gov|mil|int|info|biz|io|dev|app|ai|co|uk|de|fr|nl|es|ca|au|eu|ch|se|dk|fi|pl|"
    "ru|jp|cn|br|mx|ar|nz|za|ie|pt|gr|cz|hu|ro|tv|online|site|shop|store|blog|tech|xyz"
)

PREFILTERS: dict[str, str] = {
    "EMAIL": r"[^\s@]@[^\s@]",
    "URL": rf"(?i:://|www\d{{0,3}}\.)|[A-Za-z0-9-]\.(?:{BARE_TLDS})\b",
    "PHONE": r"\d{3}[ .-]\d{4}|\+ ?\d|\d{10}",
    "CREDIT_CARD": r"\d{4}[ -]?\d{4}[ -]?\d{2}",
    "IBAN": r"[A-Z]{2}\d{2} ?[A-Z0-9]{4}",
    "SSN": r"\d{3}[- ]\d{2}[- ]\d{4}",
    "IP_ADDRESS": r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:",
}

# --- finders --------------------------------------------------------------------------------------

_EMAIL = re.compile(
    # Local part: dot-separated atoms from a token start; an apostrophe inside (o'brien@) but not first,
    # so a quoted address ('jane@example.com') starts after the quote.
    r"(?<![\w.%+-])[\w%+-][\w%+'-]*(?:\.[\w%+'-]+)*@"
    r"(?:[^\W_](?:[\w-]*[^\W_])?\.)+[^\W\d_]{2,63}"  # domain labels and an alphabetic TLD
    r"(?![\w-]|\.[^\W_])"  # not the prefix of a longer domain
)

_URL_CHARS = r"[^\s<>\"'`{}|\\^\[\]]"
_URL = re.compile(
    rf"(?i:\b(?:https?|ftp)://{_URL_CHARS}+"
    rf"|(?<![\w@.-])www\d{{0,3}}\.{_URL_CHARS}+)"
    rf"|(?<![\w@.%+-])(?:[A-Za-z0-9](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?\.)+(?:{BARE_TLDS})"
    rf"(?![\w@-]|\.\w)(?:[/?#]{_URL_CHARS}*)?"
)
_URL_TRAILING = ".,;:!?'\")]*"

# A phone number may follow a word glued by a dot ("Tel.415-555-2671"), but not a digit and a dot: it
# would be the tail of a longer dotted number.
_NANP = re.compile(
    r"(?<![\w+(-])(?<!\d\.)(?:\+?1[ .-]?)?(?:\(\d{3}\) ?|\d{3}([ .-]))\d{3}([ .-])\d{4}(?![\w-]|[.,]\d)"
)
# Groups are separated ("+44 20 7946 0958", "+44 (0)20 …") or the number is one run ("+4930123456"),
# which keeps the regex free of the ambiguous splits that make backtracking explode.
_INTERNATIONAL = re.compile(
    r"(?<![\w+])\+[1-9]\d{0,2}(?:(?:[ .-](?:\(\d{1,4}\) ?)?\d{1,8}){1,6}|\d{6,13})(?![\w-]|[.,]\d)"
)
# UK national numbers (0 + area code): 020 7946 0958, 07700 900123, 0161 496 0000.
_UK_NATIONAL = re.compile(r"(?<![\w+-])(?<!\d\.)0\d{2,4} \d{3,4} ?\d{3,4}(?![\w-]|[.,]\d)")
# Ten bare digits are a phone number only next to a word that says so (else: order or account numbers).
_BARE_PHONE = re.compile(r"(?<![\w+-])(?<!\d\.)[2-9]\d{2}[2-9]\d{6}(?![\w-]|[.,]\d)")
_PHONE_CONTEXT = re.compile(
    r"(?i)(?:call|phone|tel|mobile|cell|fax|whatsapp|sms|text)\b\W{0,3}(?:\w+\W+){0,3}$"
)
# The context may sit three words back; the window is sized for three long words, not a character
# count that a word like "internationalisation" overruns (a miss here leaks the number).
_PHONE_CONTEXT_CHARS = 200

_CARD = re.compile(
    r"(?<![\w-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{1,3})?|\d{4}([ -])\d{6}\2\d{4,5})"
    r"(?![\w-]|[.,]\d)"
)
# A contiguous digit run right after these words, or after them and up to two words that name a number
# ("order no.", "tracking number:", "account id is"), is a reference number, whatever its checksum. Any
# other word in between ends the context: "paid for my order with 4111…" holds a card number.
_REFERENCE_CONTEXT = re.compile(
    r"(?i)\b(?:order|tracking|invoice|ref|reference|ticket|account|acct|isbn|id)\b"
    r"(?:\W{1,3}(?:no|nr|num|number|id|code|is|was)\b){0,2}\W{0,3}$"
)
# Longest context the pattern above can match; ``\b`` looks before the window start, so a window that
# cuts a word in two cannot make its tail a keyword.
_REFERENCE_CONTEXT_CHARS = 40

_IBAN = re.compile(r"(?<!\w)[A-Z]{2}\d{2}(?: ?[A-Z0-9]){10,30}")
# How IBANs are written: one run, or groups of four and a shorter last group.
_IBAN_LAYOUT = re.compile(r"[A-Z]{2}\d{2}(?:[A-Z0-9]+|(?: [A-Z0-9]{4})+(?: [A-Z0-9]{1,3})?)")

_SSN = re.compile(r"(?<![\w-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-]|[.,]\d)")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# A letter glued before the address does not make it something else ("server10.0.0.5"); only a digit or a
# dot does (it is then part of a longer dotted number).
_IPV4 = re.compile(rf"(?<![\d.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\d|\.\d)")
# A four-part number is a version only when the whole word right before it says so ("version 10.2.0.1",
# "ver. 10.0.0.1", "firmware: 1.0.0.12"). Without the word boundary "server", "driver", "over" and
# "rebuild" kept real addresses in the published text.
_VERSION_CONTEXT = re.compile(r"(?i)\b(?:version|ver\.|ver\b|release|build|firmware)[ \t]*:?[ \t]*$")
_VERSION_CONTEXT_CHARS = 20
_IPV6 = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:)[0-9A-Fa-f:]{2,39}(?:\d{1,3}(?:\.\d{1,3}){3})?"
    r"(?![\w:]|\.\d)"
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries (catches 90% of random numbers)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_issuer_valid(digits: str) -> bool:
    """Whether the length and leading digits belong to a major card network (Visa, Mastercard, Amex,
    Discover, Diners, JCB, UnionPay); other long numbers with a lucky checksum are not cards."""
    n, first2, first4 = len(digits), int(digits[:2]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)
    if 51 <= first2 <= 55 or 2221 <= first4 <= 2720:
        return n == 16
    if first2 in (34, 37):
        return n == 15
    if first4 == 6011 or first2 == 65 or 644 <= first4 // 10 <= 649:
        return 16 <= n <= 19
    if 300 <= first4 // 10 <= 305 or first2 in (36, 38, 39):
        return 14 <= n <= 19
    if 3528 <= first4 <= 3589 or first2 == 62:
        return 16 <= n <= 19
    return False


# Lengths of IBANs by country (SWIFT IBAN registry); a country not listed is not an IBAN.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_valid(iban: str) -> bool:
    """ISO 13616: the right length for the country, and the number mod 97 is 1."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def ssn_valid(area: str, group: str, serial: str) -> bool:
    """Area 000, 666 and 900–999, group 00 and serial 0000 are never issued by the SSA."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _strip_url(text: str, start: int, end: int) -> int:
    """End of a URL without the sentence punctuation after it (a ')' only if it closes nothing)."""
    while end > start and text[end - 1] in _URL_TRAILING:
        if text[end - 1] == ")" and text.count("(", start, end) >= text.count(")", start, end):
            break
        end -= 1
    return end


def _find_email(text: str) -> Iterable[Span]:
    for m in _EMAIL.finditer(text):
        yield m.start(), m.end(), "EMAIL"


def _find_url(text: str) -> Iterable[Span]:
    for m in _URL.finditer(text):
        start = m.start()
        end = _strip_url(text, start, m.end())
        # A scheme alone ("http://") or a stripped-to-nothing match is not a URL.
        if end - start > 4 and not text[start:end].lower().endswith("://"):
            yield start, end, "URL"


def _nanp_valid(number: str) -> bool:
    """North American numbers: 10 digits (after an optional 1), area and exchange codes start 2–9."""
    digits = "".join(ch for ch in number if ch.isdigit())
    if len(digits) == 11 and digits[0] == "1":
        digits = digits[1:]
    return len(digits) == 10 and digits[0] >= "2" and digits[3] >= "2"


def _find_phone(text: str) -> Iterable[Span]:
    for m in _NANP.finditer(text):
        # "555-234 5678" mixes separators; real numbers are written with one kind.
        if (m.group(1) is None or m.group(1) == m.group(2)) and _nanp_valid(m.group()):
            yield m.start(), m.end(), "PHONE"
    for m in _INTERNATIONAL.finditer(text):
        digits = sum(ch.isdigit() for ch in m.group())
        if 8 <= digits <= 16 and (not m.group().startswith("+1") or _nanp_valid(m.group())):
            yield m.start(), m.end(), "PHONE"
    for m in _UK_NATIONAL.finditer(text):
        if sum(ch.isdigit() for ch in m.group()) in (10, 11):
            yield m.start(), m.end(), "PHONE"
    for m in _BARE_PHONE.finditer(text):
        if _PHONE_CONTEXT.search(text, max(0, m.start() - _PHONE_CONTEXT_CHARS), m.start()):
            yield m.start(), m.end(), "PHONE"


def _find_card(text: str) -> Iterable[Span]:
    for m in _CARD.finditer(text):
        raw = m.group()
        digits = raw.replace(" ", "").replace("-", "")
        if not (luhn_valid(digits) and card_issuer_valid(digits)):
            continue
        if raw.isdigit() and _REFERENCE_CONTEXT.search(
            text, max(0, m.start() - _REFERENCE_CONTEXT_CHARS), m.start()
        ):
            continue
        yield m.start(), m.end(), "CREDIT_CARD"


def _find_iban(text: str) -> Iterable[Span]:
    for m in _IBAN.finditer(text):
        length = IBAN_LENGTHS.get(m.group()[:2])
        if length is None:
            continue
        # The greedy match may run into a following code or word ("… 0130 00 EUR"): keep exactly the
        # country's number of characters and require the IBAN to end there.
        chars, end = 0, m.start()
        while end < m.end() and chars < length:
            chars += text[end] != " "
            end += 1
        ends_here = end == len(text) or not text[end].isalnum()
        if chars == length and ends_here and iban_valid(text[m.start() : end].replace(" ", "")):
            yield m.start(), end, "IBAN"
            continue
        # An IBAN-shaped code that fails its checks is still one code: its digit groups must not
        # come out as a card or phone number. The blocker wins the overlap and is then discarded, so it
        # covers only what is laid out as an IBAN of the country's length — never the greedy match,
        # which runs over a following upper-case word into a real number ("GB12 PHONE 212 555 1234").
        if chars == length and ends_here and _IBAN_LAYOUT.fullmatch(text, m.start(), end):
            yield m.start(), end, BLOCKER


def _find_ssn(text: str) -> Iterable[Span]:
    for m in _SSN.finditer(text):
        if ssn_valid(m.group(1), m.group(3), m.group(4)):
            yield m.start(), m.end(), "SSN"


def _is_version(text: str, start: int) -> bool:
    """Whether the four-part number at ``start`` is a version: a ``v`` glued to it that starts a token
    ("v2.0.1.7", "(v2.0.1.7"), or a version word right before it."""
    if start and text[start - 1] in "vV" and (start == 1 or not text[start - 2].isalnum()):
        return True
    return _VERSION_CONTEXT.search(text, max(0, start - _VERSION_CONTEXT_CHARS), start) is not None


def _find_ip(text: str) -> Iterable[Span]:
    for m in _IPV4.finditer(text):
        if not _is_version(text, m.start()):
            yield m.start(), m.end(), "IP_ADDRESS"
    for m in _IPV6.finditer(text):
        candidate = m.group()
        # Two non-empty groups at least: "::1" and "a::" are too short to tell from code ("std::").
        if sum(1 for group in candidate.split(":") if group) < 2:
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield m.start(), m.end(), "IP_ADDRESS"


FINDERS: dict[str, Callable[[str], Iterable[Span]]] = {
    "EMAIL": _find_email,
    "URL": _find_url,
    "PHONE": _find_phone,
    "CREDIT_CARD": _find_card,
    "IBAN": _find_iban,
    "SSN": _find_ssn,
    "IP_ADDRESS": _find_ip,
}

_PRECEDENCE = {entity: rank for rank, entity in enumerate(PATTERN_ENTITIES)}


def resolve_overlaps(spans: list[Span], first: list[Span] | None = None) -> list[Span]:
    """Non-overlapping spans in text order: longer spans win, then the type listed first in
    ``PATTERN_ENTITIES`` — an e-mail address swallows the domain a URL pattern also matched. Spans
    in ``first`` (already resolved) are kept whatever their length."""
    kept: list[Span] = list(first or [])
    for span in sorted(spans, key=lambda s: (s[0] - s[1], _PRECEDENCE.get(s[2], 99), s[0])):
        if all(span[1] <= k[0] or span[0] >= k[1] for k in kept):
            kept.append(span)
    kept.sort()
    return kept


def find_patterns(text: str, entities: Iterable[str]) -> list[Span]:
    """Every validated pattern finding of the given types in ``text``, overlaps resolved."""
    spans = [span for entity in entities for span in FINDERS[entity](text)]
    if len(spans) > 1:
        spans = resolve_overlaps(spans)
    return [span for span in spans if span[2] != BLOCKER]
