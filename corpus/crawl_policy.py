"""Crawl policy: which URLs the crawler may fetch, and how politely it fetches them.

Everything here is decided without touching the frontier or the WARC files:

- ``normalise_url`` gives one spelling per URL (``HTTP://Example.COM:80/a/../b?z=1&a=2#top`` →
  ``http://example.com/b?a=2&z=1``), so de-duplication is a string comparison;
- ``Scope`` says where a crawl may go: the seeds' origins (scheme, host and port), their hosts, or
  domains and their subdomains;
- ``is_public_address`` says which addresses a crawl may connect to (``corpus.crawl_transport``
  checks it at the moment a connection is opened, and spaces the requests to each host);
- ``RobotsRules`` applies a robots.txt as RFC 9309 says;
- ``extract_links`` reads the links of an HTML page.

Nothing here opens a connection, so the corpus build (which normalises URLs for URL dedup) imports
it without the HTTP client.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.robotparser
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, Literal
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})

DOMAIN = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
"""A host name as ``normalise_url`` leaves it (lower case, punycode)."""
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


# --- URLs -------------------------------------------------------------------------------------


def _normalise_escapes(text: str, safe: str) -> str:
    """Decode escapes of unreserved characters, upper-case the rest, escape what must be (RFC 3986 6.2.2)."""

    def fix(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    return quote(_ESCAPE.sub(fix, text), safe=safe)


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")
    out: list[str] = []
    for segment in segments[1:]:
        if segment == ".":
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")
    return "/" + "/".join(out)


def normalise_url(url: str, base: str | None = None) -> str:
    """The canonical spelling of an http(s) URL, resolved against ``base``; ``ValueError`` if malformed.

    Scheme and host are lower-cased, an internationalised host becomes punycode, the default port,
    user info and fragment are dropped, dot segments are resolved, percent-escapes are made
    canonical and the query parameters are sorted (their order rarely changes the page, and a
    crawler that treats ``?a=1&b=2`` and ``?b=2&a=1`` as two pages fetches it twice).
    """
    try:
        text = urljoin(base, url.strip()) if base is not None else url.strip()
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"malformed URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError("not an http or https URL")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("no host")
    if ":" in host:
        try:
            netloc = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise ValueError(f"malformed IPv6 host {host!r}") from None
    else:
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise ValueError(f"host {host!r} is not a valid internationalised name") from None
        if not DOMAIN.match(host):
            raise ValueError(f"malformed host {host!r}")
        netloc = host
    if port is not None and port != DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    path = _normalise_escapes(_remove_dot_segments(parts.path or "/"), safe="/%:@!$&'()*+,;=")
    params = sorted(_normalise_escapes(p, safe="=%:@!$'()*+,;/?") for p in parts.query.split("&") if p)
    return urlunsplit((scheme, netloc, path, "&".join(params), ""))


def host_key(url: str) -> str:
    """The host a URL's requests count against (host and port): the unit of politeness."""
    return urlsplit(url).netloc


