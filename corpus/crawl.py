"""``corpus.crawl``: fetch web pages politely into WARC files and publish them as one dataset.

    stage: corpus.crawl
    name: my-crawl
    seeds: [https://example.com/]
    user_agent: "MyLabBot/1.0 (+https://example.com/bot)"
    max_pages: 500
    max_depth: 2

The dataset holds ``warc/crawl-NNNNN.warc.gz`` (a request and a response record per page) and an
index with one row per stored page, pointing at its response record::

    {"id": "5be2…", "parents": [], "url": "https://example.com/a", "final_url": "https://example.com/b",
     "status": 200, "content_type": "text/html; charset=utf-8", "fetch_date": "2026-11-29T10:00:00Z",
     "depth": 1, "warc_file": "warc/crawl-00000.warc.gz", "warc_offset": 1234, "warc_length": 2345,
     "bytes": 10240}

Every URL that was not stored is in the ledger with a reason code (``robots_disallowed``,
``out_of_scope``, ``too_deep``, ``duplicate_url``, ``private_address_refused``,
``content_type_not_allowed``, ``too_large``, ``http_error_404``, ``redirect_loop``,
``redirect_limit``, ``retries_exhausted``, ``retry_after_too_long``, ``robots_unreachable``,
``crawl_delay_too_long``, ``max_pages_reached``…) and the URL in its detail — never page content.
A record's id is ``record_id(url)`` of its normalised URL, in the index and the ledger alike.

The frontier is kept in a work folder under the store (see ``corpus.crawl_frontier``): a killed
crawl, run again with the same recipe, resumes where it stopped without fetching a stored page
twice, and the folder is removed once the dataset is published. The folder (``.crawl-<hash>``) names
its process, so ``distillery manifests clean`` removes it once that crawl is gone — and with it the
chance to resume.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections import Counter
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
from pydantic import Field, ValidationInfo, field_validator, model_validator
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from corpus.crawl_frontier import FetchedPage, Frontier, LinkRow, PageRow, WarcSink, locked
from corpus.crawl_policy import (
    DOMAIN,
    HTML_TYPES,
    ROBOTS_MAX_BYTES,
    PrivateAddressRefused,
    RobotsRules,
    Scope,
    ScopeKind,
    extract_links,
    host_key,
    media_type,
    normalise_url,
    origin,
    parse_robots,
)
from corpus.crawl_transport import HostGate, http_transport
from manifests import __version__
from manifests.errors import DistilleryError
from manifests.hashing import canonical_json, record_id, sha256_file
from manifests.publish import Publisher
from manifests.recipes import Name, RecipeConfig, parse_config
from manifests.retry_after import parse_retry_after
from manifests.schema import Manifest
from manifests.store import Store, claim_work_folder

STAGE = "corpus.crawl"

INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("parents", pa.list_(pa.string())),
        ("url", pa.string()),
        ("final_url", pa.string()),
        ("status", pa.int32()),
        ("content_type", pa.string()),
        ("fetch_date", pa.string()),
        ("depth", pa.int32()),
        ("warc_file", pa.string()),
        ("warc_offset", pa.int64()),
        ("warc_length", pa.int64()),
        ("bytes", pa.int64()),
    ]
)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ROBOTS_MAX_REDIRECTS = 5
"""RFC 9309 2.3.1.2: follow at least five redirects for robots.txt, then treat it as unavailable."""


class CrawlConfig(RecipeConfig):
    """Crawl web pages from seed URLs into WARC files, politely and safely."""

    name: Name
    """Name of the output dataset in the store."""
    seeds: list[str] = Field(default_factory=list)
    """Start URLs (http or https)."""
    url_list: str | None = None
    """A text file of start URLs, one per line ('#' starts a comment); read in addition to seeds."""
    user_agent: str = Field(default="DistilleryBot/0.1", min_length=1, pattern=r"^[^\r\n]+$")
    """The User-Agent header, and the name robots.txt rules are matched against (its first word)."""
    scope: ScopeKind = "origin"
    """Where links and redirects may lead. ``origin``: the scheme, host and port of a seed (a redirect
    from http to https, or to another port, leaves it); ``host``: a seed's host, on any scheme and port;
    ``domain``: the ``allowed_domains`` (or the seeds' hosts without 'www.') and their subdomains, on
    any scheme and port. Giving ``allowed_domains`` alone implies ``domain``."""
    allowed_domains: list[str] = Field(default_factory=list)
    """Domains links may lead to (each with its subdomains), with ``scope: domain``; empty: the seeds'
    hosts, without 'www.'."""
    max_depth: int = Field(default=2, ge=0)
    """Links followed from a seed (0: the seeds only)."""
    max_pages: int = Field(default=1000, ge=1)
    """Pages stored at most; URLs left in the frontier are in the ledger as max_pages_reached."""
    max_links_per_page: int = Field(default=1000, ge=0)
    """Links taken from one page at most, in document order."""
    allowed_content_types: list[str] = Field(
        default_factory=lambda: ["text/html", "application/xhtml+xml", "text/plain"]
    )
    """Media types stored; any other response is dropped before its body is read."""
    max_page_bytes: int = Field(default=2 << 20, ge=1)
    """Largest (decoded) body stored; reading stops past it and the page is dropped as too_large."""
    max_redirects: int = Field(default=5, ge=0)
    """Redirects followed per URL."""
    max_retries: int = Field(default=3, ge=0)
    """Retries after a timeout, a connection error, 429 or a 5xx (500, 502, 503, 504)."""
    backoff_seconds: float = Field(default=1.0, ge=0)
    """First wait before a retry; it doubles with each retry unless the server sends Retry-After."""
    max_retry_after_seconds: float = Field(default=300.0, ge=0)
    """A Retry-After longer than this drops the URL (retry_after_too_long) instead of waiting."""
    timeout_seconds: float = Field(default=30.0, gt=0)
    """Limit for one request, from connecting to the last byte of the body."""
    delay_seconds: float = Field(default=1.0, ge=0)
    """Minimum time between the starts of two requests to one host (a larger Crawl-delay wins)."""
    max_crawl_delay_seconds: float = Field(default=30.0, ge=0)
    """A robots.txt Crawl-delay longer than this drops the host's URLs (crawl_delay_too_long)."""
    concurrency: int = Field(default=16, ge=1)
    """Requests in flight at most, over all hosts."""
    per_host_concurrency: int = Field(default=2, ge=1)
    """Requests in flight at most to one host."""
    allow_private_addresses: bool = False
    """Allow loopback, private and link-local addresses (a local test site); off, a URL list from an
    untrusted source cannot reach internal services."""
    warc_file_bytes: int = Field(default=1 << 30, ge=1)
    """A new WARC file is started once the current one is this large."""

    @model_validator(mode="before")
    @classmethod
    def _domains_imply_domain_scope(cls, data: Any) -> Any:
        # Recipes written before ``scope`` existed list allowed_domains to mean "these domains":
        # they keep that meaning, and the resolved recipe says so.
        if isinstance(data, dict) and data.get("allowed_domains") and "scope" not in data:
            data = {**data, "scope": "domain"}
        return data

    @field_validator("allowed_domains")
    @classmethod
    def _domains_need_domain_scope(cls, domains: list[str], info: ValidationInfo) -> list[str]:
        scope = info.data.get("scope")
        if domains and scope not in (None, "domain"):
            raise ValueError(f"needs scope: domain (the recipe sets scope: {scope})")
        return domains


class Dropped(Exception):
    """A URL will not be stored, for ``reason`` (a ledger reason code)."""

    def __init__(self, reason: str, **detail: Any):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


# --- seeds and the work folder ----------------------------------------------------------------


def _normalised(url: object, where: str) -> str:
    if not isinstance(url, str):
        raise DistilleryError(f"{where}: expected a URL, got {url!r}")
    try:
        return normalise_url(url)
    except ValueError as e:
        shown = url if len(url) <= 100 else url[:100] + "…"
        raise DistilleryError(f"{where}: {shown!r} is not a crawlable URL ({e})") from None


def read_seeds(cfg: CrawlConfig) -> tuple[list[tuple[str, str]], str | None]:
    """``(raw, normalised)`` seed URLs from ``seeds`` then ``url_list``, and the list file's sha256."""
    seeds = [(s, _normalised(s, f"crawl {cfg.name}: seeds[{i}]")) for i, s in enumerate(cfg.seeds)]
    list_sha = None
    if cfg.url_list is not None:
        path = Path(cfg.url_list)
        try:
            text = path.read_text(encoding="utf-8")
            list_sha = sha256_file(path)
        except UnicodeDecodeError:
            raise DistilleryError(f"url_list {path}: not UTF-8 text; save it as UTF-8") from None
        except OSError as e:
            raise DistilleryError(f"url_list {path}: cannot read it ({e.strerror})") from None
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                seeds.append((line, _normalised(line, f"url_list {path} line {n}")))
    if not seeds:
        raise DistilleryError(f"crawl {cfg.name}: no seed URLs; give 'seeds:' or a 'url_list:' file")
    return seeds, list_sha


def work_folder(cfg: CrawlConfig, store: Store, list_sha: str | None) -> Path:
    """Where the frontier of this recipe lives until it is published (same recipe, same folder)."""
    key = hashlib.sha256(canonical_json({"recipe": cfg.resolved(), "url_list": list_sha}).encode())
    return store.name_dir("dataset", cfg.name) / f".crawl-{key.hexdigest()[:16]}"


# --- fetching ---------------------------------------------------------------------------------


class _Response:
    """One HTTP exchange as the crawler keeps it (the body only for a page worth storing)."""

    def __init__(self, url: str, response: httpx.Response, fetched_at: datetime, body: bytes | None):
        self.url = url
        self.status = response.status_code
        self.response = response
        self.fetched_at = fetched_at
        self.body = body

    def header(self, name: str) -> str | None:
        return self.response.headers.get(name)

    @property
    def redirect_to(self) -> str | None:
        return self.header("location") if self.status in REDIRECT_STATUSES else None

    def to_page(self) -> FetchedPage:
        request = self.response.request
        target = request.url.raw_path.decode("ascii")
        return FetchedPage(
            url=self.url, fetched_at=self.fetched_at, request_line=f"GET {target} HTTP/1.1",
            request_headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
            http_version=self.response.http_version, status=self.status,
            reason=self.response.reason_phrase,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.response.headers.raw],
            body=self.body or b"",
        )  # fmt: skip


