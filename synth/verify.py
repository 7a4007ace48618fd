"""Verifiers: is a model's answer right? Extract the answer from a response, then check it.

Used by ``synth.cot`` (rejection sampling, self-consistency) and ``synth.preferences`` (scoring
candidates). One call does both steps::

    >>> verify("6 * 7 = 42.\\nFinal answer: 42", "42.0", "numeric")
    Verdict(passed=True, method='numeric', extracted='42', detail={'value': 42.0, 'reference': 42.0})

**Extraction** (``extract``): ``final_line`` (the text after the last ``Final answer:``),
``boxed`` (the last ``\\boxed{…}``), ``last_number``, ``regex`` (the last match of ``pattern``: its
first group, or the whole match), ``code`` (the last fenced code block, else the whole response) or
``auto`` (the method's natural choice: ``code`` for ``tests``; else ``Final answer:``, then
``\\boxed{}``, then the last line).

**Methods**:

- ``exact``: equal after normalising case, whitespace, a trailing period, ``$…$`` and ``**bold**``;
- ``numeric``: both sides parsed as numbers (``1,234``, ``3/4``, ``12.5%``, ``1e-3``,
  ``2.5 \\times 10^{3}``) and compared with ``rel_tol``/``abs_tol``; a percentage also matches
  its fraction (``25%`` ≡ ``0.25``);
- ``math``: symbolic equivalence with sympy after a small LaTeX normaliser (``\\frac``, ``\\sqrt``,
  ``^``, ``\\cdot``, ``\\left``/``\\right``…): ``\\frac{1}{2}`` ≡ ``1/2`` ≡ ``0.5``, ``2(x+1)`` ≡
  ``2x+2``. Plain numbers never reach sympy; an expression sympy cannot settle within
  ``math_time_limit`` falls back to numeric evaluation, then to ``exact``;
- ``regex``: the reference is a regular expression the extracted answer must match in full;
- ``tests``: the answer is Python code, run with the row's unit tests (asserts) appended in a
  fresh ``python -I`` in a temporary directory, with an emptied environment, a wall-clock limit
  (the process group is killed on expiry, and afterwards any process that left it) and CPU, memory,
  file-size and open-file limits (``resource.setrlimit``, set by the child itself before the code runs);
- ``none``: everything passes (the extracted answer is still recorded).

Only the answer is compared, never the reasoning. Model output is never handed to ``eval`` as
is: ``math`` lets only numbers, operators and a short list of function names reach sympy.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from manifests.time_limit import TimeLimitExceeded, call_with_time_limit

METHODS = ("exact", "numeric", "math", "regex", "tests", "none")
EXTRACTORS = ("auto", "final_line", "boxed", "last_number", "regex", "code")


@dataclass
class Verdict:
    """The outcome of one check; ``detail`` says why (values compared, test status, errors)."""

    passed: bool
    method: str
    extracted: str | None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyOptions:
    """Tolerances and limits of the methods (the defaults suit short math answers and small tests)."""

    final_marker: str = "Final answer:"
    rel_tol: float = 1e-6
    abs_tol: float = 1e-9
    math_time_limit: float = 2.0
    """Seconds sympy may spend on one comparison."""
    time_limit: float = 5.0
    """Wall-clock seconds a ``tests`` run may take before its process group is killed."""
    memory_mb: int = 1024
    """Address-space limit of a ``tests`` run."""


# ---------------------------------------------------------------------------------------- extraction

_NUM = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(rf"(?<![\w.])[-+−]?{_NUM}(?:\s*/\s*{_NUM})?\s*(?:\\?%)?")
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.S)


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[start]`` and the index after it."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (or ``\\fbox{…}``), nested braces included."""
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*", text):
        group = _braced(text, m.end())
        if group is not None:
            best = group[0].strip()
    return best


