"""The service's Prometheus metrics, in a registry of its own (so that two services in
one process, as in tests, do not share counters)."""
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Request latency buckets (seconds): from a tiny model on a GPU to VGG16 on a busy CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _batch_buckets(max_batch: int) -> tuple:
    """Powers of two up to max_batch, and max_batch itself: 1, 2, 4, ..., max_batch."""
    buckets, size = [], 1
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (max_batch,)


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nima_http_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.images = Counter("nima_images", "Images received by /score, /explain and /enhance, by outcome (scored: done; or error)",
                              ["outcome"], registry=r)
        self.errors = Counter("nima_errors", "Errors by kind: a whole request's (the JSON 'error' field) "
                              "or one image's in a multi-image request", ["kind"], registry=r)
        self.batch_size = Histogram("nima_batch_size", "Images per forward pass of the model",
                                    buckets=_batch_buckets(max_batch), registry=r)
        self.batch_seconds = Histogram("nima_batch_seconds", "Seconds per forward pass of the model",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("nima_request_seconds", "Seconds from the start of a /score request to its answer",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge("nima_score_requests_in_progress", "/score requests being answered", registry=r)
        self.open_connections = Gauge("nima_open_connections", "HTTP connections open", registry=r)
        self.connections_closed = Counter("nima_connections_closed", "Connections closed or refused by the service's "
                                          "guards, by why (header_timeout, body_timeout, drain_timeout, evicted_idle, "
                                          "refused, refused_unanswered, malformed)", ["why"], registry=r)
        self.decode_queue = Gauge("nima_decode_queue", "Images waiting for a decoding process", registry=r)
        self.decoders_replaced = Counter("nima_decoders_replaced", "Decoding processes replaced (overran "
                                         "--decode_timeout, or died)", registry=r)
        self.upload_bytes = Gauge("nima_upload_bytes_in_flight", "Upload bytes being received or decoded "
                                  "(--max_inflight_mb)", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
