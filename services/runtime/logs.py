"""Logging for stages: readable lines locally, one JSON object per line for log pipelines.

MLMESH_LOG_FORMAT=json gives each line the time, level, stage and logger, the
message, and whatever the code passed as `extra` (the per-RPC line passes
method, code, duration_ms, cache_hit, run_id, caller and, for failures,
error; an INTERNAL adds incident and traceback). While tracing is on, every
line also carries the trace_id and span_id of the span it was written in, so
a log search and a trace view lead to each other.
"""

from __future__ import annotations

import logging
import sys

from services.runtime import tracing

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _TraceIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = tracing.current_ids()
        return True


def json_formatter(stage: str) -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger", "exc_info": "traceback"},
        static_fields={"stage": stage},
        timestamp="time",  # ISO 8601 in UTC, with microseconds
    )


def configure_logging(level: str, log_format: str = "text", stage: str = "") -> None:
    """Send this process's log to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(json_formatter(stage))
        handler.addFilter(_TraceIds())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
