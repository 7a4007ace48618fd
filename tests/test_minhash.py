"""MinHash LSH near-duplicates: signatures, banding, verification, clusters and keep rules."""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

import corpus.minhash as minhash
from corpus.minhash import (
    MinHashConfig,
    band_keys,
    candidate_pairs,
    find_duplicates,
    key_matrix,
    optimal_banding,
    shingle_sets,
    signatures,
)
from corpus.minhash_clusters import connected_components, pair_jaccard
from corpus.steps import normalise, simplify_text

ROOT = Path(__file__).resolve().parent.parent


def reference_simplify(text: str) -> str:
    """``normalize: simplify`` written independently: NFKC, lower case, punctuation, symbols and
    invisible characters (format, and control characters that are not whitespace) removed, decimal
    digits made 0, whitespace runs made one space."""
    kept = []
    for char in unicodedata.normalize("NFKC", text).lower():
        category = unicodedata.category(char)
        if category[0] in "PS" or category == "Cf" or (category == "Cc" and not char.isspace()):
            continue
        kept.append("0" if category == "Nd" else char)
    return " ".join("".join(kept).split())


@lru_cache(maxsize=4096)  # the fixtures compare every pair of the sample's documents
def reference_shingles(text: str, n: int = 5, normalize: str = "simplify") -> frozenset[tuple[str, ...]]:
    words = (reference_simplify(text) if normalize == "simplify" else text.lower()).split()
    if len(words) < n:
        return frozenset({tuple(words)} if words else ())
    return frozenset(zip(*(words[i:] for i in range(n)), strict=False))


def reference_jaccard(a: str, b: str) -> float:
    sa, sb = reference_shingles(a), reference_shingles(b)
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def seeds() -> list[str]:
    """30 distinct documents of the embedded sample (no two share a fifth of their shingles)."""
    docs = [
        json.loads(line)["text"] for line in (ROOT / "examples/sample/web.jsonl").read_text().splitlines()
    ]
    kept: list[str] = []
    for doc in docs:
        if len(doc.split()) >= 80 and all(reference_jaccard(doc, k) < 0.2 for k in kept):
            kept.append(doc)
    return kept[:30]


def substitute(text: str, count: int, rng: random.Random) -> str:
    words = text.split()
    for _ in range(count):
        words[rng.randrange(len(words))] = f"zz{rng.randrange(10**6)}"
    return " ".join(words)


def texts_of(texts: list[str]):
    return lambda rows: [texts[i] for i in rows]


@pytest.fixture(scope="module")
def labelled(seeds) -> tuple[list[str], dict[int, int]]:
    """Originals, then one light copy of each of the first 15 (shuffled in): copy row -> original row."""
    rng = random.Random(3)
    docs = [(text, None) for text in seeds]
    docs += [(substitute(text, 1, rng), i) for i, text in enumerate(seeds[:15])]
    order = list(range(len(docs)))
    rng.shuffle(order)
    row_of = {old: new for new, old in enumerate(order)}
    texts = [docs[old][0] for old in order]
    copy_of = {row_of[old]: row_of[docs[old][1]] for old in order if docs[old][1] is not None}
    assert all(reference_jaccard(texts[c], texts[o]) >= 0.8 for c, o in copy_of.items())
    return texts, copy_of


# ------------------------------------------------------------------ detection


@pytest.mark.parametrize("verify", [True, False])
def test_near_duplicates_found_and_unrelated_kept(labelled, verify):
    texts, copy_of = labelled
    # Unverified, datasketch's balanced banding (9 x 13) would miss some copies; ask for 16 x 8.
    cfg = MinHashConfig(verify=verify) if verify else MinHashConfig(verify=False, bands=16, rows=8)
    removed, kept, similarity = find_duplicates(band_keys(pa.array(texts), cfg), None, cfg, texts_of(texts))
    expected = sorted(max(c, o) for c, o in copy_of.items())
    assert removed.tolist() == expected
    assert kept.tolist() == [min(c, o) for c, o in sorted(copy_of.items(), key=lambda p: max(p))]
    # Unverified, the similarity is estimated from the share of equal bands: coarse, but high.
    assert (similarity > (0.8 if verify else 0.6)).all()
    if verify:
        exact = [reference_jaccard(texts[r], texts[k]) for r, k in zip(removed, kept, strict=True)]
        np.testing.assert_allclose(similarity, exact)


