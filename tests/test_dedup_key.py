"""The dedup digest is stored (dedup_log, dedup_keys, the in-memory index): it must stay what
it has always been, BLAKE2b-128 over the namespace, a NUL and the identity."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from meter_gateway.model import dedup_key

# any code point, lone surrogates included (they pass through as UTF-8 'surrogatepass')
_ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=40)


def test_a_stored_digest_is_unchanged() -> None:
    assert dedup_key("id", "rec-1").hex() == "ad378dbf56b3ba73beabe4e77539204d"


@given(st.sampled_from(["id", "otlp", "vector", "prometheus", "logstash"]) | _ANY_TEXT, _ANY_TEXT)
def test_the_digest_is_blake2b_of_namespace_nul_identity(namespace: str, identity: str) -> None:
    data = f"{namespace}\x00{identity}".encode("utf-8", "surrogatepass")
    assert dedup_key(namespace, identity) == hashlib.blake2b(data, digest_size=16).digest()
    assert dedup_key(namespace, identity) == dedup_key(namespace, identity)  # from the cache
