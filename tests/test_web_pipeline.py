"""The example web pipeline end to end: crawl a loopback site, then extract → language → toxicity
→ PII → dedup, and trace a document back to its URL and WARC offset."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from manifests.data import read_table

from .test_crawl import respond, site  # noqa: F401 - the fixture is used by name

pytestmark = pytest.mark.network

ARTICLE = (
    "<html><head><title>{title}</title></head><body><nav>Home | Recipes | About | Shop</nav>"
    "<article><h1>{title}</h1><p>{body}</p></article><footer>Cookie settings</footer></body></html>"
)
BREAD = (
    "Good bread needs time more than it needs skill. Mix the flour, water, salt and yeast in a large bowl, "
    "then cover it and leave the dough to rise slowly in a cool kitchen overnight. The long rest lets the "
    "flavour develop and keeps the crumb open. In the morning, shape the loaf gently on a floured board, "
    "and let it prove for another hour while the oven heats with a heavy pot inside. Bake it with the lid "
    "on for half an hour, then without it until the crust is deep brown and the loaf sounds hollow."
)
GARDEN = (
    "Tomatoes grow best against a sunny wall that holds the heat of the afternoon. Water them deeply twice "
    "a week rather than a little every day, which pushes the roots down into the cooler soil where they "
    "find moisture during a dry summer. Pinch out the side shoots as they appear, tie the main stem to a "
    "cane, and feed the plants with a seaweed mixture once the first flowers have set. Pick the fruit as "
    "soon as it colours, and the plants will keep cropping until the first frost arrives in the autumn. Save a few seeds from the best fruit for next year."
)
CONTACT = (
    "Our bakery class runs every Saturday morning in the village hall and welcomes complete beginners. "
    "We start with a simple white loaf and move on to rye and sourdough once everyone feels confident. "
    "Bring an apron and a container to take your bread home, and we will provide the flour and the ovens. "
    "Places are limited to twelve people, so that everyone gets help when the dough misbehaves. "
    "Write to jane.doe@example.com or call 555-867-5309 to book a place for the next session."
)
FRENCH = (
    "Le pain demande du temps plutôt que du talent. Mélangez la farine, l'eau, le sel et la levure dans un "
    "grand saladier, puis laissez reposer la pâte toute la nuit dans une cuisine fraîche. Le matin, "
    "façonnez la miche sur un plan fariné et laissez-la lever encore une heure pendant que le four chauffe. "
    "Faites cuire avec le couvercle pendant une demi-heure, puis sans lui jusqu'à ce que la croûte soit dorée."
)
QUIZ = (
    "Here is a puzzle from our weekend quiz that readers keep sending us answers for. A lighthouse keeper "
    "winds the clock every evening at six and again each morning at six. How many hours pass between two "
    "windings? Twelve hours pass between one winding and the next. We print a new puzzle every Friday, "
    "and the best answers win a loaf from the bakery. Send yours before Thursday evening to enter."
)
TOXIC = (
    "I am so tired of the people at the council and their fucking excuses about the road. Every week the "
    "same shit happens and nobody in that office gives a fuck about the families who live on the hill. "
    "They are a bunch of lazy bastards who only care about their pensions and their parking spaces. "
    "The potholes are still there, the lights are still broken, and the bins are still overflowing today. Nobody ever answers the phone when you call them about it."
)


def _serve(site):  # noqa: F811 - the fixture's value
    links = [
        "/bread",
        "/garden",
        "/contact",
        "/french",
        "/toxic",
        "/private/secret",
        "/loop",
        "/big",
        "/logo.png",
        "/latin",
        "/bread-copy",
        "/busy",
        "/quiz",
    ]
    site.page("/robots.txt", "User-agent: *\nDisallow: /private/\n", "text/plain")
    site.page(
        "/", "<html><body>" + "".join(f'<a href="{link}">{link}</a>' for link in links) + "</body></html>"
    )
    for path, title, body in [
        ("/bread", "Bread", BREAD),
        ("/garden", "Tomatoes", GARDEN),
        ("/contact", "Classes", CONTACT),
        ("/french", "Pain", FRENCH),
        ("/toxic", "Rant", TOXIC),
        ("/bread-copy", "Bread", BREAD),
    ]:
        site.page(path, ARTICLE.format(title=title, body=body))
    site.page("/private/secret", ARTICLE.format(title="Secret", body=BREAD))
    site.page("/big", ARTICLE.format(title="Big", body="word " * 400_000))
    site.page("/logo.png", b"\x89PNG\r\n\x1a\n" + bytes(64), "image/png")
    site.page(
        "/latin",
        ARTICLE.format(title="Latin", body=GARDEN.replace("soil", "s\xf6il")).encode("latin-1"),
        "text/html",
    )
    site.page("/quiz", ARTICLE.format(title="Quiz", body=QUIZ))
    busy = ARTICLE.format(title="Busy", body=GARDEN.replace("Tomatoes", "Beans")).encode()
    # Busy the first time (429 with Retry-After), then served.
    site.routes["/busy"] = lambda h, n: (
        respond(h, 429, Retry_After="1") if n == 1 else respond(h, 200, busy, Content_Type="text/html")
    )
    site.routes["/loop"] = lambda h, n: respond(h, 302, Location="/loop2")
    site.routes["/loop2"] = lambda h, n: respond(h, 302, Location="/loop")


def test_crawl_then_clean_then_trace(site, cli, store):  # noqa: F811
    _serve(site)
    seeds = f"seeds=[{site.url('/')}]"
    result = cli("--store", store.root, "corpus", "crawl", "examples/recipes/crawl-local.yaml", "--set", seeds,
                 "--set", "max_page_bytes=500000")  # fmt: skip
    assert result.code == 0, result.err
    crawl = store.resolve("crawl-local")
    crawl_ledger = {json.loads(e["detail"])["url"].rsplit("/", 1)[-1]: e["reason"]
                    for e in pq.read_table(crawl.location / crawl.ledger[0].path).to_pylist()}  # fmt: skip
    assert crawl_ledger["secret"] == "robots_disallowed"
    assert crawl_ledger["big"] == "too_large"
    assert crawl_ledger["logo.png"] == "content_type_not_allowed"
    assert crawl_ledger["loop"] == "redirect_loop"
    assert "busy" not in crawl_ledger and site.count("/busy") == 2  # waited, then fetched

    assert (
        cli("--store", store.root, "corpus", "decontam-index", "examples/recipes/decontam-index.yaml").code
        == 0
    )
    result = cli("--store", store.root, "corpus", "build", "examples/recipes/web-corpus.yaml")
    assert result.code == 0, result.err
    web = store.resolve("web-corpus")
    assert (
        web.parents[0].id == crawl.id
        and web.producer.recipe["inputs"][0]["dataset"] == f"crawl-local@{crawl.id}"
    )
    rows = {r["source"]["url"].rsplit("/", 1)[-1]: r for r in read_table(web).to_pylist()}
    assert set(rows) == {
        "bread",
        "garden",
        "contact",
        "latin",
        "busy",
    }  # french, toxic dropped; the copy deduplicated
    assert "Home | Recipes" not in rows["bread"]["text"] and rows["bread"]["language"] == "en"
    assert "jane.doe@example.com" not in rows["contact"]["text"] and "<EMAIL>" in rows["contact"]["text"]
    assert "\ufffd" in rows["latin"]["text"] or "s\xf6il" in rows["latin"]["text"]
    funnel = {row["step"]: row for row in web.stats["funnel"]}
    assert funnel["language"]["removed"] == {"language_not_kept": 1}
    assert funnel["toxicity"]["removed"]["toxic_words"] == 1
    assert funnel["exact_dedup"]["removed"] == {"exact_duplicate": 1}
    assert web.stats["pii"]["EMAIL"] == 1 and web.stats["pii"]["PHONE"] == 1
    assert web.stats["contamination"]["tiny-qa"] == {
        "documents": 1,
        "examples_hit": 1,
        "examples": 20,
        "fraction": 0.05,
    }
    decontam = pq.read_table(web.location / "ledger" / "corpus.build.decontaminate.parquet").to_pylist()
    assert [json.loads(e["detail"])["contamination"] for e in decontam] == [{"tiny-qa": ["tq-00"]}]
    assert {p.role for p in web.parents} >= {"input", "step_model"}

    trace = cli("--store", store.root, "manifests", "trace", rows["contact"]["id"])
    assert trace.code == 0
    assert f"dataset crawl-local@{crawl.id[:12]}" in trace.out and "/contact" in trace.out
    src = rows["contact"]["source"]
    assert src["offset"] is not None and src["http_status"] == 200
    assert all(
        "jane.doe" not in e
        for e in pq.read_table(web.location / "ledger" / "corpus.build.pii.parquet")
        .column("detail")
        .to_pylist()
    )