def test_char_shingles_find_a_near_duplicate_in_non_ascii_text(seeds):
    original = seeds[0].replace("e", "é").replace("a", "å") + " 東京の天気は晴れです。"
    copy = original.replace("é", "e", 2)
    cfg = MinHashConfig(shingle="char", ngram=7)
    texts = [original, seeds[1], copy]
    removed, kept, _ = find_duplicates(band_keys(pa.array(texts), cfg), None, cfg, texts_of(texts))
    assert removed.tolist() == [2] and kept.tolist() == [0]


@pytest.mark.parametrize("normalize", ["simplify", "none"])
def test_shingle_sets_match_the_reference_definition(seeds, normalize):
    cfg = MinHashConfig(normalize=normalize)
    texts = seeds + TRICKY
    for text, hashed in zip(texts, shingle_sets(texts, cfg), strict=True):
        assert len(hashed) == len(reference_shingles(text, normalize=normalize)), text
    a, b = seeds[0], substitute(seeds[0], 3, random.Random(1))
    sa, sb = shingle_sets([a, b], cfg)
    assert len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb)) == pytest.approx(reference_jaccard(a, b))


# ------------------------------------------------------------------ normalisation

WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
TRICKY = [
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ ａｎｄ ｄｉｇｉｔｓ １２３ ＡＢＣ",
    "the ﬁrst oﬃce ﬂoor has ﬀ and ﬆ ligatures",
    "em—dash, en–dash - hyphen ‒ figure dash ― bar … ellipsis -- double",
    "don't, don’t, rock ’n’ roll, l'été, «guillemets» „low“ 'single' \"double\"",
    "Русский текст: «Привет, мир!» 2024 г.",
    "日本語の文章です。東京は晴れ、気温は２５度（摂氏）。",
    "العربية: ١٢٣ مرحبا، كيف حالك؟",
    "हिन्दी पाठ। १२३ क्षत्रिय",
    "cafe\u0301 vs café, q\u0301, A\u030a vs Å vs \u212b (angstrom sign), n\u0303",
    "soft\u00adhyphen zero\u200bwidth \ufeffbom \u200eltr\u200f mark",
    "control\x00chars\x07here\x1b[0m and \x7f",
    "math: x² + y² = z², ½ ¼ 3.14159, ① ② Ⅻ ⅻ, 10⁻³",
    "currency $5 €3,50 £2 ¥100 and emoji 😀👍🏽 ok ™ ©",
    "Ελληνικά: καλημέρα κόσμε; ΑΒΓ (a Greek question mark ;)",
    "Straße ẞ Ǆ ǅ ǆ ﬅ",
    "   leading and trailing   ",
    "",
    "!!! ... --- ???",
    "".join(f"w{i}{c}" for i, c in enumerate(WHITESPACE)),
]


def test_simplify_text_matches_an_independent_reference():
    got = simplify_text(pa.array(TRICKY)).to_pylist()
    assert got == [reference_simplify(t) for t in TRICKY]
    assert got[1] == "the first office floor has ff and st ligatures"
    assert got[3] == "dont dont rock n roll lété guillemets low single double"
    assert normalise(pa.array(TRICKY), True, "simplify").equals(simplify_text(pa.array(TRICKY)))
    # Case is kept when asked; everything else is the same.
    cased = simplify_text(pa.array(TRICKY), case_fold=False).to_pylist()
    assert [t.lower() for t in cased] == got and cased[0].startswith("FULLWIDTH")


def test_simplify_text_fast_paths_match_the_reference_on_mixed_batches():
    """The byte map for ASCII digits, NFKC on non-ASCII texts only, string or large_string, a sliced
    array with nulls: each text comes out as the reference simplifies it alone; word tokens skip the
    whitespace collapse and still split into the same words."""
    rng = random.Random(3)
    alphabet = "aZ 09\t\n.,-\u2014\u2019\uff21\uff11\ufb01\u0663\u00e9\u0301\u00a0\u3000\u200b\u2028\x85!$"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(400)]
    texts += ["plain ascii 42 words", None, *TRICKY]
    for kind in (pa.string(), pa.large_string()):
        batch = pa.array(texts, kind).slice(3)
        got = simplify_text(batch).to_pylist()
        assert got == [None if t is None else reference_simplify(t) for t in texts[3:]]
        loose = simplify_text(batch, collapse_whitespace=False).to_pylist()
        assert [t if t is None else " ".join(t.split()) for t in loose] == got


