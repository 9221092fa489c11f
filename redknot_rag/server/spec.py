"""The served OpenAPI spec: request bodies that routes parse themselves (limits.read_model, for
its 413/400/422 answers) are declared here from the same pydantic models, so clients and fuzzers
see the schemas the server enforces."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

_SCHEMAS: dict[str, dict[str, Any]] = {}  # components.schemas added to FastAPI's own


def request_body(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model`."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _SCHEMAS.update(schema.pop("$defs", {}))
    _SCHEMAS[model.__name__] = schema
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": ref}}}}


def install(app: FastAPI) -> None:
    """Make `app.openapi()` include the declared request body schemas."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = base()
            spec.setdefault("components", {}).setdefault("schemas", {}).update(_SCHEMAS)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
