"""Wire schemas: the single definition of what crosses the network (device <-> cloud).

The device's httpx client and the cloud's FastAPI server both import these pydantic models,
so a field can only change in one place.  Binary payloads travel base64-encoded inside JSON
(pydantic's ``Base64Bytes``): samples are small after UTS, and JSON keeps the API inspectable.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field

# Every id that crosses the wire has a strict pattern: none may carry '/', '.', or anything a
# path, a URL or a shell could read as structure.  The device still never builds a path from one.
SAMPLE_ID_PATTERN = r"^[0-9a-f]{16,64}$"
ROUND_ID_PATTERN = r"^[0-9a-f]{8,32}$"  # the cloud's secrets.token_hex(8); column String(32)
MODEL_ID_PATTERN = r"^[0-9a-f]{16,64}$"  # device.contracts.model_id (content hash)
BASE_MODEL_PATTERN = r"^[0-9A-Za-z_-]{1,128}$"  # a model id in practice; tests use short names
DEVICE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # the one pattern (cloud.device_tokens compiles it)
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAX_TEXT = 4096
# A round that the cloud lost to its own restart starts its message with this; the device then
# starts a fresh round by itself (the samples of an unfinished round were never consumed).
ROUND_INTERRUPTED = "interrupted"


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN, Infinity and overflowing literals such as 1e400 (which JSON
    # parsers turn into inf) are refused at validation, naming the field, on both sides.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class VisualTokens(_Strict):
    """The selected projected image embeddings (UTS token stage), quantized for the uplink."""

    indices: list[int] = Field(description="patch indices kept, row-major over the patch grid")
    n_total: int = Field(ge=1, description="number of visual tokens before selection")
    dim: int = Field(ge=1)
    dtype: Literal["f16", "q8"] = "f16"
    scale: list[float] = Field(default_factory=list, description="per-token scale for q8")
    data: Base64Bytes


class TokenStats(_Strict):
    """The uncertain answer tokens kept by UTS (positions index the device's answer tokens)."""

    positions: list[int]
    token_ids: list[int]
    entropy: list[float]


class UplinkSample(_Strict):
    """One uncertain sample selected on the device by UTS."""

    sample_id: str = Field(pattern=SAMPLE_ID_PATTERN, description="stable content id: re-sends are idempotent")
    base_model: str = Field(pattern=BASE_MODEL_PATTERN, description="content hash of the device model the answer came from")
    prompt: str = Field(max_length=MAX_TEXT)
    answer: str = Field(max_length=MAX_TEXT)
    answer_token_ids: list[int] = Field(default_factory=list)
    image: Base64Bytes | None = Field(None, description="compactly re-encoded image (PNG/WebP), UTS-masked")
    image_format: Literal["png", "webp", "jpeg"] | None = None
    image_patch_kept: list[int] | None = Field(None, description="patches left unmasked in `image`")
    visual_tokens: VisualTokens | None = None
    tokens: TokenStats
    score: float = Field(description="sample-level uncertainty that passed the UTS sample stage")
    ood_score: float = Field(0.0, description="input-side out-of-distribution score of the image")
    raw_bytes: int = Field(ge=0, description="bytes a no-selection uplink would send for this sample")
    tag: str | None = Field(None, max_length=64, description="optional label, e.g. the generated domain")


# --- uplink / round API (cloud server <-> device client) -------------------------------------

MAX_UPLOAD_SAMPLES = 256
RoundState = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL_ROUND_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})


class UploadRequest(_Strict):
    """One batch of queued samples; the client splits bigger queues into several requests."""

    samples: list[UplinkSample] = Field(min_length=1, max_length=MAX_UPLOAD_SAMPLES)


SampleId = Annotated[str, Field(pattern=SAMPLE_ID_PATTERN)]


class UploadResponse(_Strict):
    """Both lists count as acknowledged: the device may forget every id in either one."""

    accepted: list[SampleId] = Field(default_factory=list, description="ids stored by this request")
    duplicates: list[SampleId] = Field(default_factory=list, description="ids the cloud already had")


class SampleCounts(_Strict):
    total: int = Field(ge=0, description="samples this device has uploaded")
    unused: int = Field(ge=0, description="samples no finished round has learned from yet")


class SampleInfo(_Strict):
    """One stored sample as its device sees it (``GET /v1/samples``); no payload."""

    sample_id: str = Field(pattern=SAMPLE_ID_PATTERN)
    bytes: int = Field(ge=0)
    created_at: datetime
    round_id: str | None = Field(None, pattern=ROUND_ID_PATTERN, description="the finished round that learned from it")
    skipped: str | None = Field(None, max_length=MAX_TEXT, description="why a round could not use it (never retried)")


class SampleList(_Strict):
    """A page of a device's samples, oldest first; pass ``next_after`` as ``after`` for more."""

    samples: list[SampleInfo]
    next_after: str | None = Field(None, pattern=SAMPLE_ID_PATTERN)


class SampleDeleted(_Strict):
    sample_id: str = Field(pattern=SAMPLE_ID_PATTERN)
    deleted: bool = True


class RoundOptions(_Strict):
    """Knobs of one adaptation round; defaults follow the paper's operating point."""

    downlink_budget_bytes: int = Field(48 << 10, ge=1, description="largest patch the device accepts")
    steps: int = Field(150, ge=1, le=1_000_000, description="distillation optimizer steps")
    learning_rate: float = Field(1e-3, gt=0, le=1.0, description="adapter learning rate")
    seed: int = Field(0, ge=0)
    max_samples: int | None = Field(256, ge=1, description="samples used, oldest first; None = all")


class RoundRequest(_Strict):
    base_model: str = Field(pattern=BASE_MODEL_PATTERN, description="content hash of the device model")
    options: RoundOptions = Field(default_factory=RoundOptions)


class RoundStatus(_Strict):
    round_id: str = Field(pattern=ROUND_ID_PATTERN)
    state: RoundState
    stage: str = Field("", max_length=64)
    progress: float = Field(0.0, ge=0.0, le=1.0)
    message: str = Field("", max_length=MAX_TEXT)
    base_model: str = Field("", pattern=r"^$|" + BASE_MODEL_PATTERN)
    n_samples: int = Field(0, ge=0, description="samples the round learns from (known once running)")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    patch_bytes: int | None = Field(None, ge=0)
    patch_sha256: str | None = Field(None, pattern=SHA256_PATTERN)

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_ROUND_STATES


class DeviceInfo(_Strict):
    """What the cloud knows about the caller: lets a device check its token in one request."""

    name: str = Field(pattern=DEVICE_NAME_PATTERN)
    created_at: datetime
    samples: SampleCounts


class Health(_Strict):
    """Unauthenticated liveness probe; also tells clients the upload limits to batch under."""

    ok: bool = True
    version: str
    max_upload_bytes: int
    max_upload_samples: int = MAX_UPLOAD_SAMPLES
    signing_key: str | None = Field(None, pattern=r"^[A-Za-z0-9+/]{43}=$",
                                    description="Ed25519 public key (base64) that signs patches")


# --- device models held by the cloud (content-addressed, see device.contracts.model_id) -------

ModelRole = Literal["model", "mmproj"]  # == device.contracts.model_id.ROLES


class ModelPresence(_Strict):
    """Whether the cloud holds a complete copy (both GGUF files) of a device model."""

    model_id: str = Field(pattern=MODEL_ID_PATTERN)
    present: bool


class ModelUploadResult(_Strict):
    """One uploaded model file; ``complete`` once both roles are in and their hash matched."""

    model_id: str = Field(pattern=MODEL_ID_PATTERN)
    role: ModelRole
    complete: bool
