"""Settings: the server section and the model specs, from a TOML file plus `MLXPOOL_*` environment variables.

The file contract is documented field by field in docs/configuration.md; the docstrings below are the source.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlxpool.errors import ConfigError

Kind = Literal["chat", "vision", "ocr", "embedding", "asr", "tts"]
KINDS: tuple[Kind, ...] = ("chat", "vision", "ocr", "embedding", "asr", "tts")

# OpenAI's model names, answered by the default model of their kind.
OPENAI_ALIASES: dict[Kind, tuple[str, ...]] = {
    "chat": ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4", "gpt-3.5-turbo"),
    "vision": (),
    "ocr": (),
    "embedding": ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"),
    "asr": ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"),
    "tts": ("tts-1", "tts-1-hd", "gpt-4o-mini-tts"),
}

TTS_TTL = 300.0
"""Seconds a tts model stays loaded idle when its `ttl` is not set."""

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?$", re.IGNORECASE)


def parse_size(text: str | int, total: int | None = None) -> int:
    """Bytes from `12GB`, `512MiB`, `1.5g`, a plain number of bytes, or `75%` of `total`."""
    if isinstance(text, int):
        return text
    text = text.strip()
    if text.endswith("%"):
        if total is None:
            raise ValueError(f"{text!r}: a percentage needs a known total")
        return int(total * float(text[:-1]) / 100)
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 12GB, 512MiB, 75%)")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_kmgt".find(prefix.lower() or "_"))


def human_bytes(n: int | None) -> str:
    """`1.23 GiB`, `45.6 MiB`: sizes for people."""
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _check_size(value: str | int) -> str | int:
    parse_size(value, total=1)
    return value


class ServerSettings(BaseModel):
    """The `[server]` table. Every field can be overridden by `MLXPOOL_<FIELD>` (e.g. `MLXPOOL_PORTS=9000,9001`)."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    """Address to bind. 127.0.0.1 keeps the server private to this machine."""
    ports: list[int] = Field(default_factory=lambda: [8787, 8788], min_length=1)
    """TCP ports; one uvicorn server listens on all of them and every route answers on each."""
    memory_budget: str | int = "75%"
    """Bytes the pool may hold: `75%` of the memory MLX can use on this device, or a size (`12GB`)."""
    load_timeout: float = Field(default=300.0, gt=0)
    """Seconds a request waits for its model to download/load or for memory to free, then 503."""
    failure_cooldown: float = Field(default=5.0, ge=0)
    """Seconds before a failed model is tried again; doubles after each further failure."""
    failure_cooldown_max: float = Field(default=300.0, ge=0)
    """Upper bound of the growing failure cooldown, in seconds."""
    max_request_bytes: str | int = "100MB"
    """Largest request body accepted; larger ones get 413."""
    api_keys: list[str] = Field(default_factory=list, repr=False)
    """Keys clients must send as `Authorization: Bearer KEY` on every route but `GET /health` (and the status
    page's HTML); empty (the default): no keys needed. `MLXPOOL_API_KEYS=key1,key2` sets them from the environment."""
    cors_origins: list[str] = Field(default_factory=list)
    """Web origins (`https://app.example.com`, or `*`) whose pages may call the server from a browser; empty: none."""
    progress_interval: float = Field(default=5.0, gt=0)
    """Seconds between download progress lines in the log."""
    cache_dir: str = "~/.cache/mlxpool"
    """Where the demo profile writes its generated models."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe records logged; `debug` also shows each request on stderr (the log file always has them)."""
    logs_dir: str = "~/.mlxpool/logs"
    """Where `serve` writes `server.log`: one line per request, model loads and unloads, warnings; rotated by size."""
    log_max_bytes: str | int = "10MB"
    """Size at which a log file is rotated (`server.log` becomes `server.log.1`)."""
    log_backups: int = Field(default=5, ge=1)
    """Rotated log files kept (`server.log.1` ... `server.log.5`); older ones are deleted."""
    max_image_bytes: str | int = "20MB"
    """Largest image or document a request may send or point to (data: URI, file or URL); larger ones get 400."""
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    """Largest decoded image, in pixels (width x height); larger ones get 400 (decompression bombs)."""
    image_fetch_timeout: float = Field(default=10.0, gt=0)
    """Seconds to fetch an `http(s)` image URL, then 400."""
    image_dirs: list[str] = Field(default_factory=list)
    """Directories whose files `file://` image URLs may name; empty (the default): file URLs are refused."""
    allow_any_model: bool = False
    """Let a request name a hub repo id (`org/name`) that is not configured: it is downloaded and served as the
    kind of the route asked. Off: only configured models load, so clients cannot make the server fetch
    arbitrary repos. Local paths are never accepted from requests."""
    max_pdf_pages: int = Field(default=50, ge=1)
    """OCR: most pages read from one PDF; longer documents get 400."""
    cudnn_attention: bool = False
    """CUDA only: read prompts with cuDNN's fused attention. cuDNN builds a plan for every new combination of
    shapes (rows read together, prompt and cache lengths), 50-250 ms of the one MLX thread each on the measured
    H200 host, and a continuous batch meets new combinations all the time (docs/benchmarks.md). Off: MLX's own
    kernels. Sets `MLX_CUDA_USE_CUDNN_SDPA` for the process, unless the environment already sets it."""

    http_parser: Literal["h11", "httptools"] = "h11"
    """How uvicorn reads and writes HTTP/1.1. `h11` (pure Python) bounds a request's line and headers: 16 KiB
    buffered before they parse (a head that arrives in one read may be larger: 100 KB passed, 1 MB got 400).
    `httptools` (in C; install it yourself) costs the event loop less per streamed token (45 against 58 us of CPU
    on the 2-core CPU box, no difference measured end to end on an H200: docs/benchmarks.md) but accepts headers
    of any size."""

    gil_switch_interval: float = Field(default=0.005, gt=0, le=1)
    """Seconds a thread may hold Python's GIL while another waits for it (0.005 is Python's own default), while
    one model has work. The MLX worker builds each step's graph in Python, and whenever the event loop wakes (a
    request arrives, a result is ready) it may wait this long for the GIL. On the measured H200 host, 0.001 cost a
    single chat stream about a quarter of its tokens/s (docs/benchmarks.md)."""
    shared_gil_switch_interval: float = Field(default=0.001, gt=0, le=1)
    """The same, while two or more models (or a model and a load) have had work within the last second: shorter
    slices let the event loop answer one model's requests while another decodes. On the measured H200 host, 0.001
    against 0.005 lowered the embedding p99 under 64 chat streams by about 12% (docs/benchmarks.md). Equal to
    `gil_switch_interval`: one interval throughout."""
    forward_pieces: int = Field(default=4, ge=1, le=64)
    """Pieces a text model's costly forward passes (admission pieces, the decode step after its batch changed) are
    cut into while other models have had work within the last second: between pieces, their waiting steps run, so
    an embedding waits for a piece rather than the whole step (engines/pieces.py). 1: never cut. A model working
    alone, and steady decode steps, are never cut (cutting every step cost up to half of a chat batch's tokens/s on
    the measured H200: docs/benchmarks.md), unless `wait_in_pieces`."""
    wait_in_pieces: bool | Literal["auto"] = "auto"
    """Whether text models cut every batch step into `forward_pieces` while other models have had work within the
    last second, and the worker waits for each step piece by piece, letting the waiting steps of models with shorter
    steps run between pieces (engines/pieces.py). Where MLX computes on the CPU the worker otherwise waits out a whole
    step's compute before an embedding can start: on the 2-core CPU box the embedding p99 under 64 chat streams is
    about 3x its idle p99 without and about 2.3x with, for 0-10% of the chat tokens/s. On a GPU, waiting for every
    step costs about half of the chat tokens/s. "auto" (default): on where MLX computes on the CPU, off on a GPU
    (docs/benchmarks.md, sessions 15-16)."""

    _sizes = field_validator("memory_budget", "max_request_bytes", "max_image_bytes", "log_max_bytes")(_check_size)

    @field_validator("api_keys")
    @classmethod
    def _keys_are_tokens(cls, keys: list[str]) -> list[str]:
        if any(key.split() != [key] for key in keys):
            raise ValueError("an API key must be non-empty and contain no whitespace")
        return keys

    @property
    def max_request_size(self) -> int:
        return parse_size(self.max_request_bytes)

    @property
    def max_image_size(self) -> int:
        return parse_size(self.max_image_bytes)

    @property
    def log_max_size(self) -> int:
        return parse_size(self.log_max_bytes)


class Candidate(BaseModel):
    """One choice in a model's `candidates`: the first whose `min_memory` the machine has is used."""

    model_config = ConfigDict(extra="forbid")

    repo: str | None = None
    path: str | None = None
    revision: str | None = None
    kind: Kind | None = None
    """Overrides the model's kind (a text-only fallback for a vision model)."""
    min_memory: str | int = 0
    """Machine memory this candidate needs (`32GB`): unified memory on Apple silicon, GPU memory on CUDA."""

    _size = field_validator("min_memory")(lambda v: _check_size(v))

    @model_validator(mode="after")
    def _one_source(self) -> Candidate:
        if (self.repo is None) == (self.path is None):
            raise ValueError("give exactly one of `repo` or `path`")
        return self


class ModelSpec(BaseModel):
    """One `[models.NAME]` table."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Kind
    repo: str | None = None
    """Hugging Face repo id (`org/name`), fetched through huggingface_hub's cache."""
    path: str | None = None
    """A local model directory, used in place; relative paths are relative to the config file."""
    revision: str | None = None
    download: bool = True
    """Download the model on first use when it is not on disk; false: fail until `mlxpool download NAME`."""
    aliases: list[str] = Field(default_factory=list)
    preload: bool = False
    """Load at start-up, in the background; `/health/ready` waits for these."""
    ttl: float = -1
    """Seconds idle before unload: -1 never, 0 as soon as the last request ends. Default: -1, but 300 for tts."""
    pinned: bool = False
    """Never evicted to make room for another model (TTL unload still applies)."""
    default: bool = False
    """The default model of its kind: OpenAI's names for that kind (`whisper-1`...) resolve to it."""
    memory_reserve: str | int | None = None
    """Working memory (activations, KV) added to the weight files' size for this model's memory estimate, and kept
    counted while it is loaded; a per-kind default if unset."""
    max_batch_size: int = Field(default=32, ge=1)
    """Embedding: most sequences in one forward pass. Chat: most sequences decoding together."""
    prefill_batch_size: int = Field(default=32, ge=1)
    """Chat: most new sequences whose prompts are read together (then join the running batch as one group)."""
    prefill_step_size: int = Field(default=512, ge=16)
    """Chat: prompt tokens read per worker step, so a long prompt does not hold up other work."""
    max_tokens: int = Field(default=2048, ge=1)
    """Chat: completion length when a request gives no `max_tokens`."""
    prompt_cache_size: int = Field(default=8, ge=0)
    """Chat: finished conversations whose KV cache is kept to reuse their prefix (multi-turn); 0: off. Their bytes
    count against the memory budget and are trimmed (oldest first) before any model is evicted."""
    warmup: bool = True
    """Chat (text models) and embedding: run the model a little at load (chat: a few tokens through each path
    serving takes), so that GPU kernels are compiled then and not inside the first requests' steps (seconds each on
    a machine whose MLX kernel cache is empty)."""
    prompt: str | None = None
    """OCR: the instruction sent with an image when the request gives no text (`OCR:` if unset)."""
    voice: str | None = None
    """TTS: the default voice; the model's own default if unset."""
    max_batch_tokens: int = Field(default=8192, ge=1)
    """Embedding: most padded tokens in one forward pass."""
    max_input_tokens: int | None = Field(default=None, ge=1)
    """Embedding: longest input in tokens; the model's own limit if unset."""
    candidates: list[Candidate] = Field(default_factory=list)
    """Instead of `repo`/`path`: choices by machine memory, largest first; the first that fits is served."""

    _reserve = field_validator("memory_reserve")(lambda v: v if v is None else _check_size(v))

    @model_validator(mode="after")
    def _kind_defaults(self) -> ModelSpec:
        if "ttl" not in self.model_fields_set and self.kind == "tts":
            self.ttl = TTS_TTL  # speech is occasional: give its memory back after a while
        return self

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.candidates and (self.repo or self.path):
            raise ValueError("give `candidates` or `repo`/`path`, not both")
        if not self.candidates and (self.repo is None) == (self.path is None):
            raise ValueError("give exactly one of `repo` or `path` (or a list of `candidates`)")
        return self

    def for_memory(self, memory: int) -> ModelSpec:
        """This model with its candidate for a machine of `memory` bytes chosen (the last one if none fits)."""
        if not self.candidates:
            return self
        chosen = next((c for c in self.candidates if parse_size(c.min_memory) <= memory), self.candidates[-1])
        source = {"repo": chosen.repo, "path": chosen.path, "revision": chosen.revision}
        return self.model_copy(update={**source, "kind": chosen.kind or self.kind})

    @property
    def source(self) -> str:
        if self.path is not None or self.repo is not None:
            return str(self.path or self.repo)
        return " | ".join(str(c.repo or c.path) for c in self.candidates)


class Settings(BaseModel):
    server: ServerSettings = Field(default_factory=ServerSettings)
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    source: str = "<defaults>"
    """The file these settings came from, for messages."""

    def for_memory(self, memory: int) -> Settings:
        """These settings with each model's candidate chosen for a machine of `memory` bytes."""
        models = {name: spec.for_memory(memory) for name, spec in self.models.items()}
        return self.model_copy(update={"models": models})

    def defaults(self) -> dict[Kind, ModelSpec]:
        """The default model of each kind: the one marked `default`, else the first of that kind."""
        chosen = {spec.kind: spec for spec in self.models.values() if spec.default}
        for spec in self.models.values():
            chosen.setdefault(spec.kind, spec)
        return chosen

    def name_table(self) -> dict[str, str]:
        """Every name a request may use → model name. Explicit names and aliases win over OpenAI's names."""
        names: dict[str, str] = {}
        defaults = self.defaults()
        if "chat" not in defaults and "vision" in defaults:
            defaults["chat"] = defaults["vision"]  # a vision-language model answers text chat too
        for kind, spec in defaults.items():
            for openai_name in OPENAI_ALIASES[kind]:
                names[openai_name] = spec.name
        for spec in self.models.values():
            if spec.repo is not None:
                names.setdefault(spec.repo, spec.name)
            names.update({alias: spec.name for alias in spec.aliases})
            names[spec.name] = spec.name
        return names


def shipped_config_path() -> Path:
    """The packaged default `models.toml`, or the repo's `config/models.toml` when running from source."""
    packaged = resources.files("mlxpool") / "models.toml"
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "config" / "models.toml"


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read `path` (else `$MLXPOOL_CONFIG`, else the shipped default), apply `MLXPOOL_*` overrides, validate."""
    env = os.environ if env is None else env
    file = Path(path or env.get("MLXPOOL_CONFIG") or shipped_config_path())
    try:
        data = tomllib.loads(file.read_text())
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from exc
    return settings_from_dict(data, file, env)


def settings_from_dict(data: dict[str, Any], file: Path, env: Mapping[str, str]) -> Settings:
    unknown = set(data) - {"server", "models"}
    if unknown:
        raise ConfigError(f"{file}: unknown table(s) {sorted(unknown)}; expected [server] and [models.NAME]")
    server = _server_with_env(data.get("server", {}), env)
    try:
        settings = Settings(
            server=ServerSettings.model_validate(server),
            models={name: _spec(name, table, file) for name, table in data.get("models", {}).items()},
            source=str(file),
        )
    except ValidationError as exc:
        raise ConfigError(_describe(file, exc, "server")) from None
    _check_names(settings)
    return settings


def _spec(name: str, table: Any, file: Path) -> ModelSpec:
    if not isinstance(table, dict):
        raise ConfigError(f"{file}: models.{name}: expected a table [models.{name}]")
    try:
        spec = ModelSpec.model_validate({**table, "name": name})
    except ValidationError as exc:
        raise ConfigError(_describe(file, exc, f"models.{name}")) from None
    sources: list[ModelSpec | Candidate] = [spec, *spec.candidates]
    for source in sources:
        if source.path is not None and not Path(source.path).expanduser().is_absolute():
            source.path = str((file.parent / source.path).resolve())
    return spec


def _server_with_env(server: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    merged = dict(server)
    for field, info in ServerSettings.model_fields.items():
        value = env.get(f"MLXPOOL_{field.upper()}")
        if value is not None:
            is_list = getattr(info.annotation, "__origin__", None) is list or "list" in str(info.annotation)
            merged[field] = [v.strip() for v in value.split(",") if v.strip()] if is_list else value
    return merged


def _describe(file: Path, exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        field = f"{where}.{loc}" if loc else where
        lines.append(f"{file}: {field}: {err['msg']}")
    return "\n".join(lines)


def _check_names(settings: Settings) -> None:
    owner: dict[str, str] = {}
    for spec in settings.models.values():
        for name in (spec.name, *spec.aliases):
            if name in owner and owner[name] != spec.name:
                raise ConfigError(
                    f"{settings.source}: models.{spec.name}.aliases: {name!r} is already used by models.{owner[name]}"
                )
            owner[name] = spec.name
    for kind in KINDS:
        marked = [s.name for s in settings.models.values() if s.kind == kind and s.default]
        if len(marked) > 1:
            raise ConfigError(
                f"{settings.source}: models.{marked[1]}.default: {kind} already has a default (models.{marked[0]})"
            )
