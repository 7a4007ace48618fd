"""Word splitting as datatrove does it, for the quality filters' compatibility mode.

datatrove's English word tokenizer is spaCy's blank "en" tokenizer. It splits on whitespace, then
peels prefixes and suffixes off each chunk, splits infixes, and keeps the English exceptions
("don't" -> "do", "n't"; "Mr." stays whole). ``DatatroveWordSplitter`` restates that algorithm
(written for this project; neither spaCy nor datatrove is imported) and caches each chunk's result,
as spaCy does. It matched spaCy token for token on the benchmark documents (benchmarks/quality.md).
"""

from __future__ import annotations

import re
import string
import unicodedata
from functools import cache


def _py_class(chars) -> str:
    """A Python regex character class body matching exactly ``chars``, as ranges."""
    points = sorted(set(map(ord, chars)))
    out, i = [], 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        out.append(re.escape(chr(points[i])) + (f"-{re.escape(chr(points[j]))}" if j > i else ""))
        i = j + 1
    return "".join(out)


# The Unicode Sentence_Terminal property (PropList.txt): the marks that end a sentence in any
# script. FineWeb's "line ends in punctuation" and spaCy's sentencizer both use this set.
_TERMINAL_RANGES = (
    "21 2E 3F 589 61D-61F 6D4 700-702 7F9 837 839 83D-83E 964-965 104A-104B 1362 1367-1368 166E "
    "1735-1736 17D4-17D6 17D9-17DA 1803 1809 1944-1945 1AA8-1AAB 1B5A-1B5B 1B5E-1B5F 1B7D-1B7E "
    "1C3B-1C3C 1C7E-1C7F 203C-203D 2047-2049 2E2E 2E3C 2E53-2E54 3002 A4FF A60E-A60F A6F3 A6F7 "
    "A876-A877 A8CE-A8CF A92F A9C8-A9C9 AA5D-AA5F AAF0-AAF1 ABEB FE52 FE56-FE57 FF01 FF0E FF1F FF61 "
    "10A56-10A57 10F55-10F59 10F86-10F89 11047-11048 110BE-110C1 11141-11143 111C5-111C6 111CD "
    "111DE-111DF 11238-11239 1123B-1123C 112A9 1144B-1144C 115C2-115C3 115C9-115D7 11641-11642 "
    "1173C-1173E 11944 11946 11A42-11A43 11A9B-11A9C 11C41-11C42 11EF7-11EF8 11F43-11F44 "
    "16A6E-16A6F 16AF5 16B37-16B38 16B44 16E98 1BC9F 1DA88"
)
TERMINAL_PUNCTUATION = frozenset(
    chr(c)
    for part in _TERMINAL_RANGES.split()
    for c in range(int(part.split("-")[0], 16), int(part.split("-")[-1], 16) + 1)
)


_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉〈〉⟦⟧"
_PUNCT = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
_CURRENCY = "$£€¥฿₽﷼" + "".join(map(chr, range(0x20A0, 0x20C0)))
_UNITS = (
    "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s km/h "
    "kmh mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K %"
)
_ABBREVIATIONS = (
    "Adm. Ak. Ala. Apr. Ariz. Ark. Aug. Bros. Calif. Co. Colo. Conn. Corp. D.C. Dec. Del. Dr. E.G. "
    "E.g. Feb. Fla. Ga. Gen. Gov. I.E. I.e. Ia. Id. Ill. Inc. Ind. Jan. Jr. Jul. Jun. Kan. Kans. Ky. "
    "La. Ltd. Mar. Mass. Md. Messrs. Mich. Minn. Miss. Mo. Mont. Mr. Mrs. Ms. Mt. N.C. N.D. N.H. "
    "N.J. N.M. N.Y. Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. Ph.D. Prof. Rep. Rev. S.C. Sen. Sep. "
    "Sept. St. Tenn. Va. Wash. Wis. a.m. co. e.g. i.e. p.m. v.s. vs. ä. ö. ü. and/or w/o C++ ' '' "
    "'s 'S ‘s ‘S 'd 're 'em 'll 'nuff em ll nuff 'bout 'cause 'Cause 'cos 'Cos 'coz 'Coz 'cuz 'Cuz "
    "ma'am Ma'am o'clock O'clock"
)
_EMOTICONS = (
    ":) :-) :)) :-)) :))) :-))) (: (-: =) (= :] :-] [: [-: [= =] :o) (o: :} :-} 8) 8-) (-8 ;) ;-) (; (-; "
    ":( :-( :(( :-(( :((( :-((( ): )-: =( >:( :') :'-) :'( :'-( :/ :-/ =/ :| :-| =| :P :-P :p :-p :O "
    ":-O :o :-o :0 :-0 :() >:o :* :-* :3 :-3 =3 :> :-> :X :-X :x :-x :D :-D ;D ;-D =D xD XD xDD XDD 8D "
    "8-D ^_^ ^__^ ^___^ >.< >.> <.< ._. ;_; -_- -__- :-] <3 <33 <333 </3 o.O O.o o_O O_o o_o O_O 0_o "
    "o_0 0_0 o.o O.O 0.0 o.0 0.o @_@ V_V v_v V.V v.v"
)
_EXCLUDED = {"ill", "Ill", "its", "Its", "hell", "Hell", "shell", "Shell", "shed", "Shed", "were", "Were"}
_EXCLUDED |= {"well", "Well", "whore", "Whore"}


