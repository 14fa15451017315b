"""Logging set-up: structlog, configured once per process.

Library code only calls ``structlog.get_logger()``; the command line calls
:func:`configure` before doing anything. Output goes to the stream it is
given: a service's stdout (journald's stream under systemd), stderr for
commands whose stdout is their result:

* a terminal gets readable, coloured lines;
* anything else (a pipe, a file, journald) gets one JSON object per line.
  When stdout is journald's stream (``$JOURNAL_STREAM`` names it) each line
  starts with a ``<N>`` syslog priority so journald files it at the right
  level.

The level comes from the ``level`` argument, else ``$DMUSERD_LOG_LEVEL``,
else ``info``.

structlog is imported by :func:`configure`, not by this module: the
command line reads :data:`LEVELS` while building its parser, and
``dmuserd --help`` should not pay for structlog (which imports asyncio).

No payload bytes ever reach a log line: any ``bytes``/``bytearray``/
``memoryview`` value bound to an event (at the top level or inside a list,
tuple or dict) is replaced by ``"<N bytes>"`` before rendering.
"""

from __future__ import annotations

import os
import sys

LEVELS = ("debug", "info", "warning", "error", "critical")

# syslog priorities (sd-daemon.h): journald reads "<N>" at a line's start.
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def stdout_is_journal(stream=None) -> bool:
    """True when ``stream`` (default stdout) is the journald stream systemd gave us."""
    stream = stream or sys.stdout
    journal = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in journal:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    dev, _, ino = journal.partition(":")
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def _redact(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{memoryview(value).nbytes} bytes>"
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    return value


def redact_payloads(logger, method_name, event_dict):
    """Replace data buffers in ``event_dict`` by their length (never log payloads)."""
    return {key: _redact(value) for key, value in event_dict.items()}


def _add_syslog_priority(logger, method_name, event_dict):
    event_dict["_priority"] = _SYSLOG_PRIORITY.get(event_dict.get("level", "info"), 6)
    return event_dict


class _PriorityJSONRenderer:
    """Render JSON, prefixed with ``<N>`` for journald."""

    def __init__(self) -> None:
        import structlog

        self._json = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(self, logger, method_name, event_dict):
        priority = event_dict.pop("_priority", 6)
        return f"<{priority}>" + self._json(logger, method_name, event_dict)


def resolve_level(level: str | None = None) -> str:
    level = (level or os.environ.get("DMUSERD_LOG_LEVEL") or "info").lower()
    if level == "warn":
        level = "warning"
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; choose one of {', '.join(LEVELS)}")
    return level


def configure(level: str | None = None, *, stream=None, force_json: bool | None = None) -> None:
    """Configure structlog for this process (safe to call again)."""
    import logging

    import structlog

    stream = stream or sys.stdout
    numeric = getattr(logging, resolve_level(level).upper())
    shared = [
        structlog.contextvars.merge_contextvars,
        redact_payloads,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    as_json = force_json if force_json is not None else not stream.isatty()
    if not as_json:
        renderer = [structlog.dev.ConsoleRenderer(colors=True)]
    elif stdout_is_journal(stream):
        renderer = [_add_syslog_priority, structlog.processors.format_exc_info, _PriorityJSONRenderer()]
    else:
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=shared + renderer,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