def extract_final_line(text: str, marker: str = "Final answer:") -> str | None:
    """What follows the last ``marker`` (case and markdown emphasis ignored: ``**Final answer:**``):
    the rest of its line, or the next non-empty line when the marker ends its line."""
    words = re.findall(r"\w+|[^\w\s]", marker)
    found = list(re.finditer(r"[\s*_]*".join(map(re.escape, words)) + r"[\s*_]*", text, re.I))
    if not found:
        return None
    rest, _, after = text[found[-1].end() :].partition("\n")
    if not rest.strip():
        rest = next((line for line in after.splitlines() if line.strip()), "")
    rest = re.sub(r"^[*_]+|(\*\*|__)(?=\.?\s*$)", "", rest.strip()).strip()
    boxed = extract_boxed(rest)
    return boxed if boxed is not None else (rest or None)


def extract_last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].strip() if found else None


def extract_regex(text: str, pattern: str) -> str | None:
    found = list(re.finditer(pattern, text, re.M))
    if not found:
        return None
    m = found[-1]
    return (m.group(1) if m.re.groups else m.group(0)).strip()


def extract_code(text: str) -> str:
    """The last fenced code block (a ``python`` one preferred), else the whole response."""
    blocks = _FENCE.findall(text)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    chosen = python or [body for _, body in blocks]
    return chosen[-1] if chosen else text


def extract(text: str, how: str = "auto", *, method: str = "exact", pattern: str | None = None,
            marker: str = "Final answer:") -> str | None:  # fmt: skip
    """The answer in a response, by ``how`` (see the module docstring); None when there is none."""
    if how == "final_line":
        return extract_final_line(text, marker)
    if how == "boxed":
        return extract_boxed(text)
    if how == "last_number":
        return extract_last_number(text)
    if how == "regex":
        if not pattern:
            raise ValueError("extract 'regex' needs a pattern")
        return extract_regex(text, pattern)
    if how == "code" or method == "tests":
        return extract_code(text)
    if how != "auto":
        raise ValueError(f"unknown extraction {how!r}; one of {', '.join(EXTRACTORS)}")
    found = extract_final_line(text, marker) or extract_boxed(text)
    if found is None:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        found = lines[-1] if lines else None
    return found


# ---------------------------------------------------------------------------------------- exact


def normalise_text(text: str) -> str:
    """Case, whitespace, ``**bold**``, ``$…$``, ``\\text{…}`` and a trailing period do not count."""
    s = re.sub(r"^\*\*(.*)\*\*$", r"\1", text.strip().rstrip(".").strip()).strip("`").strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$")
    s = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", s)
    s = " ".join(s.split()).lower()
    return s.rstrip(".").strip()


def check_exact(answer: str, reference: str, options: VerifyOptions) -> tuple[bool, dict[str, Any]]:
    a, b = normalise_text(answer), normalise_text(reference)
    return a == b, {"normalised": a, "reference": b}


# ---------------------------------------------------------------------------------------- numeric

_SCI = re.compile(
    rf"^([-+]?{_NUM})\s*(?:\\times|\\cdot|×|\*|x)\s*10\s*(?:\^|\*\*)\s*\{{?\s*([-+]?\d+)\s*\}}?$"
)
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def _plain_number(s: str) -> float | None:
    s = s.replace("−", "-").replace(" ", "")
    if re.fullmatch(rf"[-+]?{_NUM}", s):
        return float(s.replace(",", ""))
    m = re.fullmatch(rf"([-+]?{_NUM})/([-+]?{_NUM})", s)
    if m:
        denominator = float(m.group(2).replace(",", ""))
        return float(m.group(1).replace(",", "")) / denominator if denominator else None
    return None


def parse_number(text: str) -> tuple[float, bool] | None:
    """(value, written as a percentage) of an answer such as ``$1,234.50``, ``-3/4``, ``12.5\\%``,
    ``x = 2.5e3``, ``\\frac{3}{4}``; an answer with words around its number gives its last number."""
    s = normalise_text(text).replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("−", "-")
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    s = _FRAC.sub(r"(\1)/(\2)", s).strip()
    s = re.sub(r"^\((.*)\)/\((.*)\)$", r"\1/\2", s)
    percent = s.endswith("%")
    s = s.rstrip("%").rstrip("\\").strip()
    m = _SCI.match(s)
    if m:
        return float(m.group(1).replace(",", "")) * 10 ** int(m.group(2)), percent
    value = _plain_number(s)
    if value is not None:
        return value, percent
    found = _NUMBER.findall(s)
    if not found:
        return None
    last = found[-1].strip()
    percent = last.endswith("%")
    value = _plain_number(last.rstrip("%").rstrip("\\").strip())
    return (value, percent) if value is not None else None


