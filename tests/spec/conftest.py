"""Fixtures for the speculative decoding tests."""

from __future__ import annotations

import logging

import pytest


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def spec_log():
    """tokenmill.spec's INFO records, each once: a handler of our own on that logger, so the
    count does not depend on whether tokenmill's logger propagates or on where pytest's
    caplog attaches its handler (pytest >= 9.2 also attaches to non-propagating loggers)."""
    logger = logging.getLogger("tokenmill.spec")
    handler = _Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
