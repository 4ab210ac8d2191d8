"""Watermark keys: the method's name, its parameters and the secret, in one JSON file.

    {"format": "stablekit-watermark-key", "version": 1, "method": "tree-ring",
     "params": {"latent_shape": [4, 64, 64], "image_size": [512, 512], ...}, "secret": "<64 hex digits>"}

All randomness a method needs (ring values, ChaCha20 key and nonce, SimHash hyperplanes, patch
seeds) is derived from the 32-byte secret with keyed BLAKE2b, one label per use, so the file holds
nothing else secret. Anyone holding the file can detect *and* forge the watermark: keep it private.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import StablekitError

FORMAT, VERSION = "stablekit-watermark-key", 1


@dataclass(frozen=True)
class Key:
    method: str
    params: dict
    secret: bytes = field(repr=False)

    def derive(self, *labels) -> bytes:
        """32 bytes derived from the secret and `labels` (ints, strings, bytes)."""
        return hashlib.blake2b(repr(labels).encode(), key=self.secret, digest_size=32).digest()

    def generator(self, *labels) -> torch.Generator:
        """A CPU torch generator seeded from the secret and `labels`."""
        return torch.Generator().manual_seed(int.from_bytes(self.derive(*labels)[:8], "little") >> 1)

    def to_data(self) -> dict:
        """The key as the JSON object of its file (secret included)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "params": self.params,
            "secret": self.secret.hex(),
        }

    def save(self, path: str | Path) -> None:
        """Write the key as JSON, readable by its owner only."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others
        os.chmod(path, 0o600)  # also when the file existed with wider permissions
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.to_data(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Key:
        path = Path(path)
        if not path.is_file():
            raise StablekitError(f"key file '{path}' does not exist; create one with `stablekit keygen`")
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            data = None
        return cls.from_data(data, f"'{path}'", "key file")

    @classmethod
    def from_data(cls, data, source: str = "the key", what: str = "key") -> Key:
        """The key of a key file's JSON object `data`; errors say "`source` is not a valid ... `what`"."""
        try:
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError
            if data.get("version") != VERSION:
                raise StablekitError(
                    f"{what} {source} has version {data.get('version')}; this stablekit reads version {VERSION}"
                )
            secret = bytes.fromhex(data["secret"])
            if len(secret) != 32 or not isinstance(data["method"], str) or not isinstance(data["params"], dict):
                raise ValueError
        except StablekitError:
            raise
        except (ValueError, KeyError, TypeError):
            raise StablekitError(f"{source} is not a valid stablekit watermark {what}") from None
        return cls(data["method"], data["params"], secret)
