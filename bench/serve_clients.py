"""serve.py in a subprocess and the clients that drive it, for bench.serve_load."""
if not __package__:  # run by path: this module has no command of its own
    import _by_path
    _by_path.refuse_library(__file__)

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 300


class ServeProcess:
    """serve.py on a free loopback port, with `device` and the load test's flags."""

    def __init__(self, ckpt, args, log_path, normalize, device):
        self.log_path = log_path
        self.log = open(log_path, "w")
        command = [sys.executable, os.path.join(ROOT, "serve.py"), "--model", ckpt, "--host", "127.0.0.1", "--port", "0",
                   "--device", str(device), "--max_batch", str(args.max_batch), "--max_wait_ms", str(args.max_wait_ms),
                   "--workers", str(args.workers), "--log_level", "warning"]
        command += ["--normalize", normalize] if normalize else []
        env = {k: v for k, v in os.environ.items() if k != "NIMA_API_KEY"}
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = None

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.proc.returncode}:\n{self.output()}")
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", self.output())
            if found:
                try:
                    if httpx.get(found.group(1) + "/health", timeout=5).status_code == 200:
                        self.url = found.group(1)
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"serve.py was not ready after {START_TIMEOUT_S} s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def drive(url, bodies, concurrency: int, n: int) -> dict:
    """n requests from `concurrency` clients, each sending the next body when its answer
    comes; returns the wall time, each request's latency and the answers that were not
    200 (a connection that failed counts as one)."""
    latencies, statuses = [], []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        turns = iter(range(n))

        async def one_client():
            for i in turns:
                start = time.perf_counter()
                try:
                    r = await client.post("/score", content=bodies[i % len(bodies)], headers={"Content-Type": "image/jpeg"})
                    statuses.append(r.status_code)
                except httpx.TransportError:
                    statuses.append(0)
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"seconds": wall, "latencies": latencies, "errors": sum(s != 200 for s in statuses)}


def batch_totals(url) -> tuple:
    text = httpx.get(url + "/metrics", timeout=30).text
    values = [float(re.search(rf"^nima_batch_size_{k} (\S+)$", text, re.MULTILINE).group(1)) for k in ("count", "sum")]
    return tuple(values)
