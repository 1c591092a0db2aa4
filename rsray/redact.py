"""Credentials never leave the process: the one place that decides what is a secret and hides it.

Everything rsray prints or writes (console lines, MLflow params, tags and config artifacts,
checkpoint and sweep `config.yaml` files, prepare manifests, error messages) passes through
`redact` (text) or `redact_tree` (a config as plain data). Secrets are recognised two ways:
credentials inside a URI (`scheme://user:password@host`, `?token=...`) and keys whose name says
they hold one (`password`, `aws_secret_access_key`, `hf_token`; not `tokenizer` or `max_tokens`).
The running process keeps the real values; only what leaves it is redacted. MLflow's own
variables (`MLFLOW_TRACKING_USERNAME`, `MLFLOW_TRACKING_PASSWORD`, `MLFLOW_TRACKING_TOKEN`) are the
better place for credentials: nothing of them is ever in a config.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

HIDDEN = "***"
SECRET_WORDS = ("secret", "password", "passwd", "token", "credential", "credentials")  # whole `_` words
SECRET_PARTS = ("key_id", "access_key", "api_key", "private_key", "signature")  # anywhere in a key

# scheme://userinfo@ : userinfo is `user:password` or a bare token; both are credentials
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.\-]*://)([^/\s?#]+)@")  # to the authority's last @
# ?name=value / &name=value where the name looks like a secret (presigned URLs, token query strings)
_QUERY_VALUE = re.compile(r"([?&])([^=&#\s]+)=([^&#\s]*)")


def is_secret(key: str) -> bool:
    """True for names that hold credentials (aws_secret_access_key, hf_token, password, ...);
    `data.tokenizer` or `max_tokens` are not secrets."""
    key = str(key).lower()
    words = re.split(r"[_\-.\s]+", key)
    return any(w in words for w in SECRET_WORDS) or any(p in key for p in SECRET_PARTS)


def redact(text: Any) -> str:
    """`text` with every credential inside a URI replaced by `***` (the user name is kept, so a
    reader can still tell which account): `http://alice:pw@host` -> `http://alice:***@host`."""

    def userinfo(match: re.Match) -> str:
        user, sep, _ = match.group(2).partition(":")
        return f"{match.group(1)}{user}:{HIDDEN}@" if sep else f"{match.group(1)}{HIDDEN}@"

    def query(match: re.Match) -> str:
        return f"{match.group(1)}{match.group(2)}={HIDDEN}" if is_secret(match.group(2)) else match.group(0)

    return _QUERY_VALUE.sub(query, _USERINFO.sub(userinfo, str(text)))


_CONFIG_LINE = re.compile(r"^(\s*-?\s*)([\w.\-]+)(\s*[:=]\s*)(\S.*)$")


def redact_config_text(text: str) -> str:
    """`redact` for a config file's text kept as written (comments and all): also hides the value
    of each `key: value` / `key=value` line whose key names a secret."""

    def line(match: re.Match) -> str:
        lead, key, sep, _ = match.groups()
        return f"{lead}{key}{sep}{HIDDEN}" if is_secret(key) else match.group(0)

    return "\n".join(_CONFIG_LINE.sub(line, row) for row in redact(text).split("\n"))


def redact_tree(node: Any) -> Any:
    """A copy of plain data (a config's `to_dict()`) safe to write: values under secret-named keys
    become `***`, and every string has its URI credentials redacted."""
    if isinstance(node, Mapping):
        return {
            key: HIDDEN if is_secret(key) and value is not None else redact_tree(value) for key, value in node.items()
        }
    if isinstance(node, (list, tuple)):
        return [redact_tree(value) for value in node]
    if isinstance(node, str):
        return redact(node)
    return node


def split_credentials(uri: str) -> tuple[str, tuple[str, str] | None]:
    """`http://user:pw@host/x` -> (`http://host/x`, (user, pw)); a URI without credentials comes
    back as it is, with None. For the places that must *use* the credentials (an HTTP request)."""
    parts = urlsplit(uri)
    if not parts.scheme or "@" not in parts.netloc:
        return uri, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), (unquote(user), unquote(password))


def without_credentials(uri: str) -> str:
    """The URI with no userinfo at all: what a printed link should be (a browser asks for the login)."""
    return split_credentials(uri)[0]


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's final message: installed on rsray's console
    handler, so no log line (ours or a library's) shows a credential inside a URI."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