class _PagesPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} pages/s" if speed else "- pages/s")


class Crawler:
    """One crawl's event loop: dispatch from the frontier, fetch politely, store, record why not."""

    def __init__(self, cfg: CrawlConfig, scope: Scope, frontier: Frontier, warc: WarcSink):
        self.cfg = cfg
        self.scope = scope
        self.frontier = frontier
        self.warc = warc
        self.stored = frontier.count("stored")
        self.dropped = frontier.count("dropped")
        self.requests = frontier.meta("requests")
        self._allowed_types = {t.strip().lower() for t in cfg.allowed_content_types}
        self._gates: dict[str, HostGate] = {}
        self._robots: dict[str, RobotsRules | Dropped] = {}
        self._robots_locks: dict[str, asyncio.Lock] = {}
        self._client: httpx.AsyncClient | None = None
        self._progress: Progress | None = None
        self._task_id: Any = None

    async def run(self) -> None:
        transport = http_transport(self.cfg.concurrency, self.cfg.allow_private_addresses)
        headers = {"User-Agent": self.cfg.user_agent}
        columns = (TextColumn(f"crawl {self.cfg.name}"), BarColumn(), MofNCompleteColumn(), _PagesPerSecond(),
                   TextColumn("{task.fields[dropped]} dropped"), TimeElapsedColumn())  # fmt: skip
        async with httpx.AsyncClient(
            transport=transport, headers=headers, timeout=self.cfg.timeout_seconds, follow_redirects=False,
            trust_env=False,
        ) as client:  # fmt: skip
            self._client = client
            with Progress(*columns, transient=True) as progress:
                self._progress = progress
                self._task_id = progress.add_task(
                    "crawl", total=self.cfg.max_pages, completed=self.stored, dropped=self.dropped
                )
                await self._dispatch()

    async def _dispatch(self) -> None:
        tasks: dict[asyncio.Task[None], str] = {}
        active: Counter[str] = Counter()
        try:
            while True:
                for host in list(self.frontier.pending_hosts):
                    while (
                        len(tasks) < self.cfg.concurrency
                        and self.stored + len(tasks) < self.cfg.max_pages
                        and active[host] < self.cfg.per_host_concurrency
                    ):
                        item = self.frontier.take(host)
                        if item is None:
                            break
                        tasks[asyncio.create_task(self._visit(*item))] = host
                        active[host] += 1
                if not tasks:
                    return
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    active[tasks.pop(task)] -= 1
                    task.result()  # a bug in a visit surfaces here, with its traceback
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _gate(self, url: str) -> HostGate:
        key = host_key(url)
        if key not in self._gates:
            self._gates[key] = HostGate(self.cfg.per_host_concurrency, self.cfg.delay_seconds)
        return self._gates[key]

    async def _visit(self, url: str, depth: int) -> None:
        try:
            response = await self._follow(url, depth)
        except Dropped as d:
            self.frontier.drop(url, d.reason, {"url": url, **d.detail}, self.requests)
            self.dropped += 1
            self._advance(0)
            return
        links: list[LinkRow] = []
        if media_type(response.header("content-type")) in HTML_TYPES and self.cfg.max_links_per_page:
            found = extract_links(
                response.body or b"",
                response.header("content-type"),
                response.url,
                self.cfg.max_links_per_page,
            )
            links = [self._link_row(link, depth + 1) for link in found]
        name, offset, length = self.warc.write(response.to_page())
        page = PageRow(
            url=url, final_url=response.url, status=response.status, content_type=response.header("content-type"),
            fetch_date=response.fetched_at.strftime("%Y-%m-%dT%H:%M:%SZ"), depth=depth,
            warc_file=name, warc_offset=offset, warc_length=length, bytes=len(response.body or b""),
        )  # fmt: skip
        self.frontier.store_page(page, links, self.requests)
        self.stored += 1
        self.dropped += sum(1 for link in links if link.state == "dropped")
        self._advance(1)

    def _link_row(self, url: str, depth: int) -> LinkRow:
        if not self.scope.contains(url):
            return LinkRow(url, depth, "dropped", "out_of_scope", {"url": url})
        if depth > self.cfg.max_depth:
            return LinkRow(url, depth, "dropped", "too_deep", {"url": url, "depth": depth})
        return LinkRow(url, depth)

    def _advance(self, pages: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, advance=pages, dropped=self.dropped)

    async def _follow(self, url: str, depth: int) -> _Response:
        """Fetch ``url``, following redirects (each hop checked against scope and robots.txt)."""
        chain = [url]
        while True:
            current = chain[-1]
            hop = {"redirected_to": current} if current != url else {}
            rules = await self._rules(current)
            if rules.disallow_all:
                raise Dropped("robots_unreachable", **hop, **(rules.unreachable or {}))
            if not rules.allows(current, self.cfg.user_agent):
                raise Dropped("robots_disallowed", **hop)
            response = await self._fetch(current)
            location = response.redirect_to
            if location is None:
                break
            try:
                target = normalise_url(location, current)
            except ValueError as e:
                raise Dropped("bad_redirect", location=location[:500], error=str(e)) from None
            if target in chain:
                raise Dropped("redirect_loop", chain=chain + [target])
            if len(chain) > self.cfg.max_redirects:
                raise Dropped("redirect_limit", chain=chain + [target])
            if not self.scope.contains(target):
                raise Dropped("out_of_scope", redirected_to=target)
            if not self.frontier.claim(target, via=url, depth=depth):
                # The target is (or will be) fetched as a URL of its own.
                raise Dropped("duplicate_url", redirected_to=target, duplicate_of=record_id(target))
            chain.append(target)
        if not 200 <= response.status < 300:
            raise Dropped(f"http_error_{response.status}", status=response.status, **hop)
        return response

    async def _fetch(self, url: str, robots: bool = False) -> _Response:
        """One URL with bounded retries; a timeout, connection error, 429 or 5xx is retried."""
        gate = self._gate(url)
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            wait = self.cfg.backoff_seconds * 2**attempt
            async with gate.turn():
                try:
                    response = await asyncio.wait_for(self._get(url, robots), self.cfg.timeout_seconds)
                except PrivateAddressRefused as e:
                    raise Dropped("private_address_refused", host=e.host, address=e.address) from None
                except (httpx.TransportError, asyncio.TimeoutError) as e:
                    last = type(e).__name__
                else:
                    if response.status not in RETRY_STATUSES:
                        return response
                    last = f"http_{response.status}"
                    retry_after = parse_retry_after(response.header("retry-after"))
                    if retry_after is not None:
                        if retry_after > self.cfg.max_retry_after_seconds:
                            raise Dropped(
                                "retry_after_too_long", status=response.status, retry_after=retry_after
                            )
                        # The server said when to come back: the whole host waits, not only this URL.
                        gate.defer(retry_after)
                        wait = retry_after
            if attempt < self.cfg.max_retries:
                await asyncio.sleep(wait)
        raise Dropped("retries_exhausted", last=last, attempts=self.cfg.max_retries + 1)

    async def _get(self, url: str, robots: bool) -> _Response:
        """One request; the body is read only for a 2xx of an allowed type, and at most up to the cap."""
        assert self._client is not None
        fetched_at = datetime.now(timezone.utc)
        try:
            async with self._client.stream("GET", url) as response:
                self.requests += 1
                if not 200 <= response.status_code < 300:
                    return _Response(url, response, fetched_at, None)
                cap = ROBOTS_MAX_BYTES if robots else self.cfg.max_page_bytes
                content_type = response.headers.get("content-type")
                if not robots and media_type(content_type) not in self._allowed_types:
                    raise Dropped("content_type_not_allowed", content_type=content_type)
                declared = response.headers.get("content-length", "")
                if not robots and declared.isdigit() and int(declared) > cap:
                    raise Dropped("too_large", content_length=int(declared), limit=cap)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > cap:
                        if robots:
                            break  # RFC 9309: parse what fits, ignore the rest
                        raise Dropped("too_large", read=len(body), limit=cap)
                return _Response(url, response, fetched_at, bytes(body[:cap]))
        except httpx.DecodingError as e:
            raise Dropped("decoding_error", error=str(e)[:200]) from None
        except httpx.InvalidURL as e:
            raise Dropped("malformed_url", error=str(e)[:200]) from None

    async def _rules(self, url: str) -> RobotsRules:
        """The robots.txt rules of ``url``'s origin: fetched once, cached here and in the frontier."""
        key = origin(url)
        lock = self._robots_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._robots:
                self._robots[key] = await self._load_rules(key)
        rules = self._robots[key]
        if isinstance(rules, Dropped):
            raise Dropped(rules.reason, **rules.detail)
        return rules

    async def _load_rules(self, key: str) -> RobotsRules | Dropped:
        cached = self.frontier.robots(key)
        if cached is not None:
            rules = parse_robots(*cached)
        else:
            try:
                status, body = await self._fetch_robots(key)
            except Dropped as d:
                if d.reason == "private_address_refused":
                    return d  # a host we may not connect to: every URL of it is refused the same way
                rules = parse_robots(None, b"")
                rules.unreachable = {"robots_error": d.reason, **d.detail}
            else:
                rules = parse_robots(status, body)
                self.frontier.save_robots(key, status, body)
        delay = rules.delay(self.cfg.user_agent)
        if delay is not None:
            if delay > self.cfg.max_crawl_delay_seconds:
                return Dropped(
                    "crawl_delay_too_long", crawl_delay=delay, limit=self.cfg.max_crawl_delay_seconds
                )
            gate = self._gate(key)
            gate.delay = max(gate.delay, delay)
        return rules

    async def _fetch_robots(self, key: str) -> tuple[int, bytes]:
        """Status and body of an origin's robots.txt; ``Dropped`` when it cannot be fetched at all."""
        url = f"{key}/robots.txt"
        for _ in range(ROBOTS_MAX_REDIRECTS + 1):
            response = await self._fetch(url, robots=True)
            location = response.redirect_to
            if location is None:
                return response.status, response.body or b""
            try:
                url = normalise_url(location, url)
            except ValueError:
                return 404, b""
        return 404, b""  # too many redirects: "unavailable", as for a 404


