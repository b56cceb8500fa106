"""Request and response bodies, mirroring the OpenAI API reference."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EmbeddingRequest(BaseModel):
    """OpenAI API reference: Embeddings → Create embeddings (POST /v1/embeddings)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class ModelCard(BaseModel):
    """OpenAI API reference: Models → The model object; `kind`, `aliases` and `state` are mlxpool's own."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mlxpool"
    kind: str
    aliases: list[str]
    state: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
