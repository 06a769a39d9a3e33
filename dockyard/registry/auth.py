"""Basic authentication against an htpasswd file of bcrypt hashes, without letting password
checks stall the registry: bcrypt runs on a small pool of threads (at most VERIFY_PENDING_MAX
checks running or waiting, more are answered 429), requests carrying the same credentials at the
same time share one check, successful checks are remembered for a while (in a bounded table, by
a hash of the credentials), and an address that keeps sending wrong credentials for a user gets
its 401s for that user later and later (the event loop's timer waits, no thread) and only a few
checks at once, while other users behind the same address (a NAT, a proxy) are not held back
until the address as a whole fails far more. A user name that does not exist costs a bcrypt
check all the same, so the time of a 401 does not tell which names do."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Union

from dockyard.registry.errors import TooManyRequests, Unauthorized, Unsupported

# Threads running bcrypt (a cost-12 check holds one CPU for about 0.3 s, with the GIL released).
VERIFY_THREADS = 2
# bcrypt checks running or waiting for a thread, at most; more are answered 429 at once.
VERIFY_PENDING_MAX = 32
# Successful checks remembered, at most (the least recently used are forgotten first).
CACHE_ENTRIES = 1024
# Seconds a successful check is remembered.
CACHE_SECONDS = 300.0
# Wrong passwords for one user an address may send in a row before their 401s are delayed.
FREE_FAILURES = 5
# Seconds the first delayed 401 waits; each further failure in a row doubles it, up to the max.
FAILURE_DELAY = 0.25
# Longest wait before a 401 (seconds).
FAILURE_DELAY_MAX = 8.0
# Seconds after its last failure an address starts again from no failures.
FAILURE_MEMORY = 900.0
# Failing (address, user) pairs and addresses remembered, at most (the least recently seen are
# forgotten first).
CLIENTS_MAX = 4096
# Checks (each with its wait) for one user an address past FREE_FAILURES for that user may have
# at once; more get 429.
FAILING_CLIENT_CHECKS = 2
# Failures in a row an address may have over all user names before every 401 it gets is delayed
# too (the same schedule from there); a much higher bound than one user's, so that a host that
# keeps failing does not lock out the other users behind the same address.
ADDRESS_FREE_FAILURES = 100
# Checks an address past ADDRESS_FREE_FAILURES may have at once over all users; more get 429.
FAILING_ADDRESS_CHECKS = 16
# bcrypt cost of the stand-in hash checked for unknown user names when no user has a hash.
DUMMY_COST = 10
# IPv6 clients are counted by network of this prefix length: one host commonly holds a /64.
IPV6_CLIENT_PREFIX = 64
# Bytes of a password bcrypt uses; bcrypt>=5 raises for longer ones where 4 (and distribution,
# and htpasswd when hashing) use the first 72.
BCRYPT_PASSWORD_MAX = 72


@dataclass
class _Client:
    """One address, or one user name from an address: its failures in a row, when the last one
    was, its checks under way."""

    failures: int = 0
    last_failure: float = 0.0
    checks: int = 0


class BasicAuth:
    """Checks `Authorization: Basic` headers against `users` (user name → bcrypt hash)."""

    def __init__(self, realm: str, users: dict[str, bytes]) -> None:
        self.realm = realm
        self.users = users
        self._threads = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="bcrypt")
        self._pending = 0
        # checks under way, by credentials key: requests with the same credentials share one
        self._running: dict[bytes, asyncio.Future[bool]] = {}
        # credentials key → monotonic time the success is forgotten, least recently used first
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        # address (see _client_key), or (address, hash of the user name) → _Client, least
        # recently seen first
        self._clients: OrderedDict[Union[str, tuple[str, bytes]], _Client] = OrderedDict()
        # checked instead of a hash for unknown user names: as slow as the users' own
        self._dummy = _dummy_hash(users.values())

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def _challenge(self) -> Unauthorized:
        return Unauthorized({"realm": self.realm})

    async def check(self, header: Optional[str], remote: Optional[str]) -> None:
        """Return when `header` carries a user's right password; raise Unauthorized (with the
        challenge) when it does not, TooManyRequests when the check cannot be taken on now."""
        credentials = _credentials(header)
        if credentials is None:
            raise self._challenge()
        user, password = credentials
        key = hashlib.sha256(user + b"\0" + password).digest()
        if self._cached(key, time.monotonic()):
            return
        now = time.monotonic()
        address = _client_key(remote)
        pair = (address, hashlib.sha256(user).digest())
        site, client = self._client(address, now), self._client(pair, now)
        if client.failures >= FREE_FAILURES and client.checks >= FAILING_CLIENT_CHECKS:
            wait = math.ceil(_delay(client.failures + 1))
            raise TooManyRequests(
                {"retry_after": wait}, message="too many failed logins for this user"
            )
        if site.failures >= ADDRESS_FREE_FAILURES and site.checks >= FAILING_ADDRESS_CHECKS:
            wait = math.ceil(_delay(site.failures + 1, ADDRESS_FREE_FAILURES))
            raise TooManyRequests(
                {"retry_after": wait}, message="too many failed logins from this address"
            )
        client.checks += 1
        site.checks += 1
        try:
            if await self._verify(key, user, password):
                client.failures = 0  # this user from this address only
                self._remember(key, time.monotonic())
                return
            now = time.monotonic()
            for entry in (client, site):
                entry.failures += 1
                entry.last_failure = now
            delay = max(_delay(client.failures), _delay(site.failures, ADDRESS_FREE_FAILURES))
            if delay:
                await asyncio.sleep(delay)
            raise self._challenge()
        finally:
            client.checks -= 1
            site.checks -= 1
            for name, entry in ((pair, client), (address, site)):
                if not entry.checks and not entry.failures and self._clients.get(name) is entry:
                    del self._clients[name]

    async def _verify(self, key: bytes, user: bytes, password: bytes) -> bool:
        running = self._running.get(key)
        if running is None:
            try:
                stored = self.users.get(user.decode("utf-8"))
            except UnicodeDecodeError:
                stored = None
            if stored is None:
                stored = self._dummy  # the same work as for a user's hash: no timing tell
            if self._pending >= VERIFY_PENDING_MAX:
                raise TooManyRequests({"retry_after": 1}, message="too many logins at once")
            self._pending += 1
            loop = asyncio.get_running_loop()
            running = loop.run_in_executor(self._threads, bcrypt_ok, password, stored)
            self._running[key] = running
            running.add_done_callback(lambda _done: self._finished(key))
        # shielded: a request that goes away does not cancel a check others may share
        return await asyncio.shield(running)

    def _finished(self, key: bytes) -> None:
        self._pending -= 1
        self._running.pop(key, None)

    def _cached(self, key: bytes, now: float) -> bool:
        expires = self._cache.get(key)
        if expires is None:
            return False
        if expires <= now:
            del self._cache[key]
            return False
        self._cache.move_to_end(key)
        return True

    def _remember(self, key: bytes, now: float) -> None:
        self._cache[key] = now + CACHE_SECONDS
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)

    def _client(self, name: Union[str, tuple[str, bytes]], now: float) -> _Client:
        """The entry of an address or an (address, user) pair (made if new), its failures
        forgotten after FAILURE_MEMORY; the table keeps entries with failures or checks under
        way, CLIENTS_MAX at most."""
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = _Client()
            while len(self._clients) > CLIENTS_MAX:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(name)
            if client.failures and now - client.last_failure > FAILURE_MEMORY:
                client.failures = 0
        return client


def _credentials(header: Optional[str]) -> Optional[tuple[bytes, bytes]]:
    """(user, password) of a Basic Authorization header, None when it is not one."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