def _close(a: tuple[float, bool], b: tuple[float, bool], options: VerifyOptions) -> bool:
    def readings(x: tuple[float, bool]) -> list[float]:
        return [x[0], x[0] / 100] if x[1] else [x[0]]

    return any(
        math.isclose(u, v, rel_tol=options.rel_tol, abs_tol=options.abs_tol)
        for u in readings(a)
        for v in readings(b)
    )


def check_numeric(answer: str, reference: str, options: VerifyOptions) -> tuple[bool, dict[str, Any]]:
    a, b = parse_number(answer), parse_number(reference)
    if b is None:
        return False, {"error": f"the reference {reference!r} is not a number"}
    if a is None:
        return False, {"error": "the answer is not a number", "reference": b[0]}
    return _close(a, b, options), {"value": a[0], "reference": b[0]}


# ---------------------------------------------------------------------------------------- math

_NAMES = {"sqrt", "pi", "E", "I", "oo", "sin", "cos", "tan", "log", "ln", "exp", "Abs", "Rational"}
_LATEX = [
    (r"\\left|\\right|\\!|\\,|\\;|\\:|\\displaystyle|\\limits", ""),
    (r"\\(?:cdot|times)", "*"),
    (r"\\div", "/"),
    (r"\\pi", " pi "),
    (r"\\infty", " oo "),
    (r"\^\s*\\circ|°|\\%|%|\\\$|\$", ""),
    (r"\\(?:text|mathrm|textbf|operatorname)\s*\{([^{}]*)\}", r" \1 "),
    (r"\\(ln|log|sin|cos|tan|exp)\b", r" \1 "),
]