# --- the stage --------------------------------------------------------------------------------


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link costs nothing and leaves the work folder intact until the publish succeeds.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def crawl(cfg: CrawlConfig, store: Store) -> Manifest:
    """Crawl from the recipe's seeds and publish the WARC files, the page index and the ledger."""
    seeds, list_sha = read_seeds(cfg)
    domains = []
    for i, domain in enumerate(cfg.allowed_domains):
        name = domain.strip().lower().strip(".")
        if not name.isascii():
            # Links are compared in punycode, as normalise_url spells their hosts; a name idna
            # cannot encode stays as it is, and the check below reports it.
            with suppress(UnicodeError):
                name = name.encode("idna").decode("ascii")
        if not DOMAIN.match(name):
            raise DistilleryError(
                f"crawl {cfg.name}: allowed_domains[{i}]: {domain!r} is not a domain name (e.g. example.com)"
            )
        domains.append(name)
    scope = Scope.of_domains(domains) if domains else Scope.from_seeds((u for _, u in seeds), cfg.scope)
    kept: dict[str, None] = {}
    duplicates: list[dict[str, Any]] = []
    seed_rows: list[LinkRow] = []
    for position, (raw, url) in enumerate(seeds):
        if url in kept:
            duplicates.append(_ledger_row(record_id("seed", position, raw), "duplicate_url",
                                          {"url": raw, "duplicate_of": record_id(url)}))  # fmt: skip
            continue
        kept[url] = None
        in_scope = scope.contains(url)
        seed_rows.append(
            LinkRow(url, 0) if in_scope else LinkRow(url, 0, "dropped", "out_of_scope", {"url": url})
        )
    work = work_folder(cfg, store, list_sha)
    with locked(work), Frontier(work / "frontier.sqlite") as frontier:
        claim_work_folder(work)  # under the lock: a crawl refused as the second one owns nothing
        warcinfo = {"software": f"distillery/{__version__} (corpus.crawl)", "format": "WARC File Format 1.0",
                    "http-header-user-agent": cfg.user_agent, "robots": "obey"}  # fmt: skip
        warc = WarcSink(work / "warc", frontier, cfg.warc_file_bytes, warcinfo)
        warc.repair()
        frontier.recover()
        frontier.add(seed_rows)
        crawler = Crawler(cfg, scope, frontier, warc)
        try:
            asyncio.run(crawler.run())
        finally:
            warc.close()
        manifest = _publish(cfg, store, frontier, work, duplicates, list_sha, crawler.requests)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _ledger_row(id_: str, reason: str, detail: dict[str, Any]) -> dict[str, Any]:
    return {"id": id_, "step": STAGE, "action": "drop", "reason": reason, "score": None,
            "detail": canonical_json(detail)}  # fmt: skip


