"""API keys: which bearer tokens the server accepts, and the label each request is billed to.

The ledger records a key's label, never the key. A keys file holds one key per line, optionally
preceded by its label (`alice sk-...`); blank lines and `#` comments are skipped. A key given
without a label is labelled `key-` + the first 8 hex digits of its SHA-256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenmill.config import ConfigError

ANONYMOUS = "anonymous"  # the label of every request when the server runs without keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def default_label(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class ApiKeys:
    """Immutable after construction. `label_for(header)` is what the request handlers call."""

    def __init__(self, keys: dict[str, str] | None = None) -> None:
        """`keys`: key -> label."""
        self._labels = {_digest(k): label for k, label in (keys or {}).items()}

    @classmethod
    def load(cls, api_keys: list[str] | None = None, keys_file: str | Path | None = None) -> ApiKeys:
        keys: dict[str, str] = {}
        for key in api_keys or []:
            if not key.strip():
                raise ConfigError("--api-key: an API key cannot be empty")
            keys[key.strip()] = default_label(key.strip())
        if keys_file is not None:
            path = Path(keys_file)
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise ConfigError(f"--api-keys-file {path}: {e.strerror or e}") from None
            for number, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) > 2:
                    raise ConfigError(f"{path}:{number}: expected 'KEY' or 'LABEL KEY', got {len(parts)} fields")
                label, key = (parts[0], parts[1]) if len(parts) == 2 else (default_label(parts[0]), parts[0])
                keys[key] = label
            if not keys:
                raise ConfigError(f"--api-keys-file {path}: no keys in it")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._labels)

    def label_for(self, authorization: str | None) -> str | None:
        """The label of the key in an `Authorization: Bearer KEY` header; None if it is not ours.

        Without keys every request is ANONYMOUS. Keys are compared by SHA-256 digest, so the
        time taken does not depend on how much of a wrong key matches."""
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self._labels.get(_digest(token.strip()))
