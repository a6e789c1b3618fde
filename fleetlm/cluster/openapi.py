"""The ingress's OpenAPI schema (/openapi.json, and /docs to browse it), as vLLM publishes its
own, so that client generators and schema-driven testers (schemathesis) know the API.

The routes read their bodies themselves (authorization first, and every error in OpenAI's
shape), so FastAPI cannot see their request models; `publish` adds each route's model, the
OpenAI-shaped error answers and, when the server has API keys, the bearer scheme.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/"
ERROR_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}
ERRORS = {
    "400": "The request is invalid; the message names the field.",
    "401": "No valid API key (only when the server has API keys).",
    "404": "No such model.",
    "429": "The replicas' waiting queues are full.",
    "503": "No engine replica can take the request now.",
}
API_PREFIX = "/v1/"  # the routes behind the API keys


def publish(app: FastAPI, request_bodies: dict[str, type[BaseModel]],
            is_authenticated: bool) -> None:
    """Serve `app`'s schema with `request_bodies` (path -> the model its POST body is)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = _schema(app, request_bodies, is_authenticated)
        return app.openapi_schema

    app.openapi = openapi


def _schema(app: FastAPI, request_bodies: dict[str, type[BaseModel]],
            is_authenticated: bool) -> dict:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    models["ErrorResponse"] = ERROR_SCHEMA
    for path, body_type in request_bodies.items():
        body_schema = body_type.model_json_schema(ref_template=REF + "{model}")
        models.update(body_schema.pop("$defs", {}))
        models[body_type.__name__] = body_schema
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": REF + body_type.__name__}}},
        }
    error_content = {"application/json": {"schema": {"$ref": REF + "ErrorResponse"}}}
    if is_authenticated:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if path.startswith(API_PREFIX):
                operation["responses"].update(
                    {status: {"description": text, "content": error_content}
                     for status, text in ERRORS.items()})
                if is_authenticated:
                    operation["security"] = [{"bearer": []}]
    return schema