def _publish(
    cfg: CrawlConfig,
    store: Store,
    frontier: Frontier,
    work: Path,
    duplicates: list[dict[str, Any]],
    list_sha: str | None,
    requests: int,
) -> Manifest:
    pages = frontier.pages()
    index = pa.Table.from_pylist(
        [
            {"id": record_id(p.url), "parents": [], **vars(p), "warc_file": f"warc/{p.warc_file}"}
            for p in pages
        ],
        schema=INDEX_SCHEMA,
    )
    ledger = list(duplicates)
    for url, state, reason, detail in frontier.unstored():
        # A URL still pending was never fetched because the crawl reached max_pages.
        reason = reason if state == "dropped" else "max_pages_reached"
        ledger.append(_ledger_row(record_id(url), reason, detail or {"url": url}))
    reasons = Counter(row["reason"] for row in ledger)
    stats: dict[str, Any] = {
        "pages": len(pages), "bytes": sum(p.bytes for p in pages), "requests": requests,
        "urls_dropped": len(ledger), "dropped": dict(sorted(reasons.items())),
        "warc_files": len({p.warc_file for p in pages}),
    }  # fmt: skip
    if list_sha is not None:
        stats["url_list_sha256"] = list_sha
    with Publisher(store, kind="dataset", name=cfg.name, stage=STAGE, recipe=cfg.resolved()) as pub:
        (pub.dir / "warc").mkdir()
        for path in sorted((work / "warc").glob("crawl-*.warc.gz")):
            _link_or_copy(path, pub.dir / "warc" / path.name)
        pub.write_table(index)
        pub.write_ledger(ledger, step=STAGE)
        return pub.publish(stats=stats)


def run_recipe(data: dict[str, Any], store: Store, source: str) -> Manifest:
    cfg = parse_config(CrawlConfig, data, source)
    return crawl(cfg, store)