def disguise(text: str) -> str:
    """The same words as ``text`` in other case, quotes, dashes, digits, punctuation and Unicode forms."""
    words = text.replace("'", "’").replace(" - ", " — ").split()
    for i, word in enumerate(words):
        if i % 7 == 0:
            word = word.upper()
        if i % 11 == 0:
            word = f"({word}),"
        if i % 17 == 0:  # fullwidth forms, as some scraped pages write them
            word = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in word)
        words[i] = word.replace("fi", "ﬁ")
    return " ".join(words).translate(str.maketrans("0123456789", "5678901234"))


def test_a_copy_differing_only_in_punctuation_case_digits_and_forms_is_a_duplicate(seeds):
    original = seeds[5] + " Prices rose 12.5% in 2019 -- see p. 4 of the report."
    copy = disguise(original)
    assert reference_simplify(copy) == reference_simplify(original) and copy.lower() != original.lower()
    texts = [original, seeds[6], copy]
    for shingle, ngram in (("word", 5), ("char", 7)):
        default = MinHashConfig(shingle=shingle, ngram=ngram)
        none = MinHashConfig(shingle=shingle, ngram=ngram, normalize="none")
        a, b = shingle_sets([original, copy], default)
        assert np.array_equal(a, b)  # Jaccard 1.0
        a, b = shingle_sets([original, copy], none)
        assert len(np.intersect1d(a, b)) / len(np.union1d(a, b)) < 0.8
        removed, kept, similarity = find_duplicates(band_keys(texts, default), None, default, texts_of(texts))
        assert removed.tolist() == [2] and kept.tolist() == [0] and similarity.tolist() == [1.0]
        assert find_duplicates(band_keys(texts, none), None, none, texts_of(texts))[0].tolist() == []


# Band keys and shingle sets of ``normalize: none`` (sha256 of keys, shingles, offsets), computed by
# the implementation from before the option: ``none`` is what MinHash dedup did then, byte for byte.
BEFORE_NORMALIZE = [
    "The Quick, brown fox -- jumps over the lazy dog's back in 2024!",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ and the ﬁnal oﬃce — with em-dashes… and “quotes”",
    "Ça coûte 12,50 € — naïve café résumé e\u0301 q\u0301",
    "Ελληνικά κείμενα, русский текст; 東京の天気は晴れです。 ١٢٣ مرحبا",
    "",
    "   \n\t ",
    "one",
    "tabs\tand\nnew\u00a0lines\u2003and   spaces  ",
    "Don't   stop — it’s 3.14159 ½ ² Ⅻ ① ﬀ",
]


@pytest.mark.parametrize(
    ("settings", "digest"),
    [
        ({}, "5d795865ef1d4a982e1d00ef5f416a3ac8568e0c529e19ee7f988baebfa66329"),
        ({"shingle": "char", "ngram": 7}, "477434bf7d1f3c042c54c9c2c32a693a9c29faf2db4db6a709c33a30176c8c96"),
        (
            {"lowercase": False, "ngram": 3},
            "d537a78eb0503f7d02ae39bae05efc74deffa58a490e45d6837ba006815718b0",
        ),
    ],
)
def test_normalize_none_keeps_the_band_keys_from_before_the_option(settings, digest):
    cfg = MinHashConfig(normalize="none", **settings)
    keys = band_keys(pa.array(BEFORE_NORMALIZE), cfg)
    values, offsets = minhash.flat_shingle_sets(BEFORE_NORMALIZE, cfg)
    got = hashlib.sha256(keys.buffers()[1].to_pybytes() + values.tobytes() + offsets.tobytes()).hexdigest()
    assert got == digest


