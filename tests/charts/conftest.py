"""Chart tests: everything runs on rendered manifests, with no cluster."""

from __future__ import annotations

import pytest

from tests.charts.chart import missing_tools_reason


def pytest_collection_modifyitems(config, items):
    reason = missing_tools_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "tests/charts/" in str(item.fspath):
            item.add_marker(skip)
