"""Fixtures for the speculative decoding tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def spec_log(caplog):
    """caplog with tokenmill.spec's INFO records, also once tokenmill's logger stops
    propagating to the root logger (the library's setup_logging does that)."""
    logger = logging.getLogger("tokenmill.spec")
    attach = not logging.getLogger("tokenmill").propagate
    if attach:
        logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="tokenmill.spec"):
            yield caplog
    finally:
        if attach:
            logger.removeHandler(caplog.handler)
