"""Service errors, each carrying the gRPC status code it maps to.

The core raises these; the servicer turns them into ``context.abort(code, message)``.
Messages name the field and the value, as the trace reader's errors do.
"""
from __future__ import annotations

import grpc

# The most characters of one client string an error message echoes.
SHOWN_CHARS = 200
# The most bytes of a status message on the wire. gRPC sends it percent-encoded
# (3 bytes per byte outside printable ASCII) in the trailing metadata, whose
# default limit is 8 KiB soft, 16 KiB hard: past that the client sees
# RESOURCE_EXHAUSTED instead of the error.
MAX_MESSAGE_WIRE_BYTES = 4096


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, at most about ``limit`` characters.

    A longer client string is cut to its first ``limit`` characters, with an
    ellipsis and its length: ``'aaaa...'... (20000 characters)``. Other values
    are cut the same way on their repr.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, (bytes, bytearray)) and len(value) > limit:
        return f"{bytes(value[:limit])!r}... ({len(value)} bytes)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _wire_len(text: str) -> int:
    return sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in text.encode("utf-8", "replace"))


def safe_message(message: str, limit: int = MAX_MESSAGE_WIRE_BYTES) -> str:
    """``message`` cut so that its percent-encoded form fits ``limit`` bytes."""
    if _wire_len(message) <= limit:
        return message
    tail = f"... (message cut: {len(message)} characters)"
    budget, out = limit - len(tail), []
    for ch in message:
        cost = _wire_len(ch)
        if cost > budget:
            break
        budget -= cost
        out.append(ch)
    return "".join(out) + tail


class ServiceError(Exception):
    """An error with its gRPC code; the message is cut to what a status trailer can carry."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = safe_message(str(message))
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
