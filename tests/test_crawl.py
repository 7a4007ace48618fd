"""``corpus.crawl`` against a real site on loopback: politeness, safety, resume, WARC offsets."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest
from warcio.archiveiterator import ArchiveIterator

from corpus.crawl import CrawlConfig, crawl, run_recipe, work_folder
from corpus.crawl_frontier import Frontier, locked
from corpus.crawl_policy import Scope, is_public_address, normalise_url
from manifests.errors import DistilleryError
from manifests.hashing import record_id
from manifests.recipes import read_recipe
from manifests.verify import verify

from .conftest import ROOT

pytestmark = pytest.mark.network

Route = Callable[[BaseHTTPRequestHandler, int], None]


def respond(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key.replace("_", "-"), value)
    if "Content_Length" not in headers:
        handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class Site:
    """A loopback web site whose routes the test defines; it records every request it receives."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, float, str]] = []
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.site = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def page(self, path: str, body: str | bytes, content_type: str = "text/html; charset=utf-8") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.routes[path] = lambda h, n: respond(h, 200, data, Content_Type=content_type)

    def html(self, path: str, *links: str) -> str:
        body = (
            f"<html><body><h1>{path}</h1>" + "".join(f'<a href="{a}">x</a>' for a in links) + "</body></html>"
        )
        self.page(path, body)
        return body

    def count(self, path: str) -> int:
        return sum(1 for p, _, _ in self.requests if p == path)

    def times(self, path: str) -> list[float]:
        return [t for p, t, _ in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        site: Site = self.server.site  # type: ignore[attr-defined]
        with site.lock:
            site.requests.append((self.path, time.monotonic(), self.headers.get("User-Agent", "")))
            n = site.count(self.path)
            site.in_flight += 1
            site.most_in_flight = max(site.most_in_flight, site.in_flight)
        route = site.routes.get(self.path)
        try:
            if route is None:
                respond(self, 404, b"not found", Content_Type="text/plain")
            else:
                route(self, n)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the crawler stopped reading (an oversized page): expected
        finally:
            with site.lock:
                site.in_flight -= 1

    def log_message(self, *args: object) -> None:
        pass


def _serve() -> Iterator[Site]:
    site = Site()
    thread = threading.Thread(target=site.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield site
    site.server.shutdown()
    site.server.server_close()


@pytest.fixture
def site():
    yield from _serve()


@pytest.fixture
def other_site():
    """A second loopback site: the same host as ``site``, another port."""
    yield from _serve()


def config(site: Site, *paths: str, **overrides) -> CrawlConfig:
    values = dict(name="t", seeds=[site.url(p) for p in paths or ("/",)], allow_private_addresses=True,
                  delay_seconds=0, backoff_seconds=0.05, timeout_seconds=5, user_agent="TestBot/1.0")  # fmt: skip
    return CrawlConfig(**(values | overrides))


def index_rows(m) -> list[dict]:
    return pq.read_table(m.location / m.data_files()[0].path).to_pylist()


def ledger(m) -> dict[str, tuple[str, dict]]:
    """Ledger rows by URL: reason and detail."""
    if not m.ledger:
        return {}
    rows = pq.read_table(m.location / m.ledger[0].path).to_pylist()
    out = {}
    for row in rows:
        detail = json.loads(row["detail"])
        assert row["step"] == "corpus.crawl" and row["action"] == "drop"
        out[detail["url"]] = (row["reason"], detail)
    return out


def check_warc(m, bodies: dict[str, bytes] | None = None) -> None:
    """Every index row points at the response record of its final URL (and holds the served bytes)."""
    for row in index_rows(m):
        assert row["id"] == record_id(row["url"]) and row["parents"] == []
        with open(m.location / row["warc_file"], "rb") as f:
            f.seek(row["warc_offset"])
            record = next(iter(ArchiveIterator(f)))
            assert record.rec_type == "response"
            assert record.rec_headers.get_header("WARC-Target-URI") == row["final_url"]
            content = record.content_stream().read()
            f.seek(row["warc_offset"])
            member = gzip.decompress(f.read(row["warc_length"]))  # exactly one gzip member: the record
            assert member.startswith(b"WARC/1.0\r\n") and b"WARC-Type: response\r\n" in member[:200]
        assert len(content) == row["bytes"]
        if bodies is not None and row["final_url"] in bodies:
            assert content == bodies[row["final_url"]]
    assert verify(m).ok


def test_links_followed_within_depth_and_domain_robots_obeyed(site, store):
    site.page("/robots.txt", "User-agent: *\nDisallow: /private\n", "text/plain")
    links = ["/a", "b?y=2&x=1", "/b?x=1&y=2#frag", "/private/secret", "http://elsewhere.example/x",
             "mailto:someone@example.com", "/a#top", "/missing"]  # fmt: skip
    bodies = {site.url("/"): site.html("/", *links).encode()}
    bodies[site.url("/a")] = site.html("/a", "/c").encode()
    bodies[site.url("/b?x=1&y=2")] = site.html("/b?x=1&y=2", "/").encode()
    bodies[site.url("/c")] = site.html("/c", "/d").encode()
    site.html("/d")

    m = crawl(config(site, max_depth=2), store)

    rows = index_rows(m)
    assert {r["url"]: r["depth"] for r in rows} == {
        site.url("/"): 0, site.url("/a"): 1, site.url("/b?x=1&y=2"): 1, site.url("/c"): 2
    }  # fmt: skip
    assert all(r["status"] == 200 and r["content_type"].startswith("text/html") for r in rows)
    dropped = ledger(m)
    assert dropped[site.url("/private/secret")][0] == "robots_disallowed"
    assert dropped["http://elsewhere.example/x"][0] == "out_of_scope"
    assert dropped[site.url("/d")][0] == "too_deep"
    assert dropped[site.url("/missing")][0] == "http_error_404"
    # One request per page (normalisation merged the spellings), robots.txt once, nothing disallowed.
    assert [p for p, _, _ in site.requests].count("/robots.txt") == 1
    for path in ("/", "/a", "/b?x=1&y=2", "/c", "/missing"):
        assert site.count(path) == 1, path
    assert site.count("/private/secret") == site.count("/d") == 0
    assert {ua for _, _, ua in site.requests} == {"TestBot/1.0"}
    check_warc(m, bodies)
    assert m.producer.stage == "corpus.crawl" and m.stats["pages"] == 4
    assert m.stats["dropped"]["robots_disallowed"] == 1
    assert not list(store.name_dir("dataset", "t").glob(".crawl-*"))  # work folder gone after publish


def test_robots_group_for_our_agent_and_crawl_delay_spacing(site, store):
    site.page("/robots.txt", "User-agent: testbot\nCrawl-delay: 1\nDisallow: /not-for-testbot\n\n"
                             "User-agent: *\nDisallow: /\n", "text/plain")  # fmt: skip
    site.html("/", "/p1", "/p2", "/not-for-testbot")
    site.html("/p1")
    site.html("/p2")

    m = crawl(config(site, user_agent="TestBot/2.0 (+https://example.com/bot)"), store)

    assert {r["url"] for r in index_rows(m)} == {site.url("/"), site.url("/p1"), site.url("/p2")}
    assert ledger(m)[site.url("/not-for-testbot")][0] == "robots_disallowed"
    starts = sorted(t for p, t, _ in site.requests if p != "/robots.txt")
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(gaps) == 2 and min(gaps) >= 0.95, gaps


def test_429_retry_after_honoured_then_success_and_too_long_retry_after_dropped(site, store):
    def limited(handler, n):
        if n == 1:
            respond(handler, 429, b"slow down", Retry_After="1", Content_Type="text/plain")
        else:
            respond(handler, 200, b"<p>ok</p>", Content_Type="text/html")

    site.routes["/limited"] = limited
    site.routes["/never"] = lambda h, n: respond(h, 503, b"", Retry_After="3600")

    m = crawl(config(site, "/limited", "/never", max_retry_after_seconds=10), store)

    assert [r["url"] for r in index_rows(m)] == [site.url("/limited")]
    first, second = site.times("/limited")
    assert second - first >= 0.95
    reason, detail = ledger(m)[site.url("/never")]
    assert reason == "retry_after_too_long" and detail["retry_after"] == 3600
    assert site.count("/never") == 1


def test_503_retried_with_backoff_then_given_up(site, store):
    site.routes["/down"] = lambda h, n: respond(h, 503, b"down", Content_Type="text/plain")

    m = crawl(config(site, "/down", max_retries=2, backoff_seconds=0.1), store)

    reason, detail = ledger(m)[site.url("/down")]
    assert reason == "retries_exhausted" and detail == {
        "url": site.url("/down"),
        "last": "http_503",
        "attempts": 3,
    }
    times = site.times("/down")
    assert len(times) == 3
    assert times[1] - times[0] >= 0.09 and times[2] - times[1] >= 0.19  # backoff doubles
    assert index_rows(m) == [] and verify(m).ok


def test_per_host_concurrency_limit(site, store):
    def slow(handler, n):
        time.sleep(0.15)
        respond(handler, 200, b"<p>slow</p>", Content_Type="text/html")

    paths = [f"/s{i}" for i in range(6)]
    for path in paths:
        site.routes[path] = slow
    m = crawl(config(site, *paths, concurrency=8, per_host_concurrency=2), store)
    assert len(index_rows(m)) == 6 and site.most_in_flight == 2


def test_unreachable_robots_means_nothing_crawled_and_long_crawl_delay_drops_host(site, store):
    site.routes["/robots.txt"] = lambda h, n: respond(h, 500, b"oops")
    site.html("/")
    m = crawl(config(site, max_retries=1), store)
    assert ledger(m)[site.url("/")] == (
        "robots_unreachable",
        {"url": site.url("/"), "robots_error": "retries_exhausted", "last": "http_500", "attempts": 2},
    )
    assert site.count("/robots.txt") == 2 and site.count("/") == 0

    site.page("/robots.txt", "User-agent: *\nCrawl-delay: 100\n", "text/plain")
    m = crawl(config(site, name="t2", max_crawl_delay_seconds=30), store)
    assert ledger(m)[site.url("/")] == (
        "crawl_delay_too_long", {"url": site.url("/"), "crawl_delay": 100.0, "limit": 30.0}
    )  # fmt: skip
    assert site.count("/") == 0


def test_redirects_followed_looped_limited_and_deduplicated(site, store):
    site.routes["/loop1"] = lambda h, n: respond(h, 302, Location="/loop2")
    site.routes["/loop2"] = lambda h, n: respond(h, 301, Location=site.url("/loop1"))
    for i in range(6):
        site.routes[f"/chain{i}"] = lambda h, n, i=i: respond(h, 302, Location=f"/chain{i + 1}")
    site.routes["/moved"] = lambda h, n: respond(h, 301, Location="/target")
    body = site.html("/target")
    site.html("/")
    site.routes["/old"] = lambda h, n: respond(h, 308, Location="/")

    m = crawl(config(site, "/", "/loop1", "/chain0", "/moved", "/old", max_redirects=3), store)

    rows = {r["url"]: r for r in index_rows(m)}
    assert set(rows) == {site.url("/"), site.url("/moved")}
    assert rows[site.url("/moved")]["final_url"] == site.url("/target")
    dropped = ledger(m)
    reason, detail = dropped[site.url("/loop1")]
    assert reason == "redirect_loop" and detail["chain"][-1] == site.url("/loop1")
    assert dropped[site.url("/chain0")][0] == "redirect_limit"
    assert site.count("/chain3") == 1 and site.count("/chain4") == 0
    assert dropped[site.url("/old")] == (
        "duplicate_url", {"url": site.url("/old"), "redirected_to": site.url("/"), "duplicate_of": record_id(site.url("/"))}
    )  # fmt: skip
    assert site.count("/target") == 1
    check_warc(m, {site.url("/target"): body.encode()})


def test_oversized_binary_and_invalid_utf8_pages(site, store):
    def big_stream(handler, n):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html")
        handler.end_headers()  # no Content-Length: the crawler must count while reading
        for _ in range(100):
            handler.wfile.write(b"<p>" + b"x" * 4096 + b"</p>")

    site.routes["/big"] = big_stream
    site.routes["/big-declared"] = lambda h, n: respond(h, 200, b"x" * 10, Content_Type="text/html",
                                                         Content_Length="10000000")  # fmt: skip
    site.page("/img.png", b"\x89PNG\r\n\x1a\n" + bytes(100), "image/png")
    site.routes["/untyped"] = lambda h, n: respond(h, 200, b"hello")
    raw = b"<html><body>\xff\xfe caf\xe9 \xc3\x28 <a href='/ok'>ok</a></body></html>"
    site.page("/bad-utf8.html", raw)
    site.html("/ok")
    plain = b"Gzipped text, stored decoded.\n" * 20
    site.routes["/gz.txt"] = lambda h, n: respond(h, 200, gzip.compress(plain), Content_Type="text/plain",
                                                  Content_Encoding="gzip")  # fmt: skip

    seeds = ("/big", "/big-declared", "/img.png", "/untyped", "/bad-utf8.html", "/gz.txt")
    m = crawl(config(site, *seeds, max_page_bytes=50_000), store)

    dropped = ledger(m)
    reason, detail = dropped[site.url("/big")]
    assert reason == "too_large" and 50_000 < detail["read"] < 120_000
    assert dropped[site.url("/big-declared")][1]["content_length"] == 10_000_000
    assert dropped[site.url("/img.png")] == (
        "content_type_not_allowed", {"url": site.url("/img.png"), "content_type": "image/png"}
    )  # fmt: skip
    assert dropped[site.url("/untyped")][0] == "content_type_not_allowed"
    assert {r["url"] for r in index_rows(m)} == {
        site.url("/bad-utf8.html"),
        site.url("/ok"),
        site.url("/gz.txt"),
    }
    check_warc(m, {site.url("/bad-utf8.html"): raw, site.url("/gz.txt"): plain})
    gz = next(r for r in index_rows(m) if r["url"].endswith("/gz.txt"))
    with open(m.location / gz["warc_file"], "rb") as f:
        f.seek(gz["warc_offset"])
        headers = next(iter(ArchiveIterator(f))).http_headers
    # Stored decoded, as Common Crawl does; the wire encoding is kept under another name.
    assert headers.get_header("X-Crawler-Content-Encoding") == "gzip" and not headers.get_header(
        "Content-Encoding"
    )


def test_private_addresses_refused_unless_allowed(site, store):
    site.html("/")
    seeds = [site.url("/"), f"http://localhost:{site.port}/x", f"http://[::1]:{site.port}/y"]
    m = crawl(CrawlConfig(name="t", seeds=seeds, delay_seconds=0), store)

    assert site.requests == []  # not even robots.txt
    dropped = ledger(m)
    assert {url: reason for url, (reason, _) in dropped.items()} == {
        normalise_url(s): "private_address_refused" for s in seeds
    }
    assert dropped[site.url("/")][1]["address"] == "127.0.0.1"
    assert index_rows(m) == [] and verify(m).ok


def test_name_resolving_to_a_private_address_is_refused(site, store, monkeypatch):
    import socket

    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        # A public-looking name whose DNS answer points inside (what DNS rebinding does).
        return real("127.0.0.1" if host == "innocent.example" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    site.html("/")
    m = crawl(CrawlConfig(name="t", seeds=[f"http://innocent.example:{site.port}/"], delay_seconds=0), store)
    reason, detail = ledger(m)[f"http://innocent.example:{site.port}/"]
    assert reason == "private_address_refused" and detail["address"] == "127.0.0.1"
    assert site.requests == []


def test_address_classification():
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
                    "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "224.0.0.1"):  # fmt: skip
        assert not is_public_address(address), address
    for address in ("93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"):
        assert is_public_address(address), address


def test_resume_after_kill_fetches_nothing_twice(site, store, monkeypatch):
    site.page("/robots.txt", "User-agent: *\nAllow: /\n", "text/plain")
    pages = [f"/p{i}" for i in range(5)]
    site.html("/", *pages)
    for path in pages:
        site.html(path)
    cfg = config(site, concurrency=1, per_host_concurrency=1)
    original = Frontier.store_page
    stored = []

    def store_then_die(self, *args, **kwargs):
        original(self, *args, **kwargs)
        stored.append(1)
        if len(stored) == 3:
            raise RuntimeError("simulated kill")

    monkeypatch.setattr(Frontier, "store_page", store_then_die)
    with pytest.raises(RuntimeError, match="simulated kill"):
        crawl(cfg, store)
    monkeypatch.setattr(Frontier, "store_page", original)
    (work,) = store.name_dir("dataset", "t").glob(".crawl-*")
    (warc,) = (work / "warc").glob("*.warc.gz")
    with open(warc, "ab") as f:
        f.write(b"half a record")  # what a kill in the middle of a write leaves
    assert not store.list()

    m = crawl(cfg, store)

    assert len(index_rows(m)) == 6
    for path in ["/robots.txt", "/"] + pages:
        assert site.count(path) == 1, path
    check_warc(m)
    with open(m.location / "warc" / warc.name, "rb") as f:
        types = [r.rec_type for r in ArchiveIterator(f)]
    assert types.count("response") == 6 and types.count("warcinfo") == 1
    assert not work.exists()


def _slow_crawl_in_a_child(site, store, pause_s: float):
    """Eight slow pages behind a seed, crawled one at a time by a child process (to be killed)."""
    pages = [f"/p{i}" for i in range(8)]
    site.html("/", *pages)

    def slow(handler, n):
        time.sleep(pause_s)
        respond(handler, 200, b"<p>page</p>", Content_Type="text/html")

    for path in pages:
        site.routes[path] = slow
    cfg = config(site, concurrency=1, per_host_concurrency=1)
    script = (
        "import sys; from corpus.crawl import CrawlConfig, crawl; from manifests.store import Store; "
        "crawl(CrawlConfig.model_validate_json(sys.argv[1]), Store(sys.argv[2]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, cfg.model_dump_json(), str(store.root)], cwd=ROOT)
    return pages, cfg, proc


def test_resume_after_sigkill(site, store):
    pages, cfg, proc = _slow_crawl_in_a_child(site, store, 0.1)
    try:
        deadline = time.monotonic() + 20
        while sum(site.count(p) for p in pages) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert not store.list()

    m = crawl(cfg, store)

    counts = [site.count(p) for p in pages]
    assert len(index_rows(m)) == 9 and site.count("/robots.txt") == 1 and site.count("/") == 1
    # Only the page in flight at the kill (if its commit had not happened) may be fetched again.
    assert max(counts) <= 2 and sum(counts) <= len(pages) + 1, counts
    check_warc(m)
    with open(m.location / "warc" / "crawl-00000.warc.gz", "rb") as f:
        assert [r.rec_type for r in ArchiveIterator(f)].count("response") == 9


def test_clean_keeps_a_running_crawls_folder_and_removes_a_killed_ones(site, store, cli):
    pages, cfg, proc = _slow_crawl_in_a_child(site, store, 0.2)
    try:
        deadline = time.monotonic() + 20
        while sum(site.count(p) for p in pages) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        (work,) = store.name_dir("dataset", "t").glob(".crawl-*")
        result = cli("--store", store.root, "manifests", "clean")
        assert work.name in result.out and "kept: its process is running" in result.out, result.out
        assert work.is_dir()
    finally:
        proc.kill()
        proc.wait()

    # Like a build's .work- folder, a killed crawl's folder is its resume state: listed by a dry run,
    # removed at once by clean (its process is gone), never while its crawl runs.
    result = cli("--store", store.root, "manifests", "clean", "--dry-run")
    assert work.name in result.out and "would remove (its process is gone)" in result.out, result.out
    assert work.is_dir()
    result = cli("--store", store.root, "manifests", "clean")
    assert work.name in result.out and "removed" in result.out
    assert not work.exists()
    m = crawl(cfg, store)  # starts afresh
    assert len(index_rows(m)) == 9 and not list(store.name_dir("dataset", "t").glob(".crawl-*"))


def test_max_pages_leaves_the_rest_in_the_ledger_and_warc_files_rotate(site, store):
    site.html("/", "/a", "/b", "/c")
    for path in ("/a", "/b", "/c"):
        site.html(path)

    m = crawl(config(site, max_pages=3, warc_file_bytes=1), store)

    assert len(index_rows(m)) == 3
    assert ledger(m)[site.url("/c")][0] == "max_pages_reached"
    assert len({r["warc_file"] for r in index_rows(m)}) == 3
    check_warc(m)


def test_url_list_and_bad_input(site, store, tmp_path):
    site.html("/")
    site.html("/two")
    urls = tmp_path / "urls.txt"
    urls.write_text(f"# seeds\n{site.url('/')}\n\n{site.url('/two')}#x\nHTTP://127.0.0.1:{site.port}/two\n")
    m = crawl(config(site, url_list=str(urls), seeds=[]), store)
    assert {r["url"] for r in index_rows(m)} == {site.url("/"), site.url("/two")}
    assert ledger(m)[f"HTTP://127.0.0.1:{site.port}/two"][0] == "duplicate_url"
    assert m.stats["url_list_sha256"]

    bad = {
        "no seed URLs": dict(seeds=[]),
        "seeds[1]: 'http://exa mple.com/' is not a crawlable URL (malformed host": dict(
            seeds=["http://example.com/", "http://exa mple.com/"]
        ),
        "not an http or https URL": dict(seeds=["ftp://example.com/"]),
        "cannot read it": dict(url_list=str(tmp_path / "missing.txt")),
        "allowed_domains[0]: 'https://example.com/' is not a domain name": dict(
            seeds=["https://example.com/"], allowed_domains=["https://example.com/"]
        ),
    }
    (tmp_path / "bad.txt").write_text("https://example.com/\nhttps://example.com:99999/\n")
    bad["bad.txt line 2"] = dict(url_list=str(tmp_path / "bad.txt"))
    for message, values in bad.items():
        with pytest.raises(DistilleryError, match=re.escape(message)):
            crawl(CrawlConfig(name="bad", **values), store)
    busy = config(site, name="busy")
    with locked(work_folder(busy, store, None)), pytest.raises(DistilleryError, match="another crawl"):
        crawl(busy, store)
    with pytest.raises(DistilleryError, match="did you mean 'max_depth'"):
        run_recipe({"stage": "corpus.crawl", "name": "x", "seeds": ["https://example.com/"], "max_deep": 1},
                   store, "r.yaml")  # fmt: skip


def test_normalisation_and_scope():
    assert normalise_url("HTTP://Example.COM:80/a/./b/../c?z=1&a=2#frag") == "http://example.com/a/c?a=2&z=1"
    assert normalise_url("https://example.com:443") == "https://example.com/"
    assert (
        normalise_url("https://user:pw@example.com/%7euser/%c3%a9 x")
        == "https://example.com/~user/%C3%A9%20x"
    )
    assert normalise_url("../up?b&a", "http://example.com/x/y/z") == "http://example.com/x/up?a&b"
    assert normalise_url("http://bücher.example/") == "http://xn--bcher-kva.example/"
    for bad in ("javascript:alert(1)", "http:///nohost", "http://[::1/", "http://a b/"):
        with pytest.raises(ValueError):
            normalise_url(bad)
    scope = Scope.from_seeds(["https://www.example.com/"], "domain")
    assert scope.contains("https://example.com/a") and scope.contains("http://blog.example.com/")
    assert not scope.contains("https://example.org/") and not scope.contains("https://notexample.com/")


def test_example_recipe_runs_against_the_local_site(site, store):
    site.html("/", "/about")
    site.html("/about")
    data = read_recipe(ROOT / "examples" / "recipes" / "crawl-local.yaml")
    data["seeds"] = [s.replace("127.0.0.1:8000", f"127.0.0.1:{site.port}") for s in data["seeds"]]

    m = run_recipe(data, store, "crawl-local.yaml")

    assert m.name == "crawl-local" and len(index_rows(m)) == 2
    assert m.producer.recipe["allow_private_addresses"] is True
    check_warc(m)


def test_scope_is_the_origin_by_default_ports_and_schemes_included():
    scope = Scope.from_seeds(["http://Example.com./", "https://[::1]:8443/x"])
    for url in ("http://example.com/a", "http://example.com:80/a", "HTTP://EXAMPLE.COM./b",
                "https://[0:0::1]:8443/y"):  # fmt: skip
        assert scope.contains(url), url
    for url in ("http://example.com:8080/", "https://example.com/", "https://example.com:80/",
                "http://www.example.com/", "https://[::1]/", "http://[::1]:8443/", "http://example.com:99999/",
                "ftp://example.com/"):  # fmt: skip
        assert not scope.contains(url), url
    host = Scope.from_seeds(["http://example.com/"], "host")
    assert host.contains("https://example.com:8443/") and not host.contains("http://a.example.com/")
    # An IP address has no subdomains: "x.127.0.0.1" is a host name someone else's DNS answers for.
    domain = Scope.from_seeds(["http://127.0.0.1:8000/", "http://[::1]/"], "domain")
    assert domain.contains("http://127.0.0.1:9000/") and domain.contains("https://[::1]:1/")
    assert not domain.contains("http://x.127.0.0.1/") and not domain.contains("http://evil.0.0.1/")


def test_redirect_and_link_to_another_port_or_scheme_stay_out_of_the_origin_scope(site, other_site, store):
    # Both sites are 127.0.0.1: only the port tells them apart. The redirect used to be followed and
    # the other port's page stored.
    site.routes["/"] = lambda h, n: respond(h, 302, Location=other_site.url("/secret"))
    site.routes["/upgrade"] = lambda h, n: respond(h, 301, Location=f"https://127.0.0.1:{site.port}/")
    site.html("/page", other_site.url("/linked"), f"https://127.0.0.1:{site.port}/tls", "/same")
    site.html("/same")
    other_site.html("/secret")
    other_site.html("/linked")

    m = crawl(config(site, "/", "/upgrade", "/page"), store)

    assert {r["final_url"] for r in index_rows(m)} == {site.url("/page"), site.url("/same")}
    assert other_site.requests == []  # not the pages, not even its robots.txt
    dropped = ledger(m)
    assert dropped[site.url("/")] == (
        "out_of_scope", {"url": site.url("/"), "redirected_to": other_site.url("/secret")}
    )  # fmt: skip
    assert dropped[site.url("/upgrade")][0] == "out_of_scope"
    assert dropped[other_site.url("/linked")][0] == "out_of_scope"
    assert dropped[f"https://127.0.0.1:{site.port}/tls"][0] == "out_of_scope"
    assert m.producer.recipe["scope"] == "origin"


def test_scope_host_follows_another_port_of_the_same_host(site, other_site, store):
    site.routes["/"] = lambda h, n: respond(h, 302, Location=other_site.url("/secret"))
    site.html("/page", other_site.url("/linked"))
    other_site.html("/secret")
    other_site.html("/linked")

    m = crawl(config(site, "/", "/page", scope="host"), store)

    rows = {r["url"]: r["final_url"] for r in index_rows(m)}
    assert rows == {
        site.url("/"): other_site.url("/secret"),
        site.url("/page"): site.url("/page"),
        other_site.url("/linked"): other_site.url("/linked"),
    }
    assert other_site.count("/robots.txt") == 1  # the other origin's own robots.txt is obeyed
    check_warc(m)


def test_allowed_domains_mean_domain_scope_and_take_unicode_names(site, store):
    site.html("/")
    cfg = config(site, allowed_domains=["bücher.example", "127.0.0.1"])
    assert cfg.scope == "domain"
    m = crawl(cfg, store)
    assert [r["url"] for r in index_rows(m)] == [site.url("/")]
    assert m.producer.recipe["scope"] == "domain"
    recipe = {"stage": "corpus.crawl", "name": "x", "seeds": ["https://example.com/"], "scope": "origin",
              "allowed_domains": ["example.com"]}  # fmt: skip
    with pytest.raises(DistilleryError, match="'allowed_domains': Value error, needs scope: domain"):
        run_recipe(recipe, store, "r.yaml")
    with pytest.raises(DistilleryError, match="scope"):
        run_recipe(recipe | {"scope": "site", "allowed_domains": []}, store, "r.yaml")
