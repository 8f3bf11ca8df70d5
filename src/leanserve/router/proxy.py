"""The router core: fleet state, replica choice, and forwarding with retry-before-first-byte."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio
import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from leanserve.api.streaming import ClientDisconnected, run_until_disconnect
from leanserve.router.autoscaler import Autoscaler, AutoscalerConfig, FleetMetrics
from leanserve.router.discovery import parse_target, resolve_async
from leanserve.router.health import probe, record_check
from leanserve.router.metrics import RouterMetrics
from leanserve.router.policies import choose_pool, make_policy
from leanserve.router.replica import LatencyWindow, ReplicaState
from leanserve.router.sse import EventWatch, upstream_failed_event

log = logging.getLogger("leanserve.router")

# Worth trying elsewhere: overload (429, 503), a crashed or restarting replica (5xx).
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Hop-by-hop headers (RFC 9110 7.6.1) and ones httpx/Starlette recompute for the new connection.
DROP_HEADERS = frozenset({
    "host", "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "content-length",
})


def openai_error(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def _forwardable(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in DROP_HEADERS}


def _uncompressed(headers: dict[str, str]) -> dict[str, str]:
    """Ask for an identity-encoded body: the router reads a stream's events to tell a complete
    answer from a cut one, which it cannot do through gzip."""
    out = {k: v for k, v in headers.items() if k.lower() != "accept-encoding"}
    out["accept-encoding"] = "identity"
    return out


def _readable_events(upstream: httpx.Response) -> bool:
    content_type = upstream.headers.get("content-type", "")
    encoding = upstream.headers.get("content-encoding", "identity")
    return content_type.startswith("text/event-stream") and encoding in ("", "identity")


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _unless_client_leaves(receive: Receive, work: Awaitable[Response]) -> Response:
    """Await `work`; if the client disconnects first, cancel it (which closes the upstream
    connection, so the replica aborts the generation) and answer nobody."""
    try:
        return await run_until_disconnect(receive, work)
    except ClientDisconnected:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


class _RelayedStream(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends, also when the client left before the
    body started: a generator that never ran has no `finally` to release the replica with."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 headers: Mapping[str, str]) -> None:
        super().__init__(content, status_code=200, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def prompt_key(body: dict) -> str:
    """The text that identifies a request's cacheable prefix: the prompt, or the chat messages in order."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        return json.dumps(prompt[0]) if not isinstance(prompt[0], str) else prompt[0]
    messages = body.get("messages")
    if isinstance(messages, list):
        return "\n".join(f"{m.get('role')}:{m.get('content')}" for m in messages if isinstance(m, dict))
    return ""


@dataclass
class RouterConfig:
    replicas: list[str]
    canaries: list[str] = field(default_factory=list)
    canary_weight: float = 0.0
    policy: str = "least-loaded"
    poll_interval_s: float = 0.5
    health_timeout_s: float = 2.0
    eject_after: int = 3  # consecutive failed checks (or connect errors) before ejection
    readmit_after: int = 2  # consecutive passing checks before readmission
    max_attempts: int = 3
    connect_timeout_s: float = 2.0
    request_timeout_s: float = 600.0
    replica_max_concurrency: int = 32  # for the pack policy and the utilisation signal
    latency_target_s: float = 0.0  # pack policy: a replica over this p95 has no headroom (0 = off)
    prefix_chars: int = 256
    discover: str | None = None  # HOST:PORT of a headless Service, re-resolved every poll
    autoscaler: AutoscalerConfig = field(default_factory=AutoscalerConfig)
    seed: int | None = None


