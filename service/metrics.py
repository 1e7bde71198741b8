"""Prometheus metrics of the service, one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "refrain_http_requests_total",
            "HTTP requests",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "refrain_http_request_duration_seconds",
            "HTTP request latency",
            ["route", "method"],
            buckets=LATENCY,
            registry=r,
        )
        self.audio_decoded = Counter(
            "refrain_audio_decoded_seconds_total", "Seconds of audio decoded", registry=r
        )
        self.audio_embedded = Counter(
            "refrain_audio_embedded_seconds_total", "Seconds of audio embedded", registry=r
        )
        self.batch_size = Histogram(
            "refrain_embed_batch_segments",
            "Segments per network batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_latency = Histogram(
            "refrain_embed_batch_duration_seconds",
            "Network time per batch",
            buckets=LATENCY,
            registry=r,
        )
        self.queue_depth = Gauge(
            "refrain_embed_queue_depth", "Embedding requests waiting", registry=r
        )
        self.index_tracks = Gauge("refrain_index_tracks", "Reference tracks", registry=r)
        self.index_segments = Gauge("refrain_index_segments", "Reference segments", registry=r)
        self.index_bytes = Gauge("refrain_index_bytes", "Index size on disk", registry=r)
        self.knn_latency = Histogram(
            "refrain_knn_duration_seconds",
            "Segment kNN time per query",
            buckets=LATENCY,
            registry=r,
        )
        self.reduce_latency = Histogram(
            "refrain_reduce_duration_seconds",
            "Exact re-ranking time per query",
            buckets=LATENCY,
            registry=r,
        )
        self.verify_latency = Histogram(
            "refrain_verify_duration_seconds",
            "Alignment verification time per query (chroma, alignment, localisation)",
            buckets=LATENCY,
            registry=r,
        )
        self.ingest_items = Counter(
            "refrain_ingest_items_total",
            "Bulk ingestion items by final state",
            ["state"],
            registry=r,
        )
        self.ingest_jobs_purged = Counter(
            "refrain_ingest_jobs_purged_total",
            "Finished bulk ingestion jobs deleted after job_retention_hours",
            registry=r,
        )
        self.errors = Counter(
            "refrain_errors_total", "Errors answered, by type", ["type"], registry=r
        )
        self.ready = Gauge("refrain_ready", "1 once model and index are loaded", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
