"""Replica discovery through DNS: a Kubernetes headless Service resolves to one A record per ready
pod, so re-resolving it every poll follows the autoscaler without a Kubernetes API client."""

from __future__ import annotations

import asyncio
import socket


def parse_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    # A URL ("http://svc:8000") would split into a host no resolver knows: refuse it, not retry it forever.
    if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--discover wants HOST:PORT, got {target!r}")
    return host, int(port)


def resolve(host: str, port: int) -> list[str]:
    """Replica base URLs for every address `host` resolves to (sorted, so the order is stable)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []  # Service with no ready pods, or DNS hiccup: keep the replicas we have
    urls = set()
    for family, _, _, _, sockaddr in infos:
        addr = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
        urls.add(f"http://{addr}:{port}")
    return sorted(urls)


async def resolve_async(host: str, port: int) -> list[str]:
    return await asyncio.to_thread(resolve, host, port)
