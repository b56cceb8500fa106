"""The HTTP layer: thin Starlette routes over the pool."""

from mlxpool.api.app import create_app

__all__ = ["create_app"]
