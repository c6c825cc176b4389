"""Logging for the CLI and library: INFO to stderr unless TOKENMILL_LOG_LEVEL says otherwise."""

from __future__ import annotations

import logging
import os


def setup_logging() -> None:
    logger = logging.getLogger("tokenmill")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("TOKENMILL_LOG_LEVEL", "INFO").upper())
    logger.propagate = False
