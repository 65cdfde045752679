#!/usr/bin/env python3
"""Container health check of the specd image (used by deploy/compose/compose.yaml; Kubernetes uses its
own probes on the gRPC health service instead).

    healthcheck.py [--http URL]... [--tcp HOST:PORT]... [--timeout SECONDS]

Healthy (exit 0) when every --http URL answers 2xx and every --tcp address accepts a connection; else
exit 1 with the reason on stderr. For a worker, `--http http://127.0.0.1:9090/health` says the process is
up and `--tcp 127.0.0.1:PORT` that its gRPC server is bound, which it is only once the model has loaded;
the router's /health is 200 only while it is not draining and sees at least one target. Standard library
only: the image has python3 for the model fetch script anyway, and no curl.
"""

import argparse
import socket
import sys
import urllib.error
import urllib.request


def check_http(url: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            if 200 <= r.status < 300:
                return None
            return f"{url}: HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"{url}: HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"{url}: {e}"


def check_tcp(addr: str, timeout: float) -> str | None:
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return None
    except (OSError, ValueError) as e:
        return f"tcp {addr}: {e}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http", action="append", default=[], help="URL that must answer 2xx")
    p.add_argument("--tcp", action="append", default=[], help="HOST:PORT that must accept")
    p.add_argument("--timeout", type=float, default=3.0)
    a = p.parse_args()
    if not a.http and not a.tcp:
        p.error("nothing to check: give --http and/or --tcp")
    failures = [f for f in (check_http(u, a.timeout) for u in a.http) if f]
    failures += [f for f in (check_tcp(t, a.timeout) for t in a.tcp) if f]
    for f in failures:
        print(f"unhealthy: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
