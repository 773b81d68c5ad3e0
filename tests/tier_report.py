"""A pytest plugin for tests/test_tiers.py: prints each collected test's tiers."""
from __future__ import annotations

TIERS = ("unit", "integration", "e2e")


def pytest_collection_finish(session):
    for item in session.items:
        tiers = [t for t in TIERS if item.get_closest_marker(t)]
        print(f"TIER {item.nodeid} {','.join(tiers) or '-'}")