class Router:
    def __init__(self, config: RouterConfig, transport: httpx.AsyncBaseTransport | None = None):
        if not config.replicas and not config.canaries and not config.discover:
            raise ValueError("give at least one --replica, --canary or --discover")
        if not 0.0 <= config.canary_weight <= 1.0:
            raise ValueError("canary weight must be in [0, 1]")
        self.config = config
        self.replicas: list[ReplicaState] = []
        for url in config.replicas:
            self._add(url, canary=False)
        for url in config.canaries:
            self._add(url, canary=True)
        self.policy = make_policy(
            config.policy, max_concurrency=config.replica_max_concurrency,
            latency_target_s=config.latency_target_s, prefix_chars=config.prefix_chars,
        )
        self.metrics = RouterMetrics()
        self.autoscaler = Autoscaler(config.autoscaler)
        self.metrics.desired.set(self.autoscaler.desired)
        self.fleet_ttfb = LatencyWindow()
        self.fleet_e2e = LatencyWindow()
        self._rng = random.Random(config.seed)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._poller: asyncio.Task | None = None

    def _add(self, url: str, canary: bool) -> ReplicaState:
        # Unproven until a health check passes: the first poll (run before serving) admits it.
        r = ReplicaState(url=url.rstrip("/"), healthy=False, canary=canary,
                         consecutive_successes=self.config.readmit_after - 1)
        self.replicas.append(r)
        return r

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        timeout = httpx.Timeout(c.request_timeout_s, connect=c.connect_timeout_s)
        # No pool cap: the router must never be the bottleneck in front of the replicas.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits, transport=self._transport)
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._poller:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._client:
            await self._client.aclose()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # a poller that dies silently would freeze routing state
                log.exception("replica poll failed")

    # ---- polling ---------------------------------------------------------------------------------

    async def poll_once(self) -> None:
        assert self._client is not None
        if self.config.discover:
            await self._sync_discovered()
        replicas = list(self.replicas)
        results = await asyncio.gather(
            *(probe(self._client, r, self.config.health_timeout_s) for r in replicas)
        )
        for r, ok in zip(replicas, results, strict=True):
            self._record(r, ok)
        now = time.monotonic()
        for r in replicas:
            r.p95_latency_s = r.e2e.p95(now)
        self.metrics.healthy.set(sum(r.healthy for r in self.replicas))
        self.metrics.desired.set(self.autoscaler.observe(self.fleet_metrics()))

    async def _sync_discovered(self) -> None:
        host, port = parse_target(self.config.discover or "")
        urls = await resolve_async(host, port)
        if not urls:
            return
        known = {r.url for r in self.replicas}
        static = {u.rstrip("/") for u in (*self.config.replicas, *self.config.canaries)}
        for url in urls:
            if url not in known:
                self._add(url, canary=False)
        dropped = [r for r in self.replicas if r.url not in urls and r.url not in static]
        self.replicas = [r for r in self.replicas if r.url in urls or r.url in static]
        for r in dropped:
            self._retire(r)

    def _retire(self, r: ReplicaState) -> None:
        log.info("%s left the discovered set", r.url)
        r.retired = True
        if r.in_flight == 0:
            self._forget(r)  # else the last request on it to finish does (see _release)

    def _forget(self, r: ReplicaState) -> None:
        # The same address can come back (a pod restarted in place): its series are the new one's then.
        if all(x.url != r.url for x in self.replicas):
            self.metrics.forget(r.url)

    def _record(self, r: ReplicaState, ok: bool) -> None:
        change = record_check(r, ok, self.config.eject_after, self.config.readmit_after)
        if change == "ejected":
            log.warning("ejecting %s after %d failed checks", r.url, r.consecutive_failures)
            self.metrics.ejections.labels(r.url).inc()
        elif change == "readmitted":
            log.info("readmitting %s", r.url)
            self.metrics.readmissions.labels(r.url).inc()
        elif change == "admitted":
            log.info("admitting %s", r.url)
        if change:
            self.metrics.healthy.set(sum(x.healthy for x in self.replicas))

    def fleet_metrics(self) -> FleetMetrics:
        healthy = [r for r in self.replicas if r.healthy]
        n = len(healthy)
        cap = max(self.config.replica_max_concurrency, 1)
        now = time.monotonic()
        return FleetMetrics(
            t=time.time(),
            replicas=n,
            queue_depth=sum(r.waiting for r in healthy),
            running=sum(r.running for r in healthy),
            ttft_p95_s=self.fleet_ttfb.p95(now),
            e2e_p95_s=self.fleet_e2e.p95(now),
            kv_usage=sum(r.kv_usage for r in healthy) / n if n else 0.0,
            utilisation=sum(min(1.0, r.running / cap) for r in healthy) / n if n else 0.0,
        )

    # ---- routing ---------------------------------------------------------------------------------

    def pick(self, key: str = "", exclude: frozenset[str] = frozenset()) -> ReplicaState | None:
        candidates = [r for r in self.replicas if r.url not in exclude]
        pool = choose_pool(candidates, self.config.canary_weight, self._rng)
        return self.policy.choose(pool, key)

    def _release(self, r: ReplicaState) -> None:
        """The last thing an attempt does to `r`'s metrics: a retired replica's series go after it."""
        r.in_flight -= 1
        if not r.retired:
            self.metrics.in_flight.labels(r.url).set(r.in_flight)
        elif r.in_flight == 0:  # a retired one's gauge is left alone: its address may be a new replica's now
            self._forget(r)

    async def forward(self, method: str, path: str, body: bytes, headers: Mapping[str, str],
                      receive: Receive | None = None) -> Response:
        """Send to a replica; on a failure before any byte reached the client, try another one.

        With the client's `receive`, a client that disconnects before the answer is in hand has its
        upstream request closed too, so the replica stops generating for nobody.
        """
        work = self._forward(method, path, body, headers)
        return await (work if receive is None else _unless_client_leaves(receive, work))

    async def _forward(self, method: str, path: str, body: bytes, headers: Mapping[str, str]) -> Response:
        assert self._client is not None
        parsed: dict = {}
        if body:
            with contextlib.suppress(ValueError):
                parsed = json.loads(body) if body.lstrip()[:1] == b"{" else {}
        stream = bool(parsed.get("stream"))
        key = prompt_key(parsed)
        out_headers = _forwardable(headers)
        if stream:
            out_headers = _uncompressed(out_headers)
        tried: set[str] = set()
        last: Response | None = None
        for attempt in range(self.config.max_attempts):
            r = self.pick(key, frozenset(tried))
            if r is None:
                break
            tried.add(r.url)
            if attempt:
                self.metrics.retries.labels(r.url, "retry").inc()
            r.in_flight += 1
            self.metrics.in_flight.labels(r.url).set(r.in_flight)
            result = await self._attempt(r, method, path, body, out_headers, stream)
            if isinstance(result, StreamingResponse) or result.status_code not in RETRYABLE_STATUS:
                return result
            last = result
        if last is not None:
            return last  # every attempt failed; the last replica's own answer says most
        if not tried:
            self.metrics.unroutable.inc()
            return openai_error(503, "no healthy replica to serve the request", "service_unavailable",
                                "no_healthy_replica")
        return openai_error(502, "replicas failed before responding", "upstream_error", "upstream_failed")

    async def _attempt(
        self, r: ReplicaState, method: str, path: str, body: bytes, headers: dict[str, str], stream: bool
    ) -> Response:
        """One try. Returns a StreamingResponse once committed (first chunk in hand), else a buffered
        Response; a retryable status means "try elsewhere". Releases `r` unless streaming."""
        assert self._client is not None
        t0 = time.monotonic()
        upstream: httpx.Response | None = None
        try:
            request = self._client.build_request(method, f"{r.url}{path}", content=body, headers=headers)
            upstream = await self._client.send(request, stream=True)
            if stream and upstream.status_code == 200:
                chunks = upstream.aiter_raw()
                first = await anext(chunks, b"")  # a failure here is still before the client saw a byte
                return self._commit_stream(r, upstream, chunks, first, t0)
            content = await upstream.aread()
        except httpx.HTTPError as exc:
            if upstream is not None:
                await upstream.aclose()
            self.metrics.requests.labels(r.url, "error").inc()
            if isinstance(exc, httpx.TransportError):
                self._record(r, ok=False)  # passive health: don't wait for the poller to notice
            self._release(r)
            log.warning("attempt on %s failed: %r", r.url, exc)
            return openai_error(502, f"replica failed: {type(exc).__name__}", "upstream_error",
                                "upstream_failed")
        except asyncio.CancelledError:
            # The client left (see forward). Count and release first: the close below is an await.
            self.metrics.requests.labels(r.url, "cancelled").inc()
            self._release(r)
            if upstream is not None:
                await asyncio.shield(upstream.aclose())  # the closed connection is the replica's abort
            raise
        self.metrics.requests.labels(r.url, str(upstream.status_code)).inc()
        self._release(r)
        if upstream.status_code == 200:
            elapsed = time.monotonic() - t0
            r.e2e.add(elapsed)
            self.fleet_e2e.add(elapsed)
        resp_headers = _forwardable(upstream.headers)
        resp_headers.pop("content-encoding", None)  # aread() decoded the body
        resp_headers["x-leanserve-replica"] = r.url
        return Response(content, status_code=upstream.status_code, headers=resp_headers)

    def _commit_stream(
        self, r: ReplicaState, upstream: httpx.Response, chunks: AsyncIterator[bytes], first: bytes, t0: float
    ) -> StreamingResponse:
        ttfb = time.monotonic() - t0
        r.ttfb.add(ttfb)
        self.fleet_ttfb.add(ttfb)
        self.metrics.ttfb.labels(r.url).observe(ttfb)
        self.metrics.requests.labels(r.url, "200").inc()

        watch = EventWatch(sse=_readable_events(upstream))

        async def body() -> AsyncIterator[bytes]:
            failure: httpx.HTTPError | None = None  # None and no [DONE]: closed cleanly, but cut short
            try:
                async for chunk in _chain(first, chunks):  # yielded as they arrive, whole events only
                    if whole := watch.feed(chunk):
                        yield whole
                if tail := watch.finish():
                    yield tail
            except httpx.HTTPError as exc:
                failure = exc
            if watch.done:  # a connection that broke after [DONE] still delivered the whole answer
                self._stream_completed(r, t0)
                return
            # Bytes already went to the client, so no retry: tell it the answer is cut short.
            self._stream_failed(r, failure, watch)
            if watch.sse:
                yield upstream_failed_event(_describe(failure))

        stream = body()

        async def close() -> None:
            try:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()  # a generator left suspended at a yield must not hold on
                    await upstream.aclose()
            finally:
                self._release(r)

        headers = _forwardable(upstream.headers)
        headers["x-leanserve-replica"] = r.url
        return _RelayedStream(stream, close, headers)

    def _stream_completed(self, r: ReplicaState, t0: float) -> None:
        elapsed = time.monotonic() - t0
        r.e2e.add(elapsed)
        self.fleet_e2e.add(elapsed)

    def _stream_failed(self, r: ReplicaState, failure: httpx.HTTPError | None, watch: EventWatch) -> None:
        reason = "truncated" if failure is None else "error"
        log.warning("stream from %s broke mid-way (%s), %d bytes of an unfinished event dropped",
                    r.url, _describe(failure), watch.dropped)
        self.metrics.stream_failures.labels(r.url, reason).inc()
        if isinstance(failure, httpx.TransportError):
            self._record(r, ok=False)  # a replica that died mid-stream is as down as one that refuses



def _describe(failure: httpx.HTTPError | None) -> str:
    return "closed without [DONE]" if failure is None else type(failure).__name__
