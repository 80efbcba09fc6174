"""The result API's OpenAPI 3.1 document, served at ``/openapi.json``.

Written by hand next to the handlers in ``api.py``; the schemathesis run in
``tests/cloud_ingest/test_api.py`` checks that the server does what this says.
"""

from __future__ import annotations

from typing import Any

from edge_tier.wire import ID_PATTERN, UPLOAD_ID_PATTERN

# Cursors are unpadded base64url (api.Cursor.encode); far shorter than this.
CURSOR_PATTERN = "^[A-Za-z0-9_-]{0,200}$"
# ``since``: epoch milliseconds (at most 15 digits: until the year 33658), or an ISO 8601 time with a zone.
SINCE_MS_PATTERN = "^[0-9]{1,15}$"

_PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": _PROBLEM}


_COMMON = {
    "400": _problem("A parameter is malformed; `detail` says which and why"),
    "401": _problem("No token, or not a valid one"),
    "429": {
        **_problem("Over this token's request rate"),
        "headers": {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}},
    },
    "503": _problem("JetStream is not reachable"),
}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def document(page_max: int = 1000) -> dict[str, Any]:
    nullable_int = {"type": ["integer", "null"]}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edge-tier result API",
            "version": "1.0.0",
            "description": "Tier-two results of a tenant's devices. A token sees only its own tenant; "
            "another tenant's ids read as not found.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/devices": {
                "get": {
                    "operationId": "listDevices",
                    "summary": "The tenant's devices: status (online, backlog, evictions, model) and results",
                    "responses": {
                        "200": {"description": "devices", "content": _json("DeviceList")},
                        **_COMMON,
                    },
                }
            },
            "/v1/devices/{device}/results": {
                "get": {
                    "operationId": "listResults",
                    "summary": "One device's results, a page at a time, oldest or newest first",
                    "parameters": [
                        {"name": "device", "in": "path", "required": True, "schema": _id()},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": page_max},
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "description": "the last page's next_cursor (opaque; keeps order and since); "
                            "empty or absent: the first page",
                            "schema": {"type": "string", "pattern": CURSOR_PATTERN},
                        },
                        {
                            "name": "order",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["oldest", "newest"]},
                        },
                        {
                            "name": "since",
                            "in": "query",
                            "description": "results produced at or after: epoch ms, or ISO 8601 with a zone",
                            "schema": {
                                "anyOf": [
                                    {"type": "string", "pattern": SINCE_MS_PATTERN},
                                    {"type": "string", "format": "date-time"},
                                ]
                            },
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "a page; no next_cursor: the last one",
                            "content": _json("Page"),
                        },
                        "404": _problem("No such device of this tenant"),
                        **_COMMON,
                    },
                }
            },
            "/v1/uploads/{upload_id}": {
                "get": {
                    "operationId": "getUpload",
                    "summary": "The results of one upload (tenant.device.first-last)",
                    "parameters": [
                        {
                            "name": "upload_id",
                            "in": "path",
                            "required": True,
                            "description": "tenant.device.first-last, seqs in decimal without leading zeros",
                            "schema": {"type": "string", "pattern": UPLOAD_ID_PATTERN},
                        }
                    ],
                    "responses": {
                        "200": {"description": "the upload's results", "content": _json("Upload")},
                        "404": _problem(
                            "No results for this upload (yet), not of this tenant, or no upload can have "
                            "this id (first > last)"
                        ),
                        **_COMMON,
                    },
                }
            },
            "/v1/stream": {
                "get": {
                    "operationId": "streamResults",
                    "summary": "New results as server-sent events (event: result, id: resumable); keep-alive "
                    "comments every few seconds",
                    "parameters": [
                        {"name": "device", "in": "query", "schema": _id()},
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "schema": {"type": "string", "pattern": "^[0-9]+$"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        **_COMMON,
                    },
                }
            },
            "/healthz": {"get": _plain("The process is up", "Health")},
            "/readyz": {
                "get": {
                    **_plain("Ready: NATS reachable, streams present, index caught up", "Ready"),
                    "responses": {
                        "200": {"description": "ready", "content": _json("Ready")},
                        "503": {"description": "not ready", "content": _json("Ready")},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Prometheus",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "edge-provision token add TENANT",
                }
            },
            "schemas": {
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "instance": {"type": "string"},
                    },
                },
                "Device": {
                    "type": "object",
                    "required": ["device", "online", "results", "evictions"],
                    "properties": {
                        "device": {"type": "string"},
                        "online": {"type": "boolean"},
                        "last_seen_ms": nullable_int,
                        "backlog_records": nullable_int,
                        "backlog_bytes": nullable_int,
                        "oldest_age_s": {"type": ["number", "null"]},
                        "evictions": {"type": "object", "additionalProperties": {"type": "integer"}},
                        "model_version": {"type": ["string", "null"]},
                        "control": {
                            "type": ["object", "null"],
                            "description": "the device's acknowledgement of its control document "
                            "(generation, paused, threshold, upload cap, model state; docs/wire-format.md)",
                        },
                        "results": {"type": "integer", "minimum": 0},
                        "last_result_ms": nullable_int,
                    },
                },
                "DeviceList": {
                    "type": "object",
                    "required": ["devices"],
                    "properties": {
                        "devices": {"type": "array", "items": {"$ref": "#/components/schemas/Device"}}
                    },
                },
                "Result": {
                    "type": "object",
                    "required": [
                        "device",
                        "seq",
                        "time_ms",
                        "score",
                        "label",
                        "confidence",
                        "upload_id",
                        "event_id",
                    ],
                    "properties": {
                        "device": {"type": "string"},
                        "seq": {"type": "integer", "minimum": 0},
                        "time_ms": {"type": "integer", "minimum": 0},
                        "score": {"type": "number"},
                        "label": {"type": "string"},
                        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                        "value": {
                            "type": "number",
                            "description": "a regressor's answer (its confidence is 0)",
                        },
                        "upload_id": {"type": "string"},
                        "produced_ms": {"type": "integer"},
                        "model": {"type": "string"},
                        "model_version": {"type": "string"},
                        "event_id": {"type": "string"},
                    },
                },
                "Page": {
                    "type": "object",
                    "required": ["results", "next_cursor"],
                    "properties": {
                        "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"}},
                        "next_cursor": {"type": ["string", "null"]},
                    },
                },
                "Upload": {
                    "type": "object",
                    "required": ["upload_id", "device", "first_seq", "last_seq", "complete", "results"],
                    "properties": {
                        "upload_id": {"type": "string"},
                        "device": {"type": "string"},
                        "first_seq": {"type": "integer"},
                        "last_seq": {"type": "integer"},
                        "complete": {"type": "boolean", "description": "every part of the answer is there"},
                        "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"}},
                    },
                },
                "Health": {"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}},
                "Ready": {
                    "type": "object",
                    "required": ["ready", "checks"],
                    "properties": {
                        "ready": {"type": "boolean"},
                        "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
                    },
                },
            },
        },
    }


def _id() -> dict[str, Any]:
    return {"type": "string", "pattern": ID_PATTERN}


def _plain(summary: str, ref: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [],
        "responses": {"200": {"description": summary, "content": _json(ref)}},
    }