def latex_to_plain(text: str) -> str:
    """A small LaTeX normaliser: ``\\frac{a}{b}`` → ``((a)/(b))``, ``\\sqrt[n]{x}`` → ``((x)**(1/(n)))``,
    ``x^{2}`` → ``x**(2)``, ``\\cdot`` → ``*``; ``\\left``/``\\right``, ``$`` and units in ``\\text{}`` go."""
    s = text.strip()
    for pattern, replacement in _LATEX:
        s = re.sub(pattern, replacement, s)
    s = re.sub(r"\\[dt]?frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    while True:  # innermost-first is not needed: each pass rewrites the first command with its groups
        m = re.search(r"\\[dt]?frac\s*(?=\{)|\\sqrt\s*(?:\[([^\]]*)\])?\s*(?=\{)", s)
        if not m:
            break
        first = _braced(s, m.end())
        if first is None:
            break
        if m.group(0).lstrip("\\").startswith(("frac", "dfrac", "tfrac")):
            second = _braced(s, first[1])
            if second is None:
                break
            s = s[: m.start()] + f"(({first[0]})/({second[0]}))" + s[second[1] :]
        else:
            root = m.group(1)
            body = f"(({first[0]})**(1/({root})))" if root else f"sqrt({first[0]})"
            s = s[: m.start()] + body + s[first[1] :]
    s = s.replace("\\sqrt", "sqrt").replace("{", "(").replace("}", ")").replace("^", "**")
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    return " ".join(s.split()).rstrip(".")


def _safe_for_sympy(expr: str) -> bool:
    """Only numbers, operators, parentheses, single-letter symbols and known function names, and no
    power tower: sympy's parser evaluates Python, and ``9**9**9`` would never return."""
    if len(expr) > 200 or not re.fullmatch(r"[0-9A-Za-z+\-*/().,\s]*", expr):
        return False
    if any(len(word) > 1 and word not in _NAMES for word in re.findall(r"[A-Za-z]+", expr)):
        return False
    for m in re.finditer(r"\*\*\s*", expr):
        rest = expr[m.end() :]
        if rest.startswith("("):
            depth, end = 0, len(rest)
            for i, ch in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    end = i + 1
                    break
            exponent = rest[:end]
        else:
            exponent = re.match(r"[-+]?[\w.]*", rest).group(0)
        if "**" in exponent or any(float(n) > 1000 for n in re.findall(r"\d+(?:\.\d+)?", exponent)):
            return False
        if rest[len(exponent) :].lstrip().startswith("**"):
            return False
    return True


def _sympy(expr: str):
    from sympy import E, I, Symbol, log
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    letters = "abcdfghjklmnopqrstuvwxyzABCDFGHJKLMNOPQRSTUVWXYZ"
    names = {"e": E, "i": I, "ln": log, **{c: Symbol(c) for c in letters}}
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    return parse_expr(expr, local_dict=names, transformations=transformations, evaluate=True)


def _lone_number(text: str) -> tuple[float, bool] | None:
    """The number of an answer that holds exactly one (``5 cm``), for comparing what sympy cannot parse."""
    return parse_number(text) if len(_NUMBER.findall(normalise_text(text))) == 1 else None


def math_equal(answer: str, reference: str, options: VerifyOptions) -> tuple[bool, dict[str, Any]]:
    """Symbolic equivalence (see the module docstring); ``detail['how']`` says what settled it."""
    if normalise_text(answer) == normalise_text(reference):
        return True, {"how": "text"}
    if "%" in answer or "%" in reference:  # a percentage is a number, and 25% is also 0.25
        ok, detail = check_numeric(answer, reference, options)
        return ok, detail | {"how": "numeric"}
    a, b = latex_to_plain(answer), latex_to_plain(reference)
    na, nb = _plain_number(a), _plain_number(b)
    if na is not None and nb is not None:
        return _close((na, False), (nb, False), options), {"how": "numeric", "value": na, "reference": nb}

    def compare() -> tuple[bool, dict[str, Any]]:
        from sympy import simplify

        x, y = _sympy(a), _sympy(b)
        try:
            if simplify(x - y) == 0:
                return True, {"how": "symbolic"}
        except TypeError:  # tuples, sets, relations: compared as written
            return str(x) == str(y), {"how": "structural"}
        if not x.free_symbols and not y.free_symbols:
            u, v = complex(x.evalf()), complex(y.evalf())
            close = math.isclose(u.real, v.real, rel_tol=options.rel_tol, abs_tol=options.abs_tol)
            return close and math.isclose(u.imag, v.imag, abs_tol=options.abs_tol), {"how": "evaluated"}
        return False, {"how": "symbolic"}

    if _safe_for_sympy(a) and _safe_for_sympy(b):
        # Off the main thread an expired computation is abandoned, not stopped: _safe_for_sympy keeps it small.
        try:
            return call_with_time_limit(compare, options.math_time_limit)
        except TimeLimitExceeded:
            note = f"sympy took over {options.math_time_limit:g} s"
        except Exception as e:  # sympy's parser raises anything from SyntaxError to TypeError
            note = f"sympy could not parse it ({type(e).__name__})"
    else:
        note = "not an expression sympy may parse"
    la, lb = _lone_number(answer), _lone_number(reference)
    if la is not None and lb is not None:
        return _close(la, lb, options), {"how": "numeric", "value": la[0], "reference": lb[0], "note": note}
    ok, detail = check_exact(a, b, options)
    return ok, detail | {"how": "text", "note": note}


def math_key(answer: str, options: VerifyOptions) -> str:
    """A normal form for voting: equal for answers ``math_equal`` would call equal, mostly."""
    plain = latex_to_plain(answer)
    value: float | complex | None = None if "%" in answer else _plain_number(plain)
    if value is None and "%" not in answer and _safe_for_sympy(plain):
        try:
            expr = call_with_time_limit(lambda: _sympy(plain), options.math_time_limit)
            if expr.free_symbols:
                from sympy import simplify

                return str(call_with_time_limit(lambda: simplify(expr), options.math_time_limit))
            value = complex(expr.evalf())
            value = value.real if abs(value.imag) < options.abs_tol else value
        except Exception:  # TimeLimitExceeded, or an answer sympy cannot read: vote on its number or text
            value = None
    if value is None:
        lone = _lone_number(answer)
        if lone is None:
            return normalise_text(answer)
        value = lone[0] / 100 if lone[1] else lone[0]
    return f"{value:.9g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------- regex


def check_regex(answer: str, reference: str, options: VerifyOptions) -> tuple[bool, dict[str, Any]]:
    try:
        return re.fullmatch(reference, answer.strip()) is not None, {"pattern": reference}
    except re.error as e:
        return False, {"error": f"the reference is not a valid regular expression ({e})"}


# ---------------------------------------------------------------------------------------- tests

_SANDBOX = """\
import sys
try:
    import resource
except ImportError:  # not on this platform: the wall-clock limit still holds
    resource = None
def limit(name, value):
    kind = getattr(resource, name, None)
    if kind is not None:
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass
if resource is not None:
    limit("RLIMIT_AS", {memory})
    limit("RLIMIT_CPU", {cpu})
    limit("RLIMIT_FSIZE", 16 * 1024 * 1024)
    limit("RLIMIT_NOFILE", 64)
    limit("RLIMIT_CORE", 0)
del limit, resource
sys.argv = ["candidate.py"]
with open("candidate.py", encoding="utf-8") as f:
    source = f.read()
exec(compile(source, "candidate.py", "exec"), {{"__name__": "__main__", "__builtins__": __builtins__}})
"""


def _tail(path: str, chars: int = 800) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - chars * 4))
        return f.read().decode("utf-8", "replace")[-chars:]


