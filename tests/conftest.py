"""Fixtures shared by all tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.media_server import MediaServer

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent


@pytest.fixture(scope="session")
def media_server() -> Iterator[MediaServer]:
    """A local HTTP server (OS-chosen port) serving ``media_server.files``; tests add files with ``serve``."""
    server = MediaServer({})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def pytest_collection_finish(session) -> None:
    _check_scheduling_policy("collecting the tests")


# CI (.ci/run) sets this: on its fresh machine every test runs, so a skip (a tool missing, a port taken, a
# model not built) fails the run instead of passing unnoticed. Only tests about CUDA may skip there.
NO_SKIPS = "OMNIGATE_TESTS_NO_SKIPS"
_unexpected_skips: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.skipped and os.environ.get(NO_SKIPS) == "1":
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if item.get_closest_marker("gpu") is None and "CUDA" not in reason:
            _unexpected_skips.append(f"{item.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter) -> None:
    if _unexpected_skips:
        terminalreporter.section(f"skipped, but {NO_SKIPS}=1 says every test runs here", red=True)
        for line in _unexpected_skips:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _unexpected_skips and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item) -> None:
    _check_scheduling_policy(item.nodeid)


def _check_scheduling_policy(where: str) -> None:
    """Every process the tests start inherits the test run's scheduling policy: a real-time one (SVT-AV1
    sets SCHED_FIFO when run as root, see media_factory) makes helm, Prometheus and the services starve the
    machine and time out. Fail at the step that changed it rather than far away."""
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        pytest.fail(f"the test run's scheduling policy was changed to real-time by {where}", pytrace=False)