def _contractions() -> dict[str, tuple[str, ...]]:
    """English contractions as spaCy splits them: ``can't`` -> ``ca n't``, ``youre`` -> ``you re``."""
    out: dict[str, tuple[str, ...]] = {}

    def add(first: str, *rest: str, bare: bool = True) -> None:
        for head in dict.fromkeys((first, first.title())):
            for apostrophe in ("'", "’", "") if bare else ("'", "’"):
                parts = (head, *(p.replace("'", apostrophe) for p in rest))
                out["".join(parts)] = parts

    # words -> the contractions spaCy splits off them ("|" separates the tokens)
    table = {
        "i": "'m 'm|a 'll 'll|'ve 'd 'd|'ve 've",
        "you we they": "'ll 'll|'ve 'd 'd|'ve 've 're",
        "he she it that this": "'ll 'll|'ve 'd 'd|'ve 's",
        "who what when where why how there": "'ll 'll|'ve 'd 'd|'ve 's 're 've",
        "these those": "'ll 'll|'ve 'd 'd|'ve 're 've",
        "ca could do does did had may might must need ought sha should wo would": "n't n't|'ve",
        "could might must should would not": "'ve",
        "ai are is was were have has dare": "n't",
    }
    for words, suffixes in table.items():
        for word in words.split():
            for suffix in suffixes.split():
                add(word, *suffix.split("|"))
    for first, rest, bare in [("can", "not", True), ("gon", "na", True), ("got", "ta", True)]:
        add(first, rest, bare=bare)
    add("let", "'s", bare=False)
    add("how", "'d", "'y", bare=False)
    for pair in [("y'", "all"), ("y", "all"), ("c'm", "on"), ("C'm", "on")]:
        for apostrophe in ("'", "’"):
            parts = tuple(p.replace("'", apostrophe) for p in pair)
            out["".join(parts)] = parts
    for hour in range(1, 13):
        for period in ("a.m.", "am", "p.m.", "pm"):
            out[f"{hour}{period}"] = (str(hour), period)
    for unit in "cfkCFK":
        out[f"°{unit}."] = ("°", unit, ".")
    return {k: v for k, v in out.items() if k not in _EXCLUDED}


def _whole_words() -> set[str]:
    words = set(_ABBREVIATIONS.split()) | set(_EMOTICONS.split()) | {f"{c}." for c in string.ascii_lowercase}
    for word in ("doin", "goin", "nothin", "nuthin", "ol", "somethin", "lovin", "havin"):
        words |= {word, word.title(), word + "'", word.title() + "'"}
    return words | {w.replace("'", "’") for w in words}


@cache
def _spacy_rules() -> tuple:
    """Compiled prefix/suffix/infix/URL patterns and the exceptions (built once, on first use)."""
    bmp = [chr(c) for c in range(0x10000)]
    alpha = "".join(c for c in bmp if c.isalpha())
    lower = _py_class(c for c in alpha if not c.isupper())
    upper = _py_class(c for c in alpha if not c.islower())
    alpha = _py_class(alpha)
    icons = _py_class(c for c in bmp if unicodedata.category(c) == "So") + "\U0001f000-\U0001faff"
    quotes, punct = _py_class(_QUOTES), _py_class(_PUNCT)
    singles = f"[§%=—–{punct}{quotes}{_py_class(_CURRENCY)}{icons}]"
    prefix = re.compile(rf"\.\.+|US\$|C\$|A\$|\+(?![0-9])|{singles}")
    units = "|".join(re.escape(u) for u in _UNITS.split())
    suffix = re.compile(
        rf"(?:……|\.\.+|[{punct}{quotes}{icons}]|['’][sS]|—|–|(?<=[0-9])\+|(?<=°[FfCcKk])\."
        rf"|(?<=[0-9])(?:[{_py_class(_CURRENCY)}]|US\$|C\$|A\$)|(?<=[0-9])(?:{units})"
        rf"|(?<=[0-9{lower}%²\-+{punct}|{quotes}])\.|(?<=[{upper}][{upper}])\.)$"
    )
    infix = re.compile(
        rf"\.\.+|…|[{icons}]|(?<=[0-9])[+\-*^](?=[0-9-])|(?<=[{lower}{quotes}])\.(?=[{upper}{quotes}])"
        rf"|(?<=[{alpha}]),(?=[{alpha}])|(?<=[{alpha}0-9])(?:-|–|—|--|---|——|~)(?=[{alpha}])"
        rf"|(?<=[{alpha}0-9])[:<>=/](?=[{alpha}])"
    )
    host = "[A-Za-z0-9\u00a1-\uffff]"
    url = re.compile(
        rf"(?:[\w+\-.]{{2,}}://)?(?:\S+(?::\S*)?@)?(?:(?:{host}[A-Za-z0-9\u00a1-\uffff_-]{{0,62}})?{host}\.)+"
        rf"[{lower}]{{2,63}}(?::\d{{2,5}})?(?:[/?#]\S*)?$"
    )
    special = _contractions() | {w: (w,) for w in _whole_words()}
    return prefix.match, suffix.search, infix.finditer, url.match, special


