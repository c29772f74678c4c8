"""The Katapult Core API client: auth, paging, pacing, retries and error mapping."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import TypeVar

import httpx

from auditor.domain.models import Attachment, BackupPolicy, Disk, TargetType, VirtualMachine
from auditor.domain.retry import backoff, parse_retry_after
from auditor.domain.tiers import Selector
from auditor.errors import (
    KatapultAPIError,
    KatapultError,
    KatapultResponseError,
    KatapultTransportError,
    RateLimitedError,
    ResponseTooLargeError,
    UnavailableError,
    UnexpectedObjectError,
)
from auditor.katapult import wire
from auditor.katapult.pacing import RateLimiter
from auditor.log import Redactor

logger = logging.getLogger(__name__)

T = TypeVar("T")
Item = TypeVar("Item", Disk, VirtualMachine)

DISK_POLICIES = "/disks/disk/disk_backup_policies"
VM_POLICIES = "/virtual_machines/virtual_machine/disk_backup_policies"
ORG_POLICIES = "/organizations/organization/disk_backup_policies"
ORG_DISKS = "/organizations/organization/disks"
DISK = "/disks/disk"
VM = "/virtual_machines/virtual_machine"
ORG_VMS = "/organizations/organization/virtual_machines"
VM_DISKS = "/virtual_machines/virtual_machine/disks"
ORGANIZATIONS = "/organizations"
POLICY = "/disk_backup_policies/disk_backup_policy"
WRITE_ENDPOINTS = (DISK_POLICIES, VM_POLICIES, POLICY)

# README: per_page is at most 200; more is 400 invalid_argument.
MAX_PER_PAGE = 200
# A runaway server (large_set pages that never come back short) stops here.
MAX_PAGES = 10_000
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# Without Retry-After, a 429 waits a few request slots of the budget in detail.total_permitted, at least 1 s.
RATE_LIMIT_SLOTS = 4
RATE_LIMIT_MIN_WAIT = 1.0
# The largest body read into memory; beyond it the request fails (config katapult.max_response_bytes). A full
# 200-row page of policies is well under 1 MiB.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# Rate-limit headers past this are not believed (README: 1000 and 200 per minute have been seen).
_MAX_HEADER_INT = 2**31 - 1
_REDACTED = "[redacted]"


Params = dict[str, str | list[str]]


def annotation_filter(selector: Selector) -> Params:
    """Returns the query of a filtered listing: `annotations[][key]` and, unless the keys stand alone, values.

    README: both arrays must have the same number of elements; a listing of keys without values finds the
    objects that have those keys with any value. A selector is all pairs or all keys (see TierMatch.selectors).
    """
    if not selector:
        return {}
    keys = [key for key, _ in selector]
    values = [value for _, value in selector]
    if all(v is None for v in values):
        return {"annotations[][key]": keys}
    if any(v is None for v in values):
        raise ValueError("a selector is all (key, value) pairs or all keys")
    return {"annotations[][key]": keys, "annotations[][value]": [v for v in values if v is not None]}


@dataclass(frozen=True)
class OrgRef:
    """An organization named by id (`org_…`) or by sub-domain."""

    value: str

    def __post_init__(self) -> None:
        if not self.value:
            raise ValueError("an organization reference must not be empty")

    def params(self) -> Params:
        """Returns the lookup query: organization[id] for `org_…`, else organization[sub_domain]."""
        # README: organization[id]=org_XXXX or organization[sub_domain]=acme (mutually exclusive).
        if self.value.startswith("org_"):
            return {"organization[id]": self.value}
        return {"organization[sub_domain]": self.value}


@dataclass
class RequestStats:
    """Counts of HTTP requests sent, retries, 429s and outcomes by status (or transport failure kind)."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    by_status: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        """Counts one outcome (an HTTP status like "200", or "timeout" / "connection_error")."""
        self.by_status[outcome] = self.by_status.get(outcome, 0) + 1

    def snapshot_and_reset(self) -> RequestStats:
        """Returns a copy of the counts and zeroes these."""
        snapshot = RequestStats(
            requests=self.requests,
            retries=self.retries,
            rate_limited=self.rate_limited,
            by_status=dict(self.by_status),
        )
        self.requests = self.retries = self.rate_limited = 0
        self.by_status = {}
        return snapshot


class _Secret:
    """Holds the API token so that no repr, log or traceback shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "_Secret('***')"

    def reveal(self) -> str:
        """Returns the secret itself."""
        return self._value


