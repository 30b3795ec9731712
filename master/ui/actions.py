"""What the UI's buttons write: each action is one transaction, guarded by the KID the user saw.

``plan(action, path, form, current)`` is a pure function: from the path,
the submitted form and the value now at the path it returns the
transaction's ops and compares, or raises ``BadRequest`` before anything is
written.  The caller checks the ACL and submits the transaction exactly as
``POST /v1/tx`` does, with the user's own principal as author.

Every action compares the path with the KID shown on the page (``kid``
field), so acting on a stale page is refused (412) instead of overwriting
someone else's change.

Actions:

``restart``  ``/machines/<m>/procs/<p>.json``: add 1 to ``restart_nonce``;
             the spec's KID changes, so the Mayor replaces the process.
``stop``     the same path: delete the spec; the Mayor stops the process.
``rollback`` ``/apps/<app>/app.json``: set ``current`` to an earlier release's number.
``scale``    ``/jobs/<job>.json``: set ``replicas``.
``edit``     any ``*.json``: replace the value with the submitted JSON text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from keg.errors import BadRequest
from keg.transaction import compare, delete, put

PROC_SPEC = re.compile(r"^/machines/[^/]+/procs/[^/]+\.json$")
APP_OBJECT = re.compile(r"^/apps/[^/]+/app\.json$")
JOB_OBJECT = re.compile(r"^/jobs/[^/]+\.json$")
KID_FIELD = re.compile(r"^K-[0-9a-f]{40}$")
MAX_REPLICAS = 100_000
ACTIONS = ("restart", "stop", "rollback", "scale", "edit")


@dataclass(frozen=True)
class Plan:
    """The ops and compares of one action, and where to send the browser afterwards."""

    ops: tuple
    compares: tuple
    done: str           # the action's name, shown as a notice after the redirect
    redirect: str       # the namespace path whose page to show


def dump(value) -> str:
    """How the UI writes a JSON object: indented, keys in their order, with a final newline."""
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def _object(current, path: str) -> dict:
    if current is None:
        raise BadRequest(f"{path} does not exist (any more)")
    try:
        value = json.loads(current)
    except ValueError as err:
        raise BadRequest(f"{path} is not valid JSON ({err}); edit it as a whole instead") from err
    if not isinstance(value, dict):
        raise BadRequest(f"{path} holds JSON that is not an object")
    return value


def _whole(form: dict, name: str, low: int, high: int) -> int:
    text = (form.get(name) or "").strip()
    try:
        number = int(text)
    except ValueError as err:
        raise BadRequest(f"{name} must be a whole number, not {text!r}") from err
    if not low <= number <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, not {number}")
    return number


def expected_kid(form: dict) -> str:
    """The KID the page showed, which the path must still have."""
    kid = (form.get("kid") or "").strip()
    if not KID_FIELD.match(kid):
        raise BadRequest("the form has no valid 'kid' field (the KID of the value shown); reload the page")
    return kid


def plan(action: str, path: str, form: dict, current: bytes | None) -> Plan:
    """The transaction for ``action`` on ``path``.

    Args:
        form: the submitted fields.
        current: the value now at ``path`` (None when absent).

    Raises:
        BadRequest: the action does not apply to the path, or a field is wrong.
    """
    guard = (compare(path, expected_kid(form)),)
    if action in ("restart", "stop"):
        if not PROC_SPEC.match(path):
            raise BadRequest(f"{action} applies to a process spec /machines/<m>/procs/<p>.json, not {path}")
        if action == "stop":
            return Plan((delete(path),), guard, "stop", path.rsplit("/", 2)[0])
        spec = _object(current, path)
        nonce = spec.get("restart_nonce")
        spec["restart_nonce"] = (nonce if isinstance(nonce, int) and not isinstance(nonce, bool) else 0) + 1
        return Plan((put(path, dump(spec)),), guard, "restart", path)
    if action == "rollback":
        if not APP_OBJECT.match(path):
            raise BadRequest(f"rollback applies to /apps/<app>/app.json, not {path}")
        app = _object(current, path)
        number = _whole(form, "release", 0, 1 << 31)
        releases = app.get("releases") if isinstance(app.get("releases"), list) else []
        if not any(isinstance(r, dict) and r.get("number") == number for r in releases):
            raise BadRequest(f"{path} has no release {number}")
        app["current"] = number
        return Plan((put(path, dump(app)),), guard, "rollback", path)
    if action == "scale":
        if not JOB_OBJECT.match(path):
            raise BadRequest(f"scale applies to /jobs/<job>.json, not {path}")
        job = _object(current, path)
        job["replicas"] = _whole(form, "replicas", 0, MAX_REPLICAS)
        return Plan((put(path, dump(job)),), guard, "scale", path)
    if action == "edit":
        if not path.endswith(".json"):
            raise BadRequest(f"only JSON values are edited here, not {path}")
        text = (form.get("value") or "").replace("\r\n", "\n")
        try:
            json.loads(text)
        except ValueError as err:
            raise BadRequest(f"the new value is not valid JSON: {err}") from err
        if not text.endswith("\n"):
            text += "\n"
        return Plan((put(path, text),), guard, "edit", path)
    raise BadRequest(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
