#!/usr/bin/env python
"""A bounded load test of the review server, on loopback only.

    python tools/load_test.py                          # starts `echo-agent serve` on a free loopback port
    python tools/load_test.py --requests 60 --concurrency 4 --big 2
    python tools/load_test.py --url http://127.0.0.1:8000   # an already running local server

Sends ``--requests`` uploads of the bundled example images (``mode=wait``: each request waits
for its run to pause for review), ``--concurrency`` at a time, plus ``--big`` uploads of a 47 KB
blank 7000 x 7000 PNG (which the server must refuse with 413 without decoding) and ``--hostile``
requests that the server must refuse (foreign Host, cross-origin POST). Bounded in count and in
time (``--max-seconds``); it stops by itself. Prints latency p50/p95, status counts, throughput
and the server process's peak memory (when it started the server). Targets only 127.0.0.0/8 or
::1: any other address is refused.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _loopback_only(url: str) -> str:
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"refusing to load-test {url!r}: only loopback addresses (127.0.0.0/8, ::1, localhost)")
    return url.rstrip("/")


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "echoloadtest"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _post(url: str, body: bytes, ctype: str, headers: dict[str, str] | None = None, timeout: float = 120) -> int:
    import http.client

    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", u.path + (f"?{u.query}" if u.query else ""), body=body,
                     headers={"Content-Type": ctype, **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _blank_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="a running local server (default: start one)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--big", type=int, default=2, help="uploads of a blank 7000 x 7000 PNG (expect 413)")
    ap.add_argument("--hostile", type=int, default=4, help="foreign-Host and cross-origin requests (expect 400/403)")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (0 < args.requests <= 1000 and 0 < args.concurrency <= 16 and args.max_seconds <= 1800):
        ap.error("bounded by design: --requests 1..1000, --concurrency 1..16, --max-seconds <= 1800")

    from echo_agent.imaging import example_image

    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="echo-load-")
    if args.url is None:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        code = (f"from echo_agent.server.cli import serve_command; "
                f"serve_command('127.0.0.1', {port}, {str(Path(tmp.name) / 'load.sqlite')!r}, log_level='warning')")
        proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + 90
        import urllib.request

        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.3)
    else:
        url = _loopback_only(args.url)
    _loopback_only(url)

    images = [example_image("breast_benign").read_bytes(), example_image("breast_malignant").read_bytes()]
    big = _blank_png(7000)
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    t_end = time.monotonic() + args.max_seconds

    def one(i: int) -> None:
        if time.monotonic() > t_end:
            with lock:
                statuses["skipped (time budget)"] += 1
            return
        body, ctype = _multipart(f"scan{i}.png", images[i % 2])
        t = time.perf_counter()
        try:
            code = _post(f"{url}/api/runs?mode=wait", body, ctype)
        except OSError as exc:
            code = f"error {type(exc).__name__}"
        dt = time.perf_counter() - t
        with lock:
            statuses[f"upload {code}"] += 1
            if code == 200:
                latencies.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as ex:
        list(ex.map(one, range(args.requests)))
    wall = time.perf_counter() - t0
    body, ctype = _multipart("blank.png", big)
    for _ in range(args.big):
        statuses[f"big 7000x7000 {_post(f'{url}/api/runs', body, ctype)}"] += 1
    small, ctype = _multipart("a.png", images[0])
    for i in range(args.hostile):
        hdr = {"Host": "evil.example.com"} if i % 2 == 0 else {"Origin": "http://evil.example.com"}
        statuses[f"hostile {'host' if i % 2 == 0 else 'origin'} {_post(f'{url}/api/runs', small, ctype, hdr)}"] += 1
    res = {
        "url": url, "requests": args.requests, "concurrency": args.concurrency, "wall_s": round(wall, 2),
        "throughput_per_s": round(len(latencies) / wall, 2) if wall else None,
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(sorted(latencies)[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
        "statuses": dict(sorted(statuses.items())),
        "server_peak_rss_mb": round(_peak_rss_mb(proc.pid), 1) if proc is not None and _peak_rss_mb(proc.pid) else None,
        "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cpu",
    }
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=30)
    tmp.cleanup()
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
