"""Score photos over HTTP: a batching scoring service for a NIMA checkpoint.

    python serve.py --model CKPT [--host 127.0.0.1] [--port 8000] [--api_key KEY]
    curl -F file=@a.jpg -F file=@b.png http://127.0.0.1:8000/score

Any checkpoint test.py takes, with its preprocessing and its scores. Routes: POST /score,
GET /health, /model, /metrics, /docs (serving/). SIGTERM or Ctrl-C: stop accepting,
answer the requests already accepted (for up to --shutdown_timeout seconds), exit 0.
The defences against slow, idle and greedy clients are described in docs/serving.md.
Exit codes: 0 after a shutdown by signal; 2 bad usage, unreadable checkpoint, or an
address that cannot be bound.
"""
import logging
import os
import signal
import socket
import sys

# Only torch-free modules here: --help and a usage error answer without importing torch
# (seconds); main() imports the rest once the flags are checked.
from dataset.decode_limits import check_decode_limits
from dataset.images import DEFAULT_MAX_PIXELS, check_max_pixels
from engine.flags import ArgumentParser, HelpFormatter, add_decode_flag, add_decode_flags, add_normalize_flag, add_speed_flags

API_KEY_ENV = "NIMA_API_KEY"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def get_args_parser():
    p = ArgumentParser(description="Serve a NIMA checkpoint over HTTP: POST images to /score.",
                       formatter_class=HelpFormatter, allow_abbrev=False)
    p.add_argument("--model", required=True, help="checkpoint: ours (best.pth, epoch-N.pth, last.pth) or the reference's released state_dict")
    add_normalize_flag(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 (or ::) for every interface, "
                                                        "behind a load balancer or with --api_key")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (the address is printed)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: CUDA when present)")
    add_speed_flags(p, threads=False)
    add_decode_flag(p)
    p.add_argument("--max_batch", type=int, default=32, help="most images per forward pass, across concurrent requests")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="longest an image waits for others to share its forward pass")
    p.add_argument("--max_body_mb", type=float, default=20.0, help="largest request body in MiB (larger: 413)")
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="largest image in pixels (width x height), also once resized for the model (larger: 422); "
                        "the default is Pillow's own limit")
    p.add_argument("--max_files", type=int, default=64, help="most form parts (images) in one request (more: 413)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image decoding processes, min(4, cores) by default")
    p.add_argument("--api_key", default=None, help=f"require this key (header 'Authorization: Bearer KEY' or 'X-API-Key: KEY') "
                                                   f"on /score, /model and /metrics; default: ${API_KEY_ENV} when set, which unlike a "
                                                   f"flag does not show in the process list")
    add_decode_flags(p)
    g = p.add_argument_group("defences against slow, idle and greedy clients (docs/serving.md)")
    g.add_argument("--max_connections", type=int, default=256,
                   help="open connections; one more closes the connection idle longest, or when every one has a "
                        "request in progress, gets a JSON 503")
    g.add_argument("--max_inflight_mb", type=float, default=128.0,
                   help="upload bytes being received or decoded, all requests together (MiB); a request beyond it "
                        "waits up to --queue_timeout, then gets a JSON 503 with Retry-After")
    g.add_argument("--queue_timeout", type=float, default=10.0, help="longest wait for --max_inflight_mb, in seconds")
    g.add_argument("--header_timeout", type=float, default=10.0,
                   help="a request's header must arrive within this many seconds of the connection opening "
                        "(or of the previous answer), else the connection is closed")
    g.add_argument("--body_timeout", type=float, default=30.0,
                   help="a body may not stall this many seconds; after this long it must average --min_body_kbps")
    g.add_argument("--min_body_kbps", type=float, default=16.0, help="slowest average body rate kept, KiB/s")
    g.add_argument("--shutdown_timeout", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C, longest wait for the requests in progress before they are cut")
    p.add_argument("--log_level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                   help="uvicorn's log level (info logs one line per request)")
    return p


def check_args(args) -> str:
    """Raise ValueError naming the flag for a bad value; return the API key (or None)."""
    for flag in ("max_batch", "max_files", "workers", "max_connections"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_inflight_mb", "header_timeout", "body_timeout", "min_body_kbps"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag} must be > 0, got {getattr(args, flag):g}")
    for flag in ("queue_timeout", "shutdown_timeout"):
        if not getattr(args, flag) >= 0:
            raise ValueError(f"--{flag} must be >= 0, got {getattr(args, flag):g}")
    if not args.queue_timeout < args.body_timeout:
        raise ValueError(f"--queue_timeout ({args.queue_timeout:g}) must be below --body_timeout ({args.body_timeout:g}): "
                         "a request waiting for room under --max_inflight_mb reads none of its body meanwhile")
    check_decode_limits(args.decode_timeout, args.max_decode_mb)
    if args.max_wait_ms < 0:
        raise ValueError(f"--max_wait_ms must be >= 0, got {args.max_wait_ms:g}")
    if not args.max_body_mb > 0:
        raise ValueError(f"--max_body_mb must be > 0, got {args.max_body_mb:g}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    check_max_pixels(args.max_image_pixels)
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        source = "--api_key" if args.api_key is not None else f"${API_KEY_ENV}"
        raise ValueError(f"{source} is empty; give a key, or leave it unset to serve without one")
    return key


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a usage error (exit 2) and
    --port 0 can print the port it got. Raises ValueError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise ValueError(f"cannot listen on --host {host} --port {port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(args) -> int:
    try:
        api_key = check_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch  # the first import of torch (seconds), after the usage checks

    from engine.runtime import configure_backends, describe_runtime
    from model import CheckpointError
    from model.card import print_card
    # The web packages are optional (requirements-serve.txt): import them only here.
    try:
        import uvicorn

        from engine.score.scorer import Scorer
        from serving import ServeConfig, create_app
        from serving.connections import ConnectionGuard, ConnectionLimits
        from serving.memory import return_freed_memory
    except ImportError as exc:
        print(f"error: {exc.name} is missing; install the service's packages: pip install -r requirements-serve.txt",
              file=sys.stderr)
        return 2
    try:
        scorer = Scorer.from_checkpoint(args.model, device=args.device, amp=args.amp, channels_last=args.channels_last,
                                        max_image_pixels=args.max_image_pixels, normalize=args.normalize,
                                        exact_decode=args.exact_decode)
        sock = bind(args.host, args.port)
    except (ValueError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_card(scorer.card)  # what the scores come from, and a toy model's warning
    configure_backends(scorer.rt)  # on CUDA as test.py: cuDNN autotuning, no TF32 under --amp off
    print(describe_runtime(scorer.rt, scorer.model_args, args.workers, "decoding process"), flush=True)
    size = scorer.model_args["image_size"]
    scorer.score_tensors(torch.zeros(1, 3, size, size))  # first-call set-up now, not in the first request
    config = ServeConfig(checkpoint=os.path.basename(args.model), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_body_mb=args.max_body_mb, max_image_pixels=args.max_image_pixels,
                         max_files=args.max_files, workers=args.workers, api_key=api_key,
                         decode=check_decode_limits(args.decode_timeout, args.max_decode_mb),
                         max_inflight_mb=args.max_inflight_mb, queue_timeout=args.queue_timeout)
    app = create_app(scorer, config, device=str(scorer.rt.device))
    metrics = app.state.service.metrics
    guard = ConnectionGuard(ConnectionLimits(args.max_connections, args.header_timeout, args.body_timeout,
                                             args.min_body_kbps), metrics)
    metrics.open_connections.set_function(guard.open_connections)
    return_freed_memory()  # large buffers (uploads) go back to the system when freed, not kept by malloc
    # uvicorn's limit_concurrency is off: the guard counts connections (and answers in JSON).
    server = uvicorn.Server(uvicorn.Config(app, http=guard.protocol_class(), log_level=args.log_level,
                                           limit_concurrency=None, timeout_graceful_shutdown=args.shutdown_timeout,
                                           server_header=False))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    auth = "API key required" if api_key else "no API key"
    print(f"serving {config.checkpoint} ({scorer.model_args['base_model']}, {scorer.rt.device}"
          f"{', bf16' if scorer.rt.amp else ''}) on http://{shown}:{port} ({auth})", flush=True)
    if not api_key and args.host not in LOOPBACK:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach it can use it "
              f"(--api_key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
    # uvicorn turns SIGTERM and SIGINT into a graceful shutdown, then raises the signal again
    # for the handler that was there before it: with these no-ops, the process then exits 0
    # instead of dying by the signal (or a KeyboardInterrupt).
    received = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    server.run(sockets=[sock])
    if received:
        cut = app.state.service.cut
        outcome = ("every accepted request was answered" if not cut else
                   f"{cut} request(s) still in progress after --shutdown_timeout {args.shutdown_timeout:g} s were cut")
        print(f"stopped by {signal.Signals(received[0]).name}: {outcome}", flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
