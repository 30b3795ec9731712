"""The OpenAPI 3.1 description of the master's HTTP interface, served at ``/v1/openapi.json``."""

from __future__ import annotations

import functools

ERROR = {"$ref": "#/components/schemas/Error"}


def _answer(description: str, schema=None, content_type: str = "application/json") -> dict:
    out = {"description": description}
    if schema is not None:
        out["content"] = {content_type: {"schema": schema}}
    return out


def _errors(*codes: int) -> dict:
    words = {400: "malformed path, KID, revision or body", 401: "missing or invalid token",
             403: "the token lacks the right", 404: "no such path, revision or KID",
             409: "a file where a directory is, or the reverse", 412: "a compare (If-Match, If-None-Match) failed",
             413: "the body is larger than the server accepts"}
    return {str(c): _answer(words[c], ERROR) for c in codes}


def _query(name: str, description: str, kind: str = "string", required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": {"type": kind}}


PATH_PARAM = {"name": "path", "in": "path", "required": True, "description": "a namespace path without the leading '/'",
              "schema": {"type": "string"}}
REV = _query("rev", "revision number, revision KID, or -N counting back from the head")


@functools.lru_cache(maxsize=1)
def spec() -> dict:
    """The OpenAPI document."""
    keg_path = {
        "parameters": [PATH_PARAM],
        "get": {"summary": "Read a path: a file's bytes, or a directory as JSON. ETag is the KID. A large value "
                           "(header Keg-Large: 1) is streamed chunk by chunk, each chunk verified.",
                "parameters": [REV, {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
                               _query("pointer", "1: for a large value, its chunk list as JSON instead of its bytes"),
                               _query("values", "1: a directory's listing carries the bytes of each file of at most "
                                                "64 KiB that is not a large value: value (UTF-8 text) or value_base64")],
                "responses": {"200": {"description": "the value; headers Keg-Kind, Keg-Size, Keg-Revision",
                                      "content": {"application/octet-stream": {}, "application/json": {
                                          "schema": {"$ref": "#/components/schemas/Listing"}}}},
                              "304": {"description": "the value still has the KID given in If-None-Match"},
                              **_errors(400, 401, 403, 404)}},
        "head": {"summary": "Kind, size and KID of a path, as headers.", "parameters": [REV],
                 "responses": {"200": {"description": "headers only"}, **_errors(400, 401, 403, 404)}},
        "put": {"summary": "Write the body at the path (creating directories).",
                "parameters": [{"name": "If-Match", "in": "header", "description": "\"K-…\": write only if the path has this KID",
                                "schema": {"type": "string"}},
                               {"name": "If-None-Match", "in": "header", "description": "*: write only if the path is absent",
                                "schema": {"type": "string"}},
                               _query("mode", "file (default) or exec")],
                "requestBody": {"content": {"application/octet-stream": {}}},
                "responses": {"200": _answer("written", {"$ref": "#/components/schemas/TxResult"}),
                              **_errors(400, 401, 403, 409, 412, 413)}},
        "delete": {"summary": "Remove the path.",
                   "parameters": [_query("recursive", "1 to remove a directory and what is under it"),
                                  {"name": "If-Match", "in": "header", "schema": {"type": "string"}}],
                   "responses": {"200": _answer("removed", {"$ref": "#/components/schemas/TxResult"}),
                                 **_errors(400, 401, 403, 404, 412)}},
    }
    paths_doc = {
        "/v1/keg/{path}": keg_path,
        "/v1/tx": {"post": {"summary": "Apply a transaction: compares, then puts and deletes, atomically.",
                            "requestBody": {"content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/Transaction"}}}},
                            "responses": {"200": _answer("committed", {"$ref": "#/components/schemas/TxResult"}),
                                          **_errors(400, 401, 403, 409, 412, 413)}}},
        "/v1/head": {"get": {"summary": "The newest revision.",
                             "responses": {"200": _answer("revision", {"$ref": "#/components/schemas/Revision"})}}},
        "/v1/log": {"get": {"summary": "Revisions that changed a path, newest first.",
                            "parameters": [_query("path", "default /"), REV, _query("limit", "at most this many", "integer")],
                            "responses": {"200": _answer("revisions", {"type": "array", "items": {
                                "$ref": "#/components/schemas/Revision"}}), **_errors(400, 401, 403, 404)}}},
        "/v1/diff": {"get": {"summary": "Files that differ between two revisions (cost follows what changed).",
                             "parameters": [_query("from", "revision", required=True), _query("to", "revision (default head)"),
                                            _query("prefix", "only paths under this prefix")],
                             "responses": {"200": _answer("changes", {"type": "array", "items": {
                                 "$ref": "#/components/schemas/Change"}}), **_errors(400, 401, 403, 404)}}},
        "/v1/kid/{kid}": {"get": {"summary": "What a KID names (short forms resolve like git short hashes).",
                                  "parameters": [{"name": "kid", "in": "path", "required": True,
                                                  "schema": {"type": "string", "pattern": "^K-[0-9a-f]{8,40}$"}}],
                                  "responses": {"200": _answer("what it names", {"type": "object"}),
                                                **_errors(400, 401, 403, 404)}}},
        "/v1/watch": {"get": {
            "summary": "Events under a prefix after revision `since`: ordered, no gaps, resumable.",
            "description": "format=ndjson (default; the last event of each revision has \"end\": true), "
                           "format=sse (or Accept: text/event-stream; id: is the revision, Last-Event-ID resumes), "
                           "format=poll (long-poll: one JSON answer when there are events or `wait` passes; "
                           "its `revision` is the next `since`). Streams send heartbeats.",
            "parameters": [_query("prefix", "default /"), _query("since", "revision; default the head", "integer"),
                           _query("format", "ndjson, sse or poll"), _query("heartbeat", "seconds", "number"),
                           _query("wait", "long-poll: seconds to wait", "number")],
            "responses": {"200": {"description": "a stream of events", "content": {
                "application/x-ndjson": {"schema": {"$ref": "#/components/schemas/Event"}},
                "text/event-stream": {}, "application/json": {}}}, **_errors(400, 401, 403)}}},
        "/v1/chunks/{blake3}": {
            "parameters": [{"name": "blake3", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}],
            "get": {"summary": "A chunk's bytes (verified against the name).",
                    "responses": {"200": {"description": "bytes"}, **_errors(400, 401, 403, 404)}},
            "put": {"summary": "Store a chunk; refused if the body does not hash to the name.",
                    "responses": {"200": _answer("already stored"), "201": _answer("stored"),
                                  **_errors(400, 401, 413)}}},
        "/v1/chunks": {"post": {"summary": "Store a group of chunks with one sync (body application/x-keg-chunks: "
                                           "a 4-byte big-endian count, then per chunk its 32-byte blake3 digest, "
                                           "a 4-byte length and its bytes); each is checked against its digest "
                                           "and none is stored if one fails.",
                                "responses": {"200": _answer("{\"chunks\": n, \"created\": new ones}"),
                                              **_errors(400, 401, 413)}}},
        "/v1/chunks/read": {"post": {"summary": "The chunks named in {\"chunks\": [...]} (1 to 1024), each "
                                                "verified, in one answer framed as POST /v1/chunks takes them "
                                                "(application/x-keg-chunks).",
                                     "responses": {"200": {"description": "the chunks, in the order asked"},
                                                   **_errors(400, 401, 403, 404, 413)}}},
        "/v1/gc": {"post": {"summary": "Delete chunks no retained revision points at, untouched for ?grace= "
                                       "seconds (default 3600; needs write on /).",
                            "responses": {"200": {"description": "revisions examined, chunks kept and removed, "
                                                                 "bytes freed"}}}},
        "/v1/chunks/missing": {"post": {"summary": "Which of the chunks named in {\"chunks\": [...]} the keg "
                                                   "lacks; the others are kept from collection a while longer.",
                                        "responses": {"200": {"description": "{\"missing\": [...]}"}}}},
        "/v1/compact": {"post": {"summary": "Drop old history of volatile directories (needs write on /).",
                                 "parameters": [_query("window", "revisions to keep", "integer")],
                                 "responses": {"200": _answer("done", {"type": "object"}), **_errors(401, 403)}}},
        "/v1/status": {"get": {"summary": "This master: mode (single or raft), role, revision, housekeeping "
                                          "(checkpoints, repacks, their last errors); on a Raft replica also "
                                          "term, commit index and peers (needs read on /).",
                               "responses": {"200": _answer("status", {"type": "object"}), **_errors(401, 403)}}},
        "/v1/whoami": {"get": {"summary": "The principal the token names.",
                               "responses": {"200": _answer("principal", {"type": "object"}), **_errors(401)}}},
        "/git/keg.git/info/refs": {"get": {"summary": "git smart HTTP (clone and fetch only; pushes are refused).",
                                           "parameters": [_query("service", "git-upload-pack")],
                                           "responses": {"200": {"description": "ref advertisement"}}}},
    }
    schemas = {
        "Error": {"type": "object", "required": ["error", "error_type", "status"],
                  "properties": {"error": {"type": "string"}, "error_type": {"type": "string"},
                                 "status": {"type": "integer"}, "failed_compare": {"type": "object"}}},
        "Entry": {"type": "object", "properties": {k: {"type": "string"} for k in ("path", "name", "kind", "kid", "mode")}
                  | {"size": {"type": "integer"}}},
        "Listing": {"type": "object", "properties": {"path": {"type": "string"}, "kid": {"type": "string"},
                                                     "revision": {"type": "integer"},
                                                     "entries": {"type": "array", "items": {"$ref": "#/components/schemas/Entry"}}}},
        "Revision": {"type": "object", "properties": {"revision": {"type": "integer"}, "kid": {"type": "string"},
                                                      "time": {"type": "integer"}, "author": {"type": "string"},
                                                      "message": {"type": "string"}}},
        "Change": {"type": "object", "properties": {"path": {"type": "string"}, "old_kid": {"type": ["string", "null"]},
                                                    "new_kid": {"type": ["string", "null"]}}},
        "Event": {"type": "object", "properties": {"revision": {"type": "integer"}, "path": {"type": "string"},
                                                   "action": {"enum": ["create", "update", "delete"]},
                                                   "old_kid": {"type": ["string", "null"]},
                                                   "new_kid": {"type": ["string", "null"]}, "end": {"type": "boolean"}}},
        "Transaction": {"type": "object", "required": ["ops"], "properties": {
            "compare": {"type": "array", "items": {"type": "object", "required": ["path", "kid"], "properties": {
                "path": {"type": "string"}, "kid": {"type": ["string", "null"]}}}},
            "ops": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["op", "path"], "properties": {
                "op": {"enum": ["put", "delete", "link"]}, "path": {"type": "string"}, "value": {"type": "string"},
                "base64": {"type": "string"}, "mode": {"enum": ["file", "exec"]}, "recursive": {"type": "boolean"},
                "kid": {"type": "string", "description": "link: the commit KID the pointer names"},
                "large": {"type": "object", "description": "a value stored as chunks (PUT /v1/chunks first)",
                          "required": ["size", "blake3", "chunks"], "properties": {
                              "size": {"type": "integer"}, "blake3": {"type": "string"},
                              "chunks": {"type": "array", "items": {"type": "array"}}}}}}},
            "id": {"type": "string"}}},
        "TxResult": {"type": "object", "properties": {"ok": {"type": "boolean"}, "revision": {"type": "integer"},
                                                      "revision_kid": {"type": "string"}, "kids": {"type": "object"},
                                                      "error": {"type": "string"}, "failed_compare": {"type": "object"}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Keg master", "version": "1",
                 "description": "The Keg namespace over HTTP. Every request but this document needs a token: "
                                "Authorization: Bearer TOKEN, or Basic with the token as the password."},
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                           "basic": {"type": "http", "scheme": "basic"}}},
        "security": [{"bearer": []}, {"basic": []}],
        "paths": paths_doc,
    }
