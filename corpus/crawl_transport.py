"""How the crawler connects: only to public addresses, and politely to each host.

- ``AddressGuard`` refuses loopback, private, link-local and other non-public addresses at the
  moment a connection is opened (``http_transport`` puts it under httpx);
- ``HostGate`` spaces the requests to one host and honours a server's Retry-After.

Which URLs and addresses a crawl may reach is ``corpus.crawl_policy``; this module holds what needs
the HTTP client and the event loop, which only a crawl imports.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import httpcore
import httpx

from corpus.crawl_policy import PrivateAddressRefused, is_public_address


class AddressGuard(httpcore.AsyncNetworkBackend):
    """A network backend that only dials public addresses.

    The check sits where the socket is opened and dials the very address it checked, so a DNS
    answer that changes between a check and the connection (DNS rebinding) cannot slip through,
    and seeds, links, redirect targets and robots.txt fetches are all covered by one check.
    """

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise httpcore.ConnectError(f"cannot resolve {host}: {e}") from e
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        # One non-public answer refuses the host: a name that mixes public and internal
        # addresses is exactly what a rebinding attack looks like.
        for address in addresses:
            if not is_public_address(address):
                raise PrivateAddressRefused(host, address)
        error: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except httpcore.ConnectError as e:
                error = e
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise PrivateAddressRefused(path, "a unix socket")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def http_transport(max_connections: int, allow_private_addresses: bool) -> httpx.AsyncHTTPTransport:
    """httpx's transport, with every connection checked by ``AddressGuard`` unless private is allowed.

    Proxies from the environment are ignored: through a proxy the address check would judge the
    proxy, not the host.
    """
    limits = httpx.Limits(max_connections=max_connections)
    transport = httpx.AsyncHTTPTransport(trust_env=False, limits=limits)
    if not allow_private_addresses:
        # httpx has no public hook for the network backend; swapping the pool it wraps keeps
        # httpx's request/response handling and puts the check under every connection.
        transport._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            network_backend=AddressGuard(),
        )
    return transport


class HostGate:
    """Politeness towards one host: a concurrency limit, a minimum spacing between request starts,
    and a pause the server asked for with Retry-After (which holds back every URL of the host)."""

    def __init__(self, concurrency: int, delay: float):
        self._slots = asyncio.Semaphore(concurrency)
        self.delay = delay
        self._next = 0.0
        self._blocked_until = 0.0

    def defer(self, seconds: float) -> None:
        self._blocked_until = max(self._blocked_until, time.monotonic() + seconds)

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        async with self._slots:
            while True:
                now = time.monotonic()
                start = max(now, self._next, self._blocked_until)
                if start <= now:
                    self._next = now + self.delay
                    break
                # Re-check after waking: another request may have taken this slot meanwhile.
                await asyncio.sleep(start - now)
            yield