def _is_punct(token: str) -> bool:
    return all(unicodedata.category(c)[0] == "P" for c in token)


class DatatroveWordSplitter:
    """Split text into words the way datatrove's English word tokenizer does.

    >>> DatatroveWordSplitter().words("Don't stop, Mr. Smith...")
    ['Do', "n't", 'stop', ',', 'Mr.', 'Smith', '...']
    """

    max_cache = 500_000

    def __init__(self) -> None:
        self._prefix, self._suffix, self._infix, self._url, self._special = _spacy_rules()
        self._cache: dict[str, tuple[str, ...]] = {}

    def words(self, text: str) -> list[str]:
        out: list[str] = []
        cache = self._cache
        for chunk in text.split():
            tokens = cache.get(chunk)
            if tokens is None:
                if len(cache) >= self.max_cache:
                    cache.clear()
                tokens = cache[chunk] = self._split(chunk)
            out += tokens
        return out

    def sentences(self, line: str) -> int:
        """Sentences in ``line`` as spaCy's sentencizer counts them (a boundary after a terminal
        mark that stands as its own word, before the next word that is not punctuation)."""
        count, seen_terminal = 1 if line.strip() else 0, False
        for word in self.words(line):
            if word in TERMINAL_PUNCTUATION:
                seen_terminal = True
            elif seen_terminal and not _is_punct(word):
                count, seen_terminal = count + 1, False
        return count

    def _split(self, chunk: str) -> tuple[str, ...]:
        special = self._special
        if chunk in special:
            return special[chunk]
        if chunk.isalpha():  # no affix or infix rule involves a letter
            return (chunk,)
        prefixes: list[str] = []
        suffixes: list[str] = []
        last = -1
        # Peel affixes until nothing changes or what is left is an exception (spaCy's order).
        while chunk and len(chunk) != last and chunk not in special:
            last = len(chunk)
            match = self._prefix(chunk)
            pre = match.end() if match else 0
            if pre and chunk[pre:] in special:
                prefixes.append(chunk[:pre])
                chunk = chunk[pre:]
                break
            match = self._suffix(chunk[pre:])
            suf = match.end() - match.start() if match else 0
            if suf and chunk[:-suf] in special:
                suffixes.append(chunk[-suf:])
                chunk = chunk[:-suf]
                break
            if pre and suf and pre + suf <= len(chunk):
                prefixes.append(chunk[:pre])
                suffixes.append(chunk[-suf:])
                chunk = chunk[pre:-suf]
            elif pre:
                prefixes.append(chunk[:pre])
                chunk = chunk[pre:]
            elif suf:
                suffixes.append(chunk[-suf:])
                chunk = chunk[:-suf]
        middle: list[str] = []
        if chunk in special:
            middle.extend(special[chunk])
        elif chunk and self._url(chunk):
            middle.append(chunk)
        elif chunk:
            start = 0
            for match in self._infix(chunk):
                begin, end = match.span()
                if begin == 0:
                    continue
                if begin != start:
                    middle.append(chunk[start:begin])
                if begin != end:
                    middle.append(chunk[begin:end])
                start = end
            if chunk[start:]:
                middle.append(chunk[start:])
        tokens = (*prefixes, *middle, *reversed(suffixes))
        return self._merge_exceptions(tokens) if len(tokens) > 1 else tokens

    def _merge_exceptions(self, tokens: tuple[str, ...]) -> tuple[str, ...]:
        """spaCy's last pass: a run of tokens spelling an exception (``)`` + ``:`` = ``):``,
        ``a`` + ``.`` = ``a.``) becomes that exception; longest, then leftmost runs win."""
        special, n = self._special, len(tokens)
        runs = [
            (i - j, i, j)
            for i in range(n)
            for j in range(i + 2, min(n, i + 8) + 1)
            if "".join(tokens[i:j]) in special
        ]
        if not runs:
            return tokens
        taken: set[int] = set()
        chosen = []
        for _, i, j in sorted(runs):
            if i not in taken and j - 1 not in taken:
                chosen.append((i, j))
            taken.update(range(i, j))
        out: list[str] = []
        position = 0
        for i, j in sorted(chosen):
            out += tokens[position:i]
            out += special["".join(tokens[i:j])]
            position = j
        return (*out, *tokens[position:])
