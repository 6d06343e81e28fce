"""API keys with scopes; Bearer, or Basic with the key as the password (for Logstash).

Below the receivers and the API, which both check keys with a ``KeyRing`` the service makes."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence

from meter_gateway.config import ApiKeyConfig
from meter_gateway.http import ApiError

IMPLIED = {"admin": {"admin", "read", "ingest"}, "read": {"read"}, "ingest": {"ingest"}}
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="meter-gateway"'}


class AuthError(ApiError):
    """401 (no key, or a wrong one: the answer carries the Bearer challenge) or 403 (the key
    lacks the scope)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message, headers=CHALLENGE if status == 401 else None)


class KeyRing:
    """Resolves an Authorization header to the key's name and scopes."""

    def __init__(self, keys: Sequence[ApiKeyConfig], environ: Mapping[str, str]) -> None:
        self._keys: dict[bytes, tuple[str, frozenset[str]]] = {}
        for k in keys:
            scopes: set[str] = set()
            for s in k.scopes:
                scopes |= IMPLIED[s]
            self._keys[_digest(k.resolve(environ))] = (k.name, frozenset(scopes))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None, scope: str) -> str | None:
        """The key's name if it may use ``scope``; raises AuthError (401/403) otherwise.

        With no keys configured, everything is open (the local embedded default).
        """
        if not self._keys:
            return None
        key = _key_from_header(authorization)
        if key is None:
            raise AuthError(401, "missing credentials: send Authorization: Bearer <api key>")
        found = None
        d = _digest(key)
        for known, entry in self._keys.items():
            if hmac.compare_digest(known, d):
                found = entry
        if found is None:
            raise AuthError(401, "invalid API key")
        name, scopes = found
        if scope not in scopes:
            raise AuthError(403, f"API key {name!r} lacks the {scope!r} scope")
        return name


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _key_from_header(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and value:
        return value
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None