def _client_key(remote: Optional[str]) -> str:
    """Whom failures are counted for: the peer's IPv4 address, or its IPv6 /64 network."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or ""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/{IPV6_CLIENT_PREFIX}", strict=False))
    return str(address)


def _delay(failures: int, free: int = FREE_FAILURES) -> float:
    """Seconds to wait before answering the 401 of the `failures`-th failure in a row of a user
    from an address (of an address over all users: `free` is ADDRESS_FREE_FAILURES)."""
    if failures <= free:
        return 0.0
    doublings = min(failures - free - 1, 32)
    return float(min(FAILURE_DELAY * 2**doublings, FAILURE_DELAY_MAX))


def _dummy_hash(hashes: Iterable[bytes]) -> bytes:
    """A well-formed bcrypt hash no password matches in practice (zero salt and digest), at
    the highest cost among `hashes` (DUMMY_COST without any): checking it takes as long as
    checking the slowest user's."""
    costs = [int(h[4:6]) for h in hashes if h[4:6].isdigit() and h[6:7] == b"$"]
    cost = max(costs, default=DUMMY_COST)
    return b"$2b$%02d$" % cost + b"." * 53


def bcrypt_ok(password: bytes, stored: bytes) -> bool:
    """Whether `password` matches the bcrypt hash `stored`, on its first BCRYPT_PASSWORD_MAX bytes
    as bcrypt defines it (runs on a thread: a cost-12 check takes about 0.3 s of CPU)."""
    import bcrypt

    if stored.startswith(b"$2y$"):
        stored = b"$2b$" + stored[4:]
    try:
        return bool(bcrypt.checkpw(password[:BCRYPT_PASSWORD_MAX], stored))
    except ValueError:
        return False


def load_htpasswd(path: str) -> dict[str, bytes]:
    """user → bcrypt hash; any other hash scheme is refused (bcrypt entries only)."""
    entries: dict[str, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hashed = line.partition(":")
            if not sep or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
                raise ValueError(
                    f"{path}:{number}: entry for {user!r} is not bcrypt "
                    "(create it with htpasswd -B)"
                )
            entries[user] = hashed.encode()
    return entries


# Methods that change storage: refused in read-only mode.
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def check_access(
    auth: Optional[BasicAuth],
    readonly: bool,
    method: str,
    authorization: Optional[str],
    remote: Optional[str],
) -> None:
    """Whether a request to the API may go on: its credentials (when basic auth is configured:
    Unauthorized, TooManyRequests) and, in read-only mode, its method (Unsupported)."""
    if auth is not None:
        await auth.check(authorization, remote)
    if readonly and method in WRITE_METHODS:
        raise Unsupported(message="the registry is in read-only mode")