class KatapultClient:
    """Reads disks and disk backup policies from the Katapult Core API v1."""

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        per_page: int = MAX_PER_PAGE,
        max_requests_per_minute: int = 1000,
        max_concurrency: int = 8,
        timeout: float = 30.0,
        max_attempts: int = 6,
        max_retry_seconds: float = 120.0,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        limiter: RateLimiter | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if isinstance(per_page, bool) or not 1 <= per_page <= MAX_PER_PAGE:
            raise ValueError(f"per_page must be between 1 and {MAX_PER_PAGE}")
        if max_requests_per_minute <= 0 or max_concurrency < 1 or max_attempts < 1:
            raise ValueError("max_requests_per_minute, max_concurrency and max_attempts must be positive")
        if timeout <= 0 or max_retry_seconds < 0:
            raise ValueError("timeout must be positive and max_retry_seconds not negative")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http:// or https:// URL")
        if not token:
            raise ValueError("token must not be empty")
        if isinstance(max_response_bytes, bool) or max_response_bytes < 1:
            raise ValueError("max_response_bytes must be positive")
        self._base_url = base_url.rstrip("/")
        self._token = _Secret(token)
        # What blanks the token out of whatever Katapult (or a proxy) echoes back: errors raised here, and what the
        # callers record of an answer (`auditor apply` joins the read and write clients' redactors).
        self.redactor = Redactor((token,), mask=_REDACTED)
        self._per_page = per_page
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._max_retry_seconds = max_retry_seconds
        self._max_response_bytes = max_response_bytes
        self._sleep = sleep
        # The limiter waits in real time; `sleep` is only for retry backoff (tests inject a no-op there).
        self._limiter = limiter or RateLimiter(max_requests_per_minute, reserve=max_concurrency + 2)
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._random = random.Random()
        self.stats = RequestStats()
        self._http = httpx.AsyncClient(
            base_url=self._base_url,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": "katapult-backup-auditor",
            },
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"KatapultClient(base_url={self._base_url!r})"

    @property
    def limiter(self) -> RateLimiter:
        """Returns the rate limiter pacing this client's requests."""
        return self._limiter

    async def __aenter__(self) -> KatapultClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Closes the HTTP connections."""
        await self._http.aclose()

    async def list_disk_policies(self, disk_id: str) -> list[BackupPolicy]:
        """Returns every backup policy of one disk."""
        # README: the lookup is disk[id]=…, never disk_id (without it "disk" is looked up by name: 404).
        return await self._list_policies(DISK_POLICIES, {"disk[id]": disk_id}, target=disk_id)

    async def list_vm_policies(self, vm_id: str) -> list[BackupPolicy]:
        """Returns every backup policy attached to one virtual machine; raises UnexpectedObjectError if one of them
        targets anything else."""
        policies = await self._list_policies(VM_POLICIES, {"virtual_machine[id]": vm_id}, target=vm_id)
        # README: without include_disks=true this list holds the VM's own policies only. One targeting another
        # object means the answer is not about this VM: dropping it would read as "no such policy" for a disk it
        # may cover, and keeping it would judge a disk by a policy that is not its VM's.
        for index, p in enumerate(policies):
            if p.target_type is not TargetType.VIRTUAL_MACHINE or p.target_id != vm_id:
                raise UnexpectedObjectError(
                    wire.clip(f"GET {VM_POLICIES}: asked for the policies of virtual machine {vm_id}, "
                              f"disk_backup_policies[{index}] ({p.id}) targets {p.target_type.value} {p.target_id}"),
                    field=f"disk_backup_policies[{index}].target",
                    target=vm_id,
                    endpoint=VM_POLICIES,
                    status_code=200,
                )
        return policies

    async def list_org_policies(self, org: OrgRef) -> list[BackupPolicy]:
        """Returns every backup policy of an organization."""
        return await self._list_policies(ORG_POLICIES, org.params(), target=org.value)

    async def list_org_disks(self, org: OrgRef) -> list[Disk]:
        """Returns every disk of an organization, each tied to the VM it is attached to (if any)."""
        return await self._list_org(ORG_DISKS, org, (), wire.parse_disk_page)

    async def list_org_vms(self, org: OrgRef, selector: Selector = ()) -> list[VirtualMachine]:
        """Returns an organization's virtual machines, only those with the `selector`'s annotations if given."""
        return await self._list_org(ORG_VMS, org, selector, wire.parse_vm_page)

    async def list_org_disks_with(self, org: OrgRef, selector: Selector) -> list[Disk]:
        """Returns an organization's disks that have the `selector`'s annotations (one filtered listing)."""
        return await self._list_org(ORG_DISKS, org, selector, wire.parse_disk_page)

    async def _list_org(self, endpoint: str, org: OrgRef, selector: Selector,
                        parse: Callable[..., wire.Page[Item]]) -> list[Item]:
        return await self._list(
            endpoint,
            {**org.params(), **annotation_filter(selector)},
            target=org.value,
            parse=lambda body, page: parse(body, endpoint=endpoint, target=org.value, page=page),
            key=lambda item: item.id,
        )

    async def list_vm_disks(self, vm_id: str) -> dict[str, Attachment | None]:
        """Returns the attachment of every disk of one virtual machine, by disk id (None: no state sent)."""
        # README: GET /virtual_machines/virtual_machine/disks is paginated, key `disks`, items carry `state`.
        pairs = await self._list(
            VM_DISKS, {"virtual_machine[id]": vm_id}, target=vm_id,
            parse=lambda body, page: wire.parse_vm_disk_page(body, endpoint=VM_DISKS, target=vm_id, page=page),
            key=lambda pair: pair[0],
        )
        return dict(pairs)

    async def list_organizations(self) -> list[tuple[str, str | None]]:
        """Returns (id, sub_domain) of every organization the token can see (one request: not paginated)."""
        body = await self._get(ORGANIZATIONS, {}, target="organizations")
        return wire.parse_organizations(body, endpoint=ORGANIZATIONS)

    async def get_vm(self, vm_id: str) -> VirtualMachine:
        """Returns one virtual machine with its organization and annotations."""
        return await self._get_one(VM, {"virtual_machine[id]": vm_id}, vm_id, wire.parse_vm_response,
                                   noun="virtual machine", field="virtual_machine.id")

    async def get_disk(self, disk_id: str) -> Disk:
        """Returns one disk; raises UnexpectedObjectError if Katapult answers about another disk."""
        return await self._get_one(DISK, {"disk[id]": disk_id}, disk_id, wire.parse_disk_response,
                                   noun="disk", field="disk.id")

    async def write(self, method: str, endpoint: str, body: dict[str, object], *, target: str) -> dict[str, object]:
        """Sends one policy write (POST or PATCH to a write endpoint) and returns Katapult's JSON answer.

        Never retried except after a 429, which Katapult answers before doing anything: a write whose answer was
        lost is not repeated blindly (the caller re-reads Katapult to learn what happened). Raises the typed error.
        """
        # README "Writing policies": POST /disks/disk/disk_backup_policies, POST
        # /virtual_machines/virtual_machine/disk_backup_policies, PATCH /disk_backup_policies/disk_backup_policy.
        if method not in ("POST", "PATCH") or endpoint not in WRITE_ENDPOINTS:
            raise ValueError(f"not a policy write: {method} {endpoint}")
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._send(endpoint, {}, target=target, method=method, body=body)
            except RateLimitedError as exc:
                if attempt >= self._max_attempts:
                    raise
                delay, _required = self._retry_delay(exc, attempt)
                self.stats.retries += 1
                await self._sleep(min(delay, self._max_retry_seconds))

    async def _get_one(self, endpoint: str, lookup: Params, object_id: str, parse: Callable[..., Item], *,
                       noun: str, field: str) -> Item:
        body = await self._get(endpoint, lookup, target=object_id)
        found = parse(body, endpoint=endpoint, target=object_id)
        # README: GET /disks/disk?disk[id]=X answers {"disk": {...}} for disk X. Another id means a confused cache,
        # proxy or server; using it would attribute one object's state to another.
        if found.id != object_id:
            raise UnexpectedObjectError(
                wire.clip(f"GET {endpoint}: asked for {noun} {object_id}, Katapult answered about {noun} "
                          f"{found.id!r}"),
                field=field,
                target=object_id,
                endpoint=endpoint,
                status_code=200,
            )
        return found

    async def _list_policies(self, endpoint: str, lookup: Params, *, target: str) -> list[BackupPolicy]:
        return await self._list(
            endpoint,
            lookup,
            target=target,
            parse=lambda body, page: wire.parse_policy_page(body, endpoint=endpoint, target=target, page=page),
            key=lambda policy: policy.id,
        )

    async def _list(
        self,
        endpoint: str,
        lookup: Params,
        *,
        target: str,
        parse: Callable[[dict[str, object], int], wire.Page[T]],
        key: Callable[[T], str],
    ) -> list[T]:
        """Returns the items of every page of a list endpoint, in order, without duplicates."""
        items: list[T] = []
        seen: set[str] = set()
        page = 1
        while True:
            if page > MAX_PAGES:
                raise KatapultResponseError(
                    f"GET {endpoint} for {target}: still paging after {MAX_PAGES} pages; giving up",
                    field="pagination",
                    target=target,
                    endpoint=endpoint,
                    status_code=200,
                )
            params = {**lookup, "page": str(page), "per_page": str(self._per_page)}
            result = parse(await self._get(endpoint, params, target=target), page)
            fresh = 0
            for item in result.items:
                item_key = key(item)
                if item_key not in seen:
                    seen.add(item_key)
                    items.append(item)
                    fresh += 1
            if not result.items:
                break
            pagination = result.pagination
            if pagination.large_set or pagination.total_pages is None:
                # README: with large_set, total and total_pages are null: page until a page comes back shorter
                # than per_page. Trust the server's per_page if it reports a smaller one than we asked for.
                page_size = min(self._per_page, pagination.per_page or self._per_page)
                if len(result.items) < page_size:
                    break
                if fresh == 0:
                    # A full page of rows we already have: the server is ignoring `page`.
                    raise KatapultResponseError(
                        f"GET {endpoint} for {target}: page {page} repeats earlier rows; giving up",
                        field="pagination",
                        target=target,
                        endpoint=endpoint,
                        status_code=200,
                    )
            elif page >= pagination.total_pages:
                # README: otherwise stop after page total_pages (an empty list has total_pages 0).
                break
            elif page == 1:
                # The page count is known: ask for the remaining pages at once (the limiter and the concurrency
                # bound still pace them), instead of one round trip after another. Same requests, less wall time.
                last = min(pagination.total_pages, MAX_PAGES)
                for number, body in enumerate(await self._get_pages(endpoint, lookup, range(2, last + 1),
                                                                    target=target), start=2):
                    for item in parse(body, number).items:
                        item_key = key(item)
                        if item_key not in seen:
                            seen.add(item_key)
                            items.append(item)
                break
            page += 1
        return items

    async def _get_pages(
        self, endpoint: str, lookup: Params, pages: range, *, target: str
    ) -> list[dict[str, object]]:
        """Returns the bodies of several pages fetched concurrently, in page order; the first failure wins."""
        tasks = [
            asyncio.ensure_future(
                self._get(endpoint, {**lookup, "page": str(p), "per_page": str(self._per_page)}, target=target)
            )
            for p in pages
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _get(self, endpoint: str, params: Params, *, target: str) -> dict[str, object]:
        """Returns the decoded JSON body of a GET, retrying transient failures."""
        started = time.monotonic()
        slept = 0.0
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._send(endpoint, params, target=target)
            except KatapultError as exc:
                if exc.permanent or attempt >= self._max_attempts:
                    raise
                # Time already spent; an injected no-op sleep still counts the time it was asked to wait.
                spent = max(time.monotonic() - started, slept)
                budget = self._max_retry_seconds - spent
                delay, required = self._retry_delay(exc, attempt)
                if budget <= 0 or (required and delay > budget):
                    raise
                delay = min(delay, budget)
                self.stats.retries += 1
                logger.warning(
                    "GET %s for %s failed (%s, status %s); retry %d of %d in %.2fs",
                    endpoint,
                    target,
                    exc.code,
                    exc.status_code if exc.status_code is not None else "-",
                    attempt,
                    self._max_attempts - 1,
                    delay,
                )
                await self._sleep(delay)
                slept += delay

    def _retry_delay(self, exc: KatapultError, attempt: int) -> tuple[float, bool]:
        """Returns the wait before the next attempt and whether the server required it (Retry-After)."""
        jittered = backoff(attempt, base=BACKOFF_BASE, cap=BACKOFF_CAP, random=self._random.random)
        if isinstance(exc, RateLimitedError | UnavailableError) and exc.retry_after is not None:
            return exc.retry_after, True
        if isinstance(exc, RateLimitedError):
            return max(self._rate_limit_wait(wire.total_permitted(exc.detail)), jittered), False
        return jittered, False

    def _rate_limit_wait(self, permitted: int | None) -> float:
        """Returns the wait after a 429 without Retry-After: a few request slots of the budget, at least 1 s."""
        # README: a 429 carries detail.total_permitted (requests per minute); no Retry-After was ever seen.
        per_minute = permitted or self._limiter.per_minute
        return max(RATE_LIMIT_MIN_WAIT, 60.0 / per_minute * RATE_LIMIT_SLOTS)

    async def _send(self, endpoint: str, params: Params, *, target: str, method: str = "GET",
                    body: dict[str, object] | None = None) -> dict[str, object]:
        """Sends one paced request (a GET unless `method` says otherwise, with `body` as JSON) and returns its JSON
        body, or raises the typed error for the outcome."""
        async with self._semaphore:
            started_at = await self._limiter.acquire()
            self.stats.requests += 1
            begin = time.monotonic()
            try:
                # Streamed, so a body past the cap is never held in memory (nor decompressed past it).
                async with self._http.stream(method, endpoint, params=params or None, json=body) as response:
                    content = await self._read_body(response)
            except httpx.TimeoutException as exc:
                self._count_failure("timeout", endpoint, target, begin)
                raise KatapultTransportError(
                    f"{method} {endpoint} for {target}: timed out after {self._timeout:g}s ({type(exc).__name__})",
                    kind="timeout",
                    target=target,
                    endpoint=endpoint,
                ) from None
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                # from None: the httpx exception holds the request, and with it the Authorization header.
                kind = "connection_error" if isinstance(exc, httpx.NetworkError) else "transport_error"
                self._count_failure(kind, endpoint, target, begin)
                raise KatapultTransportError(
                    self.redactor.text(f"{method} {endpoint} for {target}: {type(exc).__name__}: {exc}"),
                    kind=kind,
                    target=target,
                    endpoint=endpoint,
                ) from None
        elapsed = time.monotonic() - begin
        status = response.status_code
        self.stats.count(str(status))
        logger.debug("GET %s for %s page %s -> %d in %.3fs", endpoint, target, params.get("page", "-"), status, elapsed)
        # README: every response carries X-RateLimit-Permitted and X-RateLimit-Remaining.
        self._limiter.observe(
            permitted=_int_header(response, "X-RateLimit-Permitted"),
            remaining=_int_header(response, "X-RateLimit-Remaining"),
        )
        if 200 <= status < 300:
            self._limiter.on_success()
            if content is None:
                raise self._too_large(endpoint, target, status)
            return wire.decode_json(content, endpoint=endpoint, target=target, status_code=status)
        # Katapult has not been seen sending Retry-After (README); if it does, seconds and HTTP-dates are both read.
        retry_after = parse_retry_after(response.headers.get("Retry-After"), now=datetime.now(UTC))
        if content is None:
            # Pacing still follows the status and headers; only the body is refused.
            self._after_refusal(
                rate_limited=status == 429,
                unavailable=status >= 500,
                permitted=None,
                retry_after=retry_after,
                endpoint=endpoint,
                started_at=started_at,
            )
            raise self._too_large(endpoint, target, status)
        error = wire.api_error(
            status,
            content,
            endpoint=endpoint,
            target=target,
            retry_after=retry_after,
            redact=self.redactor.text,
            method=method,
        )
        self._redact_error(error)
        self._after_refusal(
            rate_limited=isinstance(error, RateLimitedError),
            unavailable=isinstance(error, UnavailableError),
            permitted=wire.total_permitted(error.detail),
            retry_after=retry_after,
            endpoint=endpoint,
            started_at=started_at,
        )
        raise error

    async def _read_body(self, response: httpx.Response) -> bytes | None:
        """Returns the whole body, or None (having stopped reading) once it is bigger than max_response_bytes."""
        limit = self._max_response_bytes
        # A declared length past the cap is refused before reading a byte (a wrong one is still counted below).
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isdigit() and declared.isascii() and (len(declared) > 20 or int(declared) > limit):
            return None
        chunks: list[bytes] = []
        size = 0
        # aiter_bytes yields decoded bytes: a compressed body is counted (and refused) as it expands.
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, endpoint: str, target: str, status: int) -> ResponseTooLargeError:
        return ResponseTooLargeError(
            f"GET {endpoint} for {target}: HTTP {status} response body is larger than the"
            f" {self._max_response_bytes}-byte limit (katapult.max_response_bytes); not read further",
            max_bytes=self._max_response_bytes,
            target=target,
            endpoint=endpoint,
            status_code=status,
        )

    def _after_refusal(
        self,
        *,
        rate_limited: bool,
        unavailable: bool,
        permitted: int | None,
        retry_after: float | None,
        endpoint: str,
        started_at: float,
    ) -> None:
        """Feeds a non-2xx answer to the limiter: a 429 pauses every start, a 5xx Retry-After holds them."""
        if rate_limited:
            self.stats.rate_limited += 1
            wait = retry_after if retry_after is not None else self._rate_limit_wait(permitted)
            pause = self._limiter.on_rate_limited(permitted=permitted, wait=wait, started_at=started_at)
            logger.warning(
                "Katapult rate limit reached (%s/min) on GET %s; pausing requests for %.2fs",
                permitted if permitted is not None else "?",
                endpoint,
                pause,
            )
        elif unavailable and retry_after is not None:
            # The server asked every client to stay away for a while, not just this request.
            self._limiter.pause(retry_after)

    def _count_failure(self, kind: str, endpoint: str, target: str, begin: float) -> None:
        self.stats.count(kind)
        logger.debug("GET %s for %s -> %s after %.3fs", endpoint, target, kind, time.monotonic() - begin)

    def _redact_error(self, error: KatapultAPIError) -> None:
        """Blanks the token in everything the error carries from the server: message, description and detail."""
        message = str(error)
        clean = self.redactor.text(message)
        if clean != message:
            error.args = (clean,)
        error.description = self.redactor.text(error.description)
        error.detail = self.redactor.json(error.detail)


def _int_header(response: httpx.Response, name: str) -> int | None:
    raw = response.headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if 0 <= value <= _MAX_HEADER_INT else None
