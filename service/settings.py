"""Service settings: the one place that reads the environment (prefix `REFRAIN_`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# the accepted range of each automatic snapshot interval: below it the index would snapshot
# on (nearly) every write, above it a restart could replay for hours
SNAPSHOT_RECORDS = (1, 10_000_000)
SNAPSHOT_BYTES = (1 << 20, 1 << 40)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REFRAIN_", extra="ignore")

    data_dir: Path = Field(Path("data"), description="index, jobs and uploads live here")
    model: str | None = Field(None, description="checkpoint path; None = the shipped default")
    device: str | None = Field(None, description="cpu or cuda; None = cuda when available")
    index_factory: str = Field("Flat", description="FAISS factory string for a new index")
    index_search_params: str = Field(
        "",
        description="FAISS ParameterSpace string for an ANN index, e.g. nprobe=64 or "
        "efSearch=512; empty = nprobe=16 for IVF, efSearch=128 for HNSW",
    )
    vector_dtype: str = Field("float32", description="exact segment copy: float32 or float16")
    # the defaults are `IndexOptions`'s; a restart replays the journal the last snapshot left
    snapshot_every_records: int = Field(
        10_000,
        description="snapshot the index once its journal holds this many writes "
        f"({SNAPSHOT_RECORDS[0]}..{SNAPSHOT_RECORDS[1]:_}; a restart replays at most this many)",
    )
    snapshot_every_bytes: int = Field(
        512 << 20,
        description="... or this many bytes (1 MiB..1 TiB; a restart reads at most this much "
        "journal)",
    )
    reference_hop_s: float = Field(5.0, gt=0, le=20, description="segment hop of references")
    query_hop_s: float = Field(5.0, gt=0, le=20, description="default segment hop of queries")

    log_requests: str = Field(
        "",
        description="one log line per request: '' (off: uvicorn's access log only) or "
        "'json' (method, route, path, status, latency_ms, request_id; for log shippers)",
    )
    api_keys: str = Field("", description="comma-separated API keys")
    open_writes: bool = Field(False, description="allow writes without a key (loopback use)")
    open_reads: bool | None = Field(
        None,
        description="allow searches and reads without a key; unset = only when no "
        "REFRAIN_API_KEYS are configured",
    )
    protect_metrics: bool = Field(False, description="/metrics needs a key too")

    max_upload_bytes: int = Field(200 << 20, gt=0, description="largest request body")
    max_query_s: float = Field(120.0, gt=0, description="longest query clip")
    min_query_s: float = Field(1.0, ge=0, description="shortest query clip")
    max_reference_s: float = Field(1800.0, gt=0, description="longest reference track")
    silence_rms: float = Field(1e-4, ge=0, description="audio below this RMS is refused as silent")

    knn_k: int = Field(512, ge=1, le=4096, description="neighbours per query segment")
    candidates: int = Field(100, ge=1, le=10000, description="tracks re-ranked exactly")
    verify_candidates: int = Field(
        100,
        ge=0,
        le=1000,
        description="tracks re-ranked by alignment verification (0: off)",
    )
    verify_weight: float = Field(
        2.4, ge=0, le=10, description="weight of the alignment against the segment distance"
    )
    verify_expand: float = Field(
        0.5,
        ge=0,
        le=10,
        description="weight of the expansion with the first verified track (its own "
        "distance to the other candidates; 0: off)",
    )
    query_transpositions: int = Field(
        0,
        ge=0,
        le=6,
        description="default for searches: also try the query shifted by up to "
        "this many semitones each way (costs 2n+1 query embeddings)",
    )
    search_threads: int = Field(
        1, ge=0, description="FAISS (OpenMP) threads per search; 0 = the OpenMP default (all cores)"
    )

    max_batch: int = Field(32, ge=1, description="segments per network call")
    max_wait_ms: float = Field(5.0, ge=0, description="wait this long to fill a batch")
    max_queue: int = Field(64, ge=1, description="pending embedding requests before 503")

    import_root: Path | None = Field(None, description="folders under it may be ingested by path")
    max_archive_files: int = Field(10000, ge=1)
    max_archive_bytes: int = Field(8 << 30, gt=0, description="total uncompressed archive size")
    ingest_workers: int = Field(1, ge=1, le=16)
    job_retention_hours: float = Field(
        168.0,
        ge=0,
        description="finished ingestion jobs are "
        "forgotten this long after they end; 0 = keep forever",
    )
    min_free_bytes: int = Field(
        1 << 30,
        ge=0,
        description="uploads that would leave less free space on the data volume are refused (507)",
    )

    # -- deployed shape: remote inference workers and the index backend ----------------------
    worker_urls: str = Field(
        "", description="comma-separated `refrain worker` URLs; empty = embed in this process"
    )
    worker_timeout_s: float = Field(120.0, gt=0, description="longest wait for one embedding")
    worker_token: str = Field("", description="shared secret between the API and its workers")
    index_backend: str = Field("faiss", description="faiss (default) or milvus")
    milvus_uri: str = Field(
        "", description="Milvus server URI; empty = milvus-lite file inside the index directory"
    )
    milvus_token: str = Field("", description="Milvus credentials (user:password or token)")
    milvus_collection: str = Field("refrain_segments", description="Milvus collection name")
    milvus_index_type: str = Field("FLAT", description="Milvus index type: FLAT, IVF_FLAT, HNSW")

    @field_validator("log_requests")
    @classmethod
    def _log_requests(cls, v: str) -> str:
        if v not in ("", "json"):
            raise ValueError(f"log_requests must be '' or 'json', got {v!r}")
        return v

    @field_validator("snapshot_every_records")
    @classmethod
    def _snapshot_records(cls, v: int) -> int:
        low, high = SNAPSHOT_RECORDS
        if not low <= v <= high:
            raise ValueError(
                f"snapshot_every_records must be between {low} and {high:_} journal records, "
                f"got {v}"
            )
        return v

    @field_validator("snapshot_every_bytes")
    @classmethod
    def _snapshot_bytes(cls, v: int) -> int:
        low, high = SNAPSHOT_BYTES
        if not low <= v <= high:
            raise ValueError(
                f"snapshot_every_bytes must be between {low} (1 MiB) and {high} (1 TiB) bytes "
                f"of journal, got {v}"
            )
        return v

    @field_validator("index_backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in ("faiss", "milvus"):
            raise ValueError(f"index_backend must be faiss or milvus, got {v!r}")
        return v

    @property
    def worker_list(self) -> list[str]:
        return [u.strip().rstrip("/") for u in self.worker_urls.split(",") if u.strip()]

    @field_validator("vector_dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in ("float32", "float16"):
            raise ValueError(f"vector_dtype must be float32 or float16, got {v!r}")
        return v

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    @property
    def reads_open(self) -> bool:
        """Reads need no key when REFRAIN_OPEN_READS says so or, unset, when no keys are
        configured: configuring keys protects searches and reads along with writes."""
        return self.open_reads if self.open_reads is not None else not self.keys

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    # -- search answers ----------------------------------------------------------------------
    max_top_k: int = Field(
        1000,
        ge=1,
        le=10000,
        description="largest top_k a search may ask for; verification still aligns only "
        "REFRAIN_VERIFY_CANDIDATES tracks and the rest are located from their segments",
    )