_MARKER = "DISTILLERY_VERIFY_RUN"
"""In the environment of every process of a ``tests`` run (children inherit it), so that one that
left the process group (``os.setsid()`` in a forked child) can still be found and killed."""


def _kill_strays(marker: bytes) -> None:
    """SIGKILL every process whose environment carries ``marker`` (Linux; elsewhere the process group
    kill is all there is). Repeated until none is found: a stray may be forking as it is hunted."""
    if not os.path.isdir("/proc"):
        return
    for _ in range(10):
        killed = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        os.kill(int(entry.name), signal.SIGKILL)
                        killed += 1
            except OSError:  # gone meanwhile, or another user's process
                continue
        if not killed:
            return


def run_python_tests(code: str, tests: str, options: VerifyOptions = VerifyOptions()) -> dict[str, Any]:
    """Run ``code`` followed by ``tests`` in a sandboxed subprocess; what happened, as a dict with
    ``status`` (``passed``, ``failed``, ``timeout``), ``returncode``, ``seconds``, ``stderr_tail``.

    The limits are set by the child itself before the code runs (rather than in ``preexec_fn``,
    which is unsafe in a process with threads, as the synth engine's is). Output goes to files in
    the temporary directory, so the file-size limit also caps what a chatty program can print.
    """
    # ignore_cleanup_errors: a leftover the sweep below missed must not fail the whole run.
    with tempfile.TemporaryDirectory(prefix="distillery-verify-", ignore_cleanup_errors=True) as tmp:
        with open(os.path.join(tmp, "candidate.py"), "w", encoding="utf-8") as f:
            f.write(code.rstrip() + "\n\n\n" + tests.strip() + "\n")
        marker = f"{_MARKER}={tmp}"
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1", _MARKER: tmp}  # fmt: skip
        boot = _SANDBOX.format(memory=options.memory_mb * 1024 * 1024, cpu=math.ceil(options.time_limit) + 1)
        out_path, err_path = os.path.join(tmp, ".stdout"), os.path.join(tmp, ".stderr")
        started = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", boot], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, start_new_session=True,
            )  # fmt: skip
            try:
                proc.wait(timeout=options.time_limit)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # The whole session: a test that forked must not leave a child behind.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                _kill_strays(marker.encode())
        seconds = round(time.monotonic() - started, 3)
        rc = proc.returncode
        if timed_out:
            status = "timeout"
        elif rc == 0:
            status = "passed"
        else:
            status = "failed"
        result = {"status": status, "returncode": rc, "seconds": seconds, "stderr_tail": _tail(err_path)}
        if rc is not None and rc < 0 and not timed_out:
            result["signal"] = signal.Signals(-rc).name if -rc in signal.valid_signals() else -rc
        return result