def origin(url: str) -> str:
    """``scheme://host[:port]``: the unit robots.txt applies to (RFC 9309 section 2.3)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


ScopeKind = Literal["origin", "host", "domain"]


def _authority(url: str) -> tuple[str, str, int]:
    """Scheme, host and port of a URL as ``normalise_url`` spells them (lower case, no trailing dot,
    IPv6 compressed, the scheme's default port filled in); ``ValueError`` if it has none."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in DEFAULT_PORTS or not host:
        raise ValueError("not an http(s) URL with a host")
    if ":" in host:
        host = ipaddress.IPv6Address(host).compressed
    return scheme, host, parts.port or DEFAULT_PORTS[scheme]


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Scope:
    """Where a crawl may go, checked for every seed, link and redirect target.

    - ``origin``: the scheme, host and port of a seed (``http://a/`` and ``http://a:80/`` are one
      origin; ``https://a/`` and ``http://a:8080/`` are others). Another port on the same host is
      another service, and following a redirect or link to it could reach one the crawl was not
      pointed at — with private addresses allowed, an internal one.
    - ``host``: a seed's host, on any scheme and port.
    - ``domain``: each listed domain and its subdomains, on any scheme and port. An IP address has no
      subdomains: it matches itself only.
    """

    def __init__(self, kind: ScopeKind, allowed: Iterable[str]):
        if kind not in ("origin", "host", "domain"):
            raise ValueError(f"unknown scope {kind!r}")
        self.kind = kind
        self.allowed = frozenset(allowed)
        self._suffixes = tuple("." + d for d in sorted(self.allowed) if not _is_ip_literal(d))

    @classmethod
    def from_seeds(cls, urls: Iterable[str], kind: ScopeKind = "origin") -> Scope:
        authorities = []
        for url in urls:
            with suppress(ValueError):
                authorities.append(_authority(url))
        if kind == "origin":
            return cls(kind, (f"{scheme}://{host}:{port}" for scheme, host, port in authorities))
        if kind == "host":
            return cls(kind, (host for _, host, _ in authorities))
        # ``www.`` is dropped so that example.com and www.example.com, which are almost always
        # one site, stay in scope of each other.
        return cls.of_domains(host[4:] if host.startswith("www.") else host for _, host, _ in authorities)

    @classmethod
    def of_domains(cls, domains: Iterable[str]) -> Scope:
        return cls("domain", (d.strip().lower().strip(".") for d in domains if d.strip()))

    def contains(self, url: str) -> bool:
        try:
            scheme, host, port = _authority(url)
        except ValueError:
            return False
        if self.kind == "origin":
            return f"{scheme}://{host}:{port}" in self.allowed
        if host in self.allowed:
            return True
        if self.kind == "host" or _is_ip_literal(host):
            return False
        return host.endswith(self._suffixes)


# --- addresses --------------------------------------------------------------------------------


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address; False for loopback, private, link-local…"""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        # An IPv4 address wrapped in IPv6 (::ffff:127.0.0.1, 6to4, Teredo) is judged as itself.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


class PrivateAddressRefused(Exception):
    """A host resolved to an address the crawl may not connect to."""

    def __init__(self, host: str, address: str):
        super().__init__(f"{host} resolves to the non-public address {address}")
        self.host = host
        self.address = address


@dataclass
class RobotsRules:
    """One origin's robots.txt, applied as RFC 9309 says."""

    parser: urllib.robotparser.RobotFileParser | None
    """None when nothing is restricted (no robots.txt: 4xx)."""
    disallow_all: bool = False
    """The robots.txt was unreachable (5xx, 429, network errors): crawl nothing (RFC 9309 2.3.1.4)."""
    unreachable: dict[str, Any] | None = None
    """Why it was unreachable (status or last error), for the ledger."""

    def allows(self, url: str, user_agent: str) -> bool:
        if self.disallow_all:
            return False
        return self.parser is None or self.parser.can_fetch(user_agent, url)

    def delay(self, user_agent: str) -> float | None:
        """Seconds between requests that the robots.txt asks for (Crawl-delay or Request-rate)."""
        if self.parser is None:
            return None
        delay = self.parser.crawl_delay(user_agent)
        rate = self.parser.request_rate(user_agent)
        candidates = [float(delay)] if delay is not None else []
        if rate is not None and rate.requests > 0:
            candidates.append(rate.seconds / rate.requests)
        return max(candidates) if candidates else None


ROBOTS_MAX_BYTES = 512 * 1024
"""RFC 9309 asks crawlers to parse at least the first 500 KiB."""


def parse_robots(status: int | None, body: bytes) -> RobotsRules:
    """Rules from a robots.txt fetch: ``status`` None means it could not be fetched at all."""
    if status is None or status == 429 or status >= 500:
        return RobotsRules(parser=None, disallow_all=True, unreachable={"robots_status": status})
    if not 200 <= status < 300:
        return RobotsRules(parser=None)
    parser = urllib.robotparser.RobotFileParser()
    parser.parse(body[:ROBOTS_MAX_BYTES].decode("utf-8", errors="replace").splitlines())
    return RobotsRules(parser=parser)


# --- links ------------------------------------------------------------------------------------


class _LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []
        self.base: str | None = None
        self.nofollow = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag in ("a", "area") and values.get("href"):
            if "nofollow" not in values.get("rel", "").lower().split():
                self.hrefs.append(values["href"])
        elif tag == "base" and values.get("href") and self.base is None:
            self.base = values["href"]
        elif tag == "meta" and values.get("name", "").lower() == "robots":
            self.nofollow |= "nofollow" in values.get("content", "").lower()


def media_type(content_type: str | None) -> str:
    """``text/html; charset=utf-8`` → ``text/html``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _charset(content_type: str | None) -> str:
    for param in (content_type or "").split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip("\"'")
    return "utf-8"


def extract_links(body: bytes, content_type: str | None, page_url: str, limit: int) -> list[str]:
    """Normalised http(s) links of an HTML page, in document order, at most ``limit``.

    ``<base href>`` is honoured, and so are ``rel="nofollow"`` and ``<meta name="robots"
    content="nofollow">``. Bytes that are not valid in the page's charset become U+FFFD here only:
    the page itself is stored as it came.
    """
    try:
        text = body.decode(_charset(content_type), errors="replace")
    except LookupError:
        text = body.decode("utf-8", errors="replace")
    parser = _LinkParser()
    try:
        parser.feed(text)
        parser.close()
    except (AssertionError, ValueError):
        pass  # html.parser gives up on a few pathological inputs; keep the links found so far
    if parser.nofollow:
        return []
    base = page_url
    if parser.base:
        with suppress(ValueError):
            base = normalise_url(parser.base, page_url)
    links: dict[str, None] = {}
    for href in parser.hrefs:
        if len(links) >= limit:
            break
        try:
            links[normalise_url(href, base)] = None
        except ValueError:
            continue  # mailto:, javascript:, malformed: not pages to crawl
    return list(links)