def test_signature_agreement_estimates_jaccard_without_bias(seeds):
    """The 32-bit permutations behave like ideal ones: mean error ~0, binomial spread."""
    rng = random.Random(0)
    pairs = [(t, substitute(t, k, rng)) for t in seeds for k in (1, 3, 6, 12)]
    cfg = MinHashConfig(bands=32, rows=4)
    sig_a, _ = signatures(pa.array([a for a, _ in pairs]), cfg)
    sig_b, _ = signatures(pa.array([b for _, b in pairs]), cfg)
    exact = np.array([reference_jaccard(a, b) for a, b in pairs])
    error = (sig_a == sig_b).mean(axis=0) - exact
    z = error / np.sqrt(exact * (1 - exact) / 128)
    assert abs(error.mean()) < 0.01
    assert 0.7 < z.std() < 1.3


def test_empty_and_short_documents(seeds):
    cfg = MinHashConfig()
    texts = ["", "   \n", "hello world", seeds[0], "Hello   World", None, "hello there world"]
    keys = key_matrix(band_keys(pa.array(texts), cfg), cfg.banding()[0])
    assert (keys[[0, 1, 5]] == 0).all() and (keys[[2, 3, 4, 6]] != 0).all()
    removed, kept, similarity = find_duplicates(keys, None, cfg, texts_of([t or "" for t in texts]))
    assert removed.tolist() == [4] and kept.tolist() == [2] and similarity.tolist() == [1.0]


def test_no_candidates_at_all(seeds):
    # Regression: with verification on and not a single candidate pair, phase 2 crashed.
    cfg = MinHashConfig()
    removed, kept, similarity = find_duplicates(band_keys(seeds[:5], cfg), None, cfg, texts_of(seeds))
    assert removed.tolist() == kept.tolist() == similarity.tolist() == []


def test_any_string_input(seeds):
    cfg = MinHashConfig()
    expected = band_keys(pa.array(seeds[:4]), cfg)
    assert band_keys(seeds[:4], cfg).equals(expected)
    assert band_keys(pa.array(seeds[:4], pa.string_view()), cfg).equals(expected)
    assert band_keys(pa.array(seeds[:4]).dictionary_encode(), cfg).equals(expected)
    empty = band_keys(pa.array([], pa.string()), cfg)
    assert len(empty) == 0 and empty.type == pa.binary(128)
    assert [len(a) for a in find_duplicates(empty, None, cfg, texts_of([]))] == [0, 0, 0]


# ------------------------------------------------------------------ determinism


def test_band_keys_do_not_depend_on_batching(seeds, monkeypatch):
    texts = pa.array(seeds * 3, type=pa.large_string())
    cfg = MinHashConfig()
    whole = band_keys(texts, cfg)
    batched = pa.concat_arrays([band_keys(texts.slice(i, 7), cfg) for i in range(0, len(texts), 7)])
    assert batched.equals(whole)
    reordered = [band_keys(texts.slice(i, 11), cfg) for i in range(0, len(texts), 11)][::-1]
    assert pa.concat_arrays(reordered[::-1]).equals(whole)
    assert band_keys(pa.chunked_array([texts.cast(pa.string())]), cfg).equals(whole)
    # A document split across the internal shingle chunks gets the same minima.
    monkeypatch.setattr(minhash, "CHUNK_SHINGLES", 37)
    assert band_keys(texts, cfg).equals(whole)


def test_clusters_do_not_depend_on_pair_order():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 300, 400)
    v = rng.integers(0, 300, 400)
    members, root = connected_components(u, v)
    perm = rng.permutation(len(u))
    members2, root2 = connected_components(v[perm], u[perm])
    assert members.tolist() == members2.tolist() and root.tolist() == root2.tolist()
    # The root is the lowest row of a component: a chain 9-8-...-0 ends at 0.
    chain = np.arange(9, 0, -1)
    assert connected_components(chain, chain - 1)[1].tolist() == [0] * 10


# ------------------------------------------------------------------ verification and keep rules


def test_verify_removes_a_planted_false_candidate(seeds):
    cfg = MinHashConfig(bands=16, rows=8)
    bands, rows = cfg.banding()
    texts = [seeds[0], seeds[1]]
    keys = key_matrix(band_keys(pa.array(texts), cfg), bands).copy()
    keys[1, 3] = keys[0, 3]  # the two unrelated documents now collide in one band
    assert find_duplicates(keys, None, cfg, texts_of(texts))[0].tolist() == []
    unverified = cfg.model_copy(update={"verify": False})
    removed, kept, similarity = find_duplicates(keys, None, unverified)
    assert removed.tolist() == [1] and kept.tolist() == [0]
    assert similarity[0] == pytest.approx((1 / bands) ** (1 / rows))


