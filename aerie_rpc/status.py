"""Errors as gRPC statuses a person can act on.

INVALID_ARGUMENT: a malformed tree, tensor or parameter; NOT_FOUND: an unknown session;
RESOURCE_EXHAUSTED: a limit (sessions, tokens); UNAVAILABLE: a lost peer or a draining
server; FAILED_PRECONDITION: a request that cannot apply to the session's current state.
"""

from __future__ import annotations

import grpc

from aerie.errors import AerieError

# Trailing metadata a drafter sets on a failed generation: which peer was lost (the gateway
# then retries elsewhere, avoiding it).
LOST_VERIFIER = "aerie-lost-verifier"
LOST_DRAFTER = "aerie-lost-drafter"


class ServiceError(Exception):
    """An error with the status it should be sent as."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Exhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Conflict(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status for an exception raised while serving a request."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, (AerieError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code(), exc.details() or str(exc.code())
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code, message = status_of(exc)
    context.abort(code, message)


def rpc_code(exc: grpc.RpcError) -> grpc.StatusCode:
    try:
        return exc.code()
    except Exception:  # noqa: BLE001 - not a call error
        return grpc.StatusCode.UNKNOWN


def rpc_details(exc: grpc.RpcError) -> str:
    try:
        return exc.details() or ""
    except Exception:  # noqa: BLE001
        return str(exc)


def trailing(exc: grpc.RpcError, key: str) -> str | None:
    try:
        for k, v in exc.trailing_metadata() or ():
            if k == key:
                return v
    except Exception:  # noqa: BLE001
        return None
    return None