def tests_text(tests: Any) -> str:
    """A row's tests as code: a string as is, a list (or a JSON list) of assert lines joined."""
    if isinstance(tests, str) and tests.lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            tests = json.loads(tests)
    if isinstance(tests, list | tuple):
        return "\n".join(str(t) for t in tests)
    return "" if tests is None else str(tests)


# ---------------------------------------------------------------------------------------- verifiers

_CHECKS = {"exact": check_exact, "numeric": check_numeric, "math": math_equal, "regex": check_regex}


@dataclass(frozen=True)
class Verifier:
    """One method with its extraction and options: ``verifier(response, reference, tests)``."""

    method: str = "exact"
    extract: str = "auto"
    pattern: str | None = None
    options: VerifyOptions = field(default_factory=VerifyOptions)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown verifier {self.method!r}; one of {', '.join(METHODS)}")
        if self.extract not in EXTRACTORS:
            raise ValueError(f"unknown extraction {self.extract!r}; one of {', '.join(EXTRACTORS)}")
        if self.extract == "regex" and not self.pattern:
            raise ValueError("extract 'regex' needs a pattern")

    def answer_of(self, response: str) -> str | None:
        """The answer in ``response`` (None when there is none)."""
        return extract(response or "", self.extract, method=self.method, pattern=self.pattern,
                       marker=self.options.final_marker)  # fmt: skip

    def check(self, answer: str | None, reference: Any = None, tests: Any = None) -> Verdict:
        """Compare an already extracted answer with the reference (or run the tests)."""
        if answer is None or not str(answer).strip():
            return Verdict(False, self.method, answer, {"error": "no answer found in the response"})
        if self.method == "none":
            return Verdict(True, "none", answer)
        if self.method == "tests":
            code = tests_text(tests)
            if not code.strip():
                return Verdict(False, "tests", answer, {"error": "the row has no tests"})
            result = run_python_tests(answer, code, self.options)
            return Verdict(result["status"] == "passed", "tests", answer, result)
        if reference is None or not str(reference).strip():
            return Verdict(False, self.method, answer, {"error": "the row has no reference answer"})
        passed, detail = _CHECKS[self.method](str(answer), str(reference), self.options)
        return Verdict(bool(passed), self.method, answer, detail)

    def key(self, answer: str | None) -> str | None:
        """The answer's normal form for majority votes (answers the method calls equal, mostly)."""
        if answer is None or not answer.strip():
            return None
        if self.method == "numeric":
            number = parse_number(answer)
            return f"{number[0]:.9g}{'%' if number[1] else ''}" if number else normalise_text(answer)
        if self.method == "math":
            return math_key(answer, self.options)
        if self.method == "tests":
            return "\n".join(line.rstrip() for line in answer.strip().splitlines())
        return normalise_text(answer)

    def __call__(self, response: str, reference: Any = None, tests: Any = None) -> Verdict:
        return self.check(self.answer_of(response), reference, tests)


def verify(response: str, reference: Any, method: str = "exact", *, extract: str = "auto",
           pattern: str | None = None, tests: Any = None, options: VerifyOptions | None = None) -> Verdict:  # fmt: skip
    """Extract the answer from ``response`` and check it with ``method`` (see the module docstring)."""
    verifier = Verifier(method, extract, pattern, options or VerifyOptions())
    return verifier(response, reference, tests)
