"""Database credentials from a Secret in the resource's own namespace.

The Secret holds a libpq URI under ``key`` (default ``uri``), or separate
``host``/``port``/``dbname``/``user``/``password`` keys. It is read again on
every use, so a rotated Secret is picked up without a restart; the password
never leaves this module except inside the DSN handed to psycopg, and
``redact`` scrubs it from any text that may reach logs, events or status.
"""

from __future__ import annotations

import base64
import contextlib
import re
import urllib.parse
from collections.abc import Mapping

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from matview.k8s import conditions

_PARTS = ("host", "port", "dbname", "user", "password", "sslmode")


class CredentialsError(Exception):
    """The Secret is missing or unusable; ``reason`` is a condition reason."""

    def __init__(self, reason: conditions.Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def dsn_from_secret(secret_name: str, data: Mapping[str, str] | None, key: str = "uri") -> str:
    """Build a DSN from a Secret's (base64) data."""
    decoded = {k: base64.b64decode(v).decode() for k, v in (data or {}).items()}
    if key in decoded and decoded[key].strip():
        return decoded[key].strip()
    if key == "uri" and "host" in decoded and "dbname" in decoded:
        return make_conninfo("", **{k: decoded[k] for k in _PARTS if k in decoded})
    present = ", ".join(sorted(decoded)) or "none"
    raise CredentialsError(
        conditions.Reason.SECRET_KEY_MISSING,
        f"Secret {secret_name!r} has no key {key!r}"
        + (" (nor host and dbname keys)" if key == "uri" else "")
        + f"; keys present: {present}",
    )


#: Where a password stands in a DSN that libpq cannot parse: the URI's userinfo, or a password= keyword.
_URI_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*:([^@/?#]*)@")
_KEYWORD_PASSWORD = re.compile(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'?|\S+)")


def _passwords(dsn: str) -> set[str]:
    """Every spelling of the DSN's password that an error message may quote: parsed when libpq can parse the
    DSN, and read where it stands when it cannot (a stray % or quote is exactly when libpq's error message
    quotes the token that holds it)."""
    found: set[str] = set()
    with contextlib.suppress(Exception):
        password = conninfo_to_dict(dsn).get("password")
        if password:
            found.add(str(password))
    for match in (_URI_PASSWORD.match(dsn), *_KEYWORD_PASSWORD.finditer(dsn)):
        if match and match.group(1):
            raw = match.group(1)
            found |= {raw, raw.strip("'"), urllib.parse.unquote(raw)}
    return {p for p in found if p}


def redact(text: str, dsn: str | None) -> str:
    """Remove the DSN's password (and the DSN itself) from text, parsable or not."""
    if not dsn:
        return text
    text = text.replace(dsn, "<dsn>")
    for password in sorted(_passwords(dsn), key=len, reverse=True):
        text = text.replace(password, "***")
    return text


def describe(dsn: str) -> str:
    """host:port/dbname for messages — never the user's password."""
    try:
        parts = conninfo_to_dict(dsn)
    except Exception:
        return "<unparsable dsn>"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"
