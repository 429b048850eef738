"""Reading stores of earlier formats: each difference this safe-cache still reads, and why.

Store schema 1 (safe-cache 0.2.0 as first landed) spelled the backbone card's sizes `T`, `C`,
`D` and `grid`, in the card and in the manifest's `shapes`; schema 2 spells them `tokens`,
`channels`, `embed_dim` and `token_grid` (`grid` also meant the lr x wd grid). Stores of schema
1 exist outside this repository (0.2.0 was published), so they are read: the manifest is
renamed in memory on every read (`current_manifest`), its seal checked on the stored form, and
the next write of the manifest (extract adding to the store) stores schema 2. The fingerprint
hashes the same values under frozen labels (identity.FINGERPRINT_FIELDS), so a store's
fingerprint, and the identity of every result fitted from it, are the same in both schemas.

Exported heads (export.py) carry a backbone card too: `current_card` reads theirs.

Stores of safe-cache 0.1 (no manifest seal) are not read: 0.1 was never released on its own.
"""

from __future__ import annotations

from typing import Any

from ..identity import CARD_KEY_RENAMES as RENAMED_CARD_KEYS  # the fingerprint's labels too
from .schema import SCHEMA_VERSION

READABLE_VERSIONS = (1, SCHEMA_VERSION)


def current_card(card: dict[str, Any]) -> dict[str, Any]:
    """A backbone card in today's keys (card schema 1's renamed; a card of today unchanged)."""
    if not any(key in card for key in RENAMED_CARD_KEYS):
        return card
    renamed = {RENAMED_CARD_KEYS.get(key, key): value for key, value in card.items()}
    if "schema" in renamed:
        renamed["schema"] = 2
    return renamed


def current_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest in today's schema: schema 1's card and shapes keys renamed."""
    if manifest.get("schema_version") != 1:
        return manifest
    upgraded = dict(manifest)
    upgraded["schema_version"] = SCHEMA_VERSION
    if isinstance(manifest.get("backbone"), dict):
        upgraded["backbone"] = current_card(manifest["backbone"])
    if isinstance(manifest.get("shapes"), dict):
        upgraded["shapes"] = {RENAMED_CARD_KEYS.get(key, key): value
                              for key, value in manifest["shapes"].items()}
    return upgraded
