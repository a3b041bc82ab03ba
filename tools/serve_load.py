"""Load test of the A1111-compatible server: N txt2img requests from C concurrent clients against a live
`trt_sdxl.serve` on 127.0.0.1, bounded in requests and time; prints a table and writes serve_load.json.

Counts: answered (HTTP 200 with the images asked for), rejected (HTTP 503: the queue was full), lost
(anything else: no answer, an error, a wrong image count, an answer twice). Lost must be 0.

    python tools/serve_load.py [--engines engines] [--cpu] [--requests 50] [--clients 8] [--queue 4]

Without --url it starts the server itself (in this process, on a free port), on the engines folder's
networks (`--cpu`: through netexec), and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`trt_sdxl.serve`'s app under uvicorn in a thread on 127.0.0.1; `stop()` ends it."""

    def __init__(self, generator, queue_size: int = 8, api_auth: str | None = None, **options):
        import uvicorn

        from trt_sdxl.serve import create_app

        self.app = create_app(generator, queue_size, api_auth, **options)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start within 30 s")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def load_test(url: str, requests: int = 50, clients: int = 8, steps: int = 2, timeout_s: float = 300.0,
              size: int | None = None) -> dict:
    """Send `requests` txt2img calls from `clients` threads; every call has its own seed, so an answer
    can be told apart from another's. Stops by itself: each call times out, and the whole run too."""
    import requests as http

    started = time.perf_counter()
    counts = {"answered": 0, "rejected": 0, "lost": 0}
    seeds_seen: dict[int, int] = {}
    lock = threading.Lock()
    deadline = started + timeout_s

    def one(k: int) -> None:
        outcome, seed = "lost", 1000 + k
        body = {"prompt": "a photo of a sneaker", "seed": seed, "steps": steps, "cfg_scale": 5}
        if size:
            body.update({"width": size, "height": size})
        try:
            left = deadline - time.perf_counter()
            if left > 0:
                r = http.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=left)
                if r.status_code == 200:
                    answer = r.json()
                    info = json.loads(answer["info"])
                    if len(answer["images"]) == 1 and info["all_seeds"] == [seed]:
                        outcome = "answered"
                elif r.status_code == 503 and r.json().get("error") == "QueueFull":
                    outcome = "rejected"
        except (http.RequestException, ValueError, KeyError):
            pass
        with lock:
            counts[outcome] += 1
            if outcome == "answered":
                seeds_seen[seed] = seeds_seen.get(seed, 0) + 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    twice = sum(1 for n in seeds_seen.values() if n > 1)
    counts["lost"] += twice
    return {**counts, "answered_twice": twice, "requests": requests, "clients": clients, "steps": steps,
            "seconds": round(time.perf_counter() - started, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", default="engines")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--url", default=None, help="a running server (default: start one here)")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--queue", type=int, default=4)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="the whole run stops after this many seconds")
    p.add_argument("--out", default=str(REPO / "tools" / "serve_load.json"))
    args = p.parse_args()
    server = None
    if args.url is None:
        from trt_sdxl import Generator

        server = LiveServer(Generator.load(args.engines, device="cpu" if args.cpu else "gpu"), args.queue)
    try:
        result = load_test(args.url or server.url, args.requests, args.clients, args.steps, args.timeout)
    finally:
        if server is not None:
            server.stop()
    result.update({"queue": args.queue if server else None, "date": date.today().isoformat(),
                   "machine": platform.node(), "where": "CPU (netexec)" if args.cpu else "GPU"})
    print(f"{'requests':>8} {'clients':>7} {'queue':>5} {'answered':>8} {'rejected':>8} {'lost':>4} {'seconds':>8}")
    print(f"{result['requests']:>8} {result['clients']:>7} {str(result['queue']):>5} {result['answered']:>8} "
          f"{result['rejected']:>8} {result['lost']:>4} {result['seconds']:>8}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
