"""Hostile files and clients, for bench.serve_load --adversarial and the tests.

Files: a progressive JPEG scan bomb, a PNG whose header claims more pixels than any
limit, a flat 16-bit RGBA PNG under the pixel limit whose decode needs over a GiB.
Clients (run_attack, in a process of its own so the honest clients measured beside it
keep their own CPU): connections that send nothing, headers and bodies at one byte a
second (each reconnecting when closed), and senders of bombs and of large uploads at a
fixed rate.
"""
if not __package__:  # run by path: this module has no command of its own
    import _by_path
    _by_path.refuse_library(__file__)

import asyncio
import collections
import multiprocessing
import struct
import time
import zlib
from dataclasses import dataclass

import httpx
import numpy as np

from bench.serve_clients import drive


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _entropy_bits(bits: str) -> bytes:
    """'0'/'1' characters packed MSB first, padded with 1-bits, 0xFF bytes stuffed with 0x00
    (JPEG's entropy-coded data)."""
    bits += "1" * (-len(bits) % 8)
    out = bytearray()
    for i in range(0, len(bits), 8):
        out.append(int(bits[i:i + 8], 2))
        if out[-1] == 0xFF:
            out.append(0)
    return bytes(out)


def jpeg_scan_bomb(width: int, height: int, scans: int) -> bytes:
    """A valid greyscale progressive JPEG (SOF2) of `scans` scans: one DC scan, then the
    same AC scan again and again. Written by hand from the JPEG standard: one-symbol
    Huffman tables (DC difference 0; an end-of-band run of 16384..32767 blocks), so an
    AC scan over all the blocks takes a few bytes however large the image, while a
    decoder still walks every block in every scan. At least 1024 x 1024 pixels."""
    blocks = -(-width // 8) * -(-height // 8)
    if blocks < 16384:
        raise ValueError(f"{width}x{height} has {blocks} blocks; the end-of-band runs need at least 16384")
    one_code = bytes([1] + [0] * 15)  # one code of length 1 ('0')
    out = b"\xff\xd8" + _segment(0xDB, b"\x00" + bytes([1] * 64))
    out += _segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
    out += _segment(0xC4, b"\x00" + one_code + b"\x00") + _segment(0xC4, b"\x10" + one_code + b"\xe0")
    out += _segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + _entropy_bits("0" * blocks)  # DC: every difference 0
    runs = -(-blocks // 32767)  # EOB14 runs of 16384..32767 blocks covering every block
    ac = _entropy_bits("".join("0" + format(blocks // runs + (i < blocks % runs) - 16384, "014b") for i in range(runs)))
    out += (_segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + ac) * (scans - 1)
    return out + b"\xff\xd9"


def _png(width: int, height: int, depth: int, colour: int, idat: bytes) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_pixel_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data."""
    return _png(width, height, 8, 2, zlib.compress(b"\0" * 1024))


def png16_flat(width: int, height: int, channels: int = 4) -> bytes:
    """A 16-bit PNG (RGBA, or RGB with channels=3) of one grey level: a large image in a
    small file."""
    row = b"\0" + b"\x75\x30" * (width * channels)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return _png(width, height, 16, 6 if channels == 4 else 2, idat)


@dataclass
class AttackMix:
    idle: int = 300            # connections that send nothing
    slow_headers: int = 20     # headers at one byte a second
    slow_bodies: int = 20      # /score bodies at one byte a second
    bombs_per_s: float = 10.0  # scan, pixel and memory bombs, in turn
    uploads_per_s: float = 1.0  # 16 MB bodies that are not images


async def _hold(host, port, counts, send):
    """A connection that `send`s slowly, reopened whenever the server closes it."""
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            counts["connect refused"] += 1
            await asyncio.sleep(0.5)
            continue
        try:
            await asyncio.gather(send(writer), reader.read())  # read() ends when the server closes
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
        counts["slow connection closed by the server"] += 1
        await asyncio.sleep(0.2)  # then again


async def _idle(writer):
    await asyncio.sleep(3600)


async def _slow_header(writer):
    for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 1000:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(1)


async def _slow_body(writer):
    writer.write(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000\r\n\r\n")
    while True:
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(1)


async def _sender(client, bodies, per_s, counts):
    """POST each body in turn at `per_s` requests a second (one at a time)."""
    n = 0
    while True:
        started = time.monotonic()
        name, data, kind = bodies[n % len(bodies)]
        n += 1
        try:
            r = await client.post("/score", content=data, headers={"Content-Type": kind})
            error = r.json().get("error", "") if r.status_code != 200 else ""
            counts[f"{name}: {r.status_code} {error}".strip()] += 1
        except httpx.HTTPError as exc:
            counts[f"{name}: {type(exc).__name__}"] += 1
        await asyncio.sleep(max(0.0, 1.0 / per_s - (time.monotonic() - started)))


async def _attack(url: str, mix: AttackMix, stop, ready, counts) -> None:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    bombs = [("scan bomb", jpeg_scan_bomb(9440, 9440, 10_000), "image/jpeg"),
             ("pixel bomb", png_pixel_bomb(), "image/png"),
             ("memory bomb", png16_flat(7000, 7000), "image/png")]
    uploads = [("16 MB upload", b"\0" * (16 * 1024 * 1024), "application/octet-stream")]
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        tasks = [asyncio.create_task(_hold(host, int(port), counts, send))
                 for count, send in ((mix.idle, _idle), (mix.slow_headers, _slow_header), (mix.slow_bodies, _slow_body))
                 for _ in range(count)]
        tasks += [asyncio.create_task(_sender(client, items, per_s, counts))
                  for items, per_s in ((bombs, mix.bombs_per_s), (uploads, mix.uploads_per_s)) if per_s > 0]
        await asyncio.sleep(1.0)  # the connections opened
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_attack(url: str, mix: AttackMix, stop, ready, results) -> None:
    """The attack on the service at `url` (the event `ready` set once it is under way)
    until the event `stop` is set; then its outcome counts go into the queue `results`.
    The target of a multiprocessing.Process."""
    counts = collections.Counter()
    asyncio.run(_attack(url, mix, stop, ready, counts))
    results.put(dict(counts))


class AttackProcess:
    """run_attack in a child process: start() (returns once the attack is under way),
    then stop() -> its outcome counts."""

    def __init__(self, url: str, mix: AttackMix):
        ctx = multiprocessing.get_context("spawn")
        self._stop, self._ready, self._results = ctx.Event(), ctx.Event(), ctx.Queue()
        self._proc = ctx.Process(target=run_attack, args=(url, mix, self._stop, self._ready, self._results), daemon=True)

    def start(self, timeout: float = 300) -> None:
        self._proc.start()
        if not self._ready.wait(timeout):
            self._proc.kill()
            raise RuntimeError(f"the attack was not under way after {timeout:g} s")

    def stop(self, timeout: float = 60) -> dict:
        self._stop.set()
        try:
            counts = self._results.get(timeout=timeout)
        finally:
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
        return counts


def _percentiles(latencies) -> dict:
    ms = np.asarray(latencies) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def measure_adversarial(url: str, bodies, concurrency: int, n: int, mix: AttackMix, warmup_s: float) -> list:
    """The honest clients' latency alone, then beside the attack (started warmup_s
    before them), on the service at `url`: [baseline, attack, summary] records."""
    asyncio.run(drive(url, bodies, concurrency, concurrency))  # warm-up, untimed
    alone = asyncio.run(drive(url, bodies, concurrency, n))
    attack = AttackProcess(url, mix)
    attack.start()
    try:
        time.sleep(warmup_s)
        beside = asyncio.run(drive(url, bodies, concurrency, n))
    finally:
        counts = attack.stop()
    records = [{"phase": phase, "concurrency": concurrency, "requests": n, "seconds": run["seconds"],
                "errors": run["errors"], **_percentiles(run["latencies"])}
               for phase, run in (("baseline", alone), ("attack", beside))]
    ratio = records[1]["p99_ms"] / records[0]["p99_ms"]
    records.append({"phase": "summary", "concurrency": concurrency, "p50_ratio": records[1]["p50_ms"] / records[0]["p50_ms"],
                    "p99_ratio": ratio, "attack_mix": vars(mix), "attack_outcomes": counts})
    return records


def adversarial_table(records) -> str:
    lines = [f"{'model':<10} {'conc':>4} {'phase':<9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"]
    for r in records:
        if r["phase"] == "summary":
            lines.append(f"{r['base_model']:<10} {r['concurrency']:>4} {'ratio':<9} {r['p50_ratio']:>8.2f} "
                         f"{r['p99_ratio']:>8.2f}   (goal: p99 ratio <= 3)")
            lines += [f"    attack: {n} x {what}" for what, n in sorted(r["attack_outcomes"].items())]
        else:
            lines.append(f"{r['base_model']:<10} {r['concurrency']:>4} {r['phase']:<9} {r['p50_ms']:>8.1f} "
                         f"{r['p99_ms']:>8.1f} {r['errors']:>6}")
    return "\n".join(lines)
