"""Domain errors raised by stage code, and the one place they become gRPC statuses.

Stage code raises, for example, `InvalidArgument("test_fraction must be in (0, 1)")`;
the server interceptor turns it into the matching status with that message.
Anything that is not a StageError is a bug: the caller gets INTERNAL with a
generic message and an incident id, and the traceback goes to the log only.
"""

from __future__ import annotations

import grpc

MAX_DETAIL = 200


def bounded(detail: object, limit: int = MAX_DETAIL) -> str:
    """A library's error text, cut to a length fit for a status message."""
    text = " ".join(str(detail).split())
    return text if len(text) <= limit else text[:limit] + "..."


# A status message travels in an HTTP/2 trailer and ends up in logs and terminals: at most 1 KiB.
MAX_STATUS_BYTES = 1024


def status_message(text: str, limit: int = MAX_STATUS_BYTES) -> str:
    """`text` cut to at most `limit` bytes of UTF-8 (never mid-character), marked with '...' when cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


class StageError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(StageError):
    """The request itself is wrong; the caller must change it."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StageError):
    """A referenced artifact or source does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(StageError):
    """The request is well formed but the data cannot be used as asked."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DataLoss(StageError):
    """Stored bytes do not match their digest, or cannot be decoded."""

    code = grpc.StatusCode.DATA_LOSS


class ResourceExhausted(StageError):
    """The request would need more memory or compute than this service allows."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(StageError):
    """A dependency (such as the artifact store) is unreachable; retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(StageError):
    """Every caller waiting for this computation went away."""

    code = grpc.StatusCode.CANCELLED


class PermissionDenied(StageError):
    """The request names something this service may not touch, such as a file outside MLMESH_DATA_ROOTS."""

    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(StageError):
    """Something this service waits on (a remote data source) did not answer in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
