"""Credentials given in a tracking URI (`http(s)://user:password@host/?token=...`, a PostgreSQL password)
move to the environment variables MLflow and libpq read themselves, so that no URI that Ray, Tune or
MLflow prints or stores (Tune's trial configs, params.json, logs, a run folder's record) carries them."""

from __future__ import annotations

import os
import re
import urllib.parse

from shortft.config import ConfigError
from shortft.progress import warn

CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD")
TOKEN_KEYS = ("token", "access_token")


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """`http(s)://user:password@host:port/?token=...` -> `http(s)://host:port/` and the user, password and
    token as MLflow's own environment variables; `postgresql://user:password@host/db` ->
    `postgresql://user@host/db` and $PGPASSWORD (libpq reads it; also from `?password=`). Other URIs as they
    are. Sets nothing."""
    try:
        parts = urllib.parse.urlsplit(uri)
        parts.port  # noqa: B018 - read now: a port out of range or not a number raised as the URI was printed
    except ValueError as e:  # urllib's traceback
        raise ConfigError(f"tracking URI {redacted(uri)}: {e}; give scheme://host:port/..., e.g. "
                          "http://127.0.0.1:5000") from None
    if parts.scheme.split("+")[0] == "postgresql":  # libpq also takes `?password=` in the query
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        env = {"PGPASSWORD": value for key, value in query if key == "password"}
        netloc = parts.netloc
        if parts.password is not None:
            user, host = netloc.rsplit("@", 1)
            netloc, env = f"{user.split(':', 1)[0]}@{host}", {"PGPASSWORD": urllib.parse.unquote(parts.password)}
        if not env:
            return uri, {}
        kept = urllib.parse.urlencode([(key, value) for key, value in query if key != "password"])
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=kept)), env
    if parts.scheme not in ("http", "https"):
        return uri, {}
    env = {}
    if parts.username is not None:
        env.update(MLFLOW_TRACKING_USERNAME=urllib.parse.unquote(parts.username),
                   MLFLOW_TRACKING_PASSWORD=urllib.parse.unquote(parts.password or ""))
    kept = []
    for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() in TOKEN_KEYS:
            env["MLFLOW_TRACKING_TOKEN"] = value
        else:
            kept.append((key, value))
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, urllib.parse.urlencode(kept), parts.fragment)), env


SECRET_QUERY = r"([?&](?:password|passwd|pwd|token|access_token)=)[^&#]*"


def redacted(uri: str) -> str:
    """`uri` with the password of its `user:password@` (if any; up to the last @: one with @ or / in it was
    shown from there on) and a password or token in its query shown as `***`: for the lines that name it."""
    uri = re.sub(r"^([^/]*//[^/@:]*):.*@", r"\1:***@", uri)
    return re.sub(SECRET_QUERY, r"\1***", uri, flags=re.IGNORECASE)


def has_secret(uri: str) -> bool:
    """A password or token in `uri`: in its `user:password@`, or in its query (`mysql://h/db?password=...`)."""
    return redacted(uri) != uri


def take_credentials(uri: str) -> str:
    """The URI without its credentials (`split_credentials`), which go to the environment."""
    stripped, env = split_credentials(uri)
    parts = urllib.parse.urlsplit(uri)
    if has_secret(stripped) and not env:
        warn(f"shortft: the tracking URI's password ({parts.scheme}://) stays in it, and sweeps and Ray runs store "
             "the URI; keep the password in the database driver's own settings instead")
    os.environ.update(env)
    return stripped


def credentials_env() -> dict[str, str]:
    """The credential variables set in this process (for a Ray job's runtime_env on a remote cluster)."""
    return {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}