def test_keep_rules(seeds):
    base = seeds[2]
    texts = [seeds[3], base, base + " and a few more words at the end", base + " extra words", base]
    lengths = np.array([len(t) for t in texts])
    keys = band_keys(pa.array(texts), MinHashConfig())
    first = find_duplicates(keys, None, MinHashConfig(), texts_of(texts))
    assert first[0].tolist() == [2, 3, 4] and first[1].tolist() == [1, 1, 1]
    longest = find_duplicates(keys, lengths, MinHashConfig(keep="longest"), texts_of(texts))
    assert longest[0].tolist() == [1, 3, 4] and longest[1].tolist() == [2, 2, 2]
    # Ties go to the lowest row.
    tied = find_duplicates(keys, np.array([5, 9, 1, 1, 9]), MinHashConfig(keep="longest"), texts_of(texts))
    assert tied[0].tolist() == [2, 3, 4] and tied[1].tolist() == [1, 1, 1]


def test_bucket_blow_up_is_bounded(seeds):
    texts = [seeds[4]] * 1000
    cfg = MinHashConfig()
    keys = band_keys(pa.array(texts), cfg)
    u, _ = candidate_pairs(key_matrix(keys, cfg.banding()[0]))
    assert len(u) == 999  # one star per bucket, the same star in every band
    removed, kept, similarity = find_duplicates(keys, None, cfg, texts_of(texts))
    assert removed.tolist() == list(range(1, 1000)) and set(kept.tolist()) == {0}
    assert (similarity == 1.0).all()  # its speed is measured by benchmarks/dedup/run.py --blow-up


def test_pair_jaccard_counts_intersections():
    values = np.array([1, 2, 3, 2, 3, 4, 9], dtype=np.uint64)
    offsets = np.array([0, 3, 6, 7, 7])
    got = pair_jaccard(values, offsets, np.array([0, 0, 2, 3]), np.array([1, 2, 2, 3]))
    assert got.tolist() == [0.5, 0.0, 1.0, 0.0]


# ------------------------------------------------------------------ config and bad input


def test_banding_follows_datasketch():
    # datasketch.lsh._optimal_param with its default equal weights.
    assert optimal_banding(0.8, 128, 0.5) == (9, 13)
    assert optimal_banding(0.5, 128, 0.5) == (25, 5)
    assert optimal_banding(0.9, 128, 0.5) == (5, 25)
    assert MinHashConfig(verify=False).banding() == (9, 13)
    assert MinHashConfig().banding() == (16, 8)  # verification: misses weigh more than candidates
    assert MinHashConfig(bands=20, rows=6).banding() == (20, 6)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bands": 16}, "both"),
        ({"rows": 8}, "both"),
        ({"bands": 20, "rows": 7}, "exceeds num_perm"),
        ({"threshold": 0}, "greater than 0"),
        ({"shingle": "sentence"}, "'word' or 'char'"),
        ({"normalize": "nfkc"}, "'simplify' or 'none'"),
        ({"treshold": 0.7}, "Extra inputs"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValidationError, match=message):
        MinHashConfig(**fields)


def test_bad_input_to_find_duplicates(seeds):
    cfg = MinHashConfig()
    keys = band_keys(pa.array(seeds[:3]), cfg)
    with pytest.raises(ValueError, match="texts_for_verify"):
        find_duplicates(keys, None, cfg)
    with pytest.raises(ValueError, match="order_keys"):
        find_duplicates(keys, None, MinHashConfig(keep="longest"), texts_of(seeds))
    with pytest.raises(ValueError, match="fixed_size_binary"):
        find_duplicates(
            band_keys(pa.array(seeds[:3]), MinHashConfig(bands=4, rows=4)), None, cfg, texts_of(seeds)
        )
    with pytest.raises(ValueError, match="expects"):
        find_duplicates(np.zeros((3, 4), np.uint64), None, cfg, texts_of(seeds))
