"""Bearer-token authentication: a server interceptor and the client's metadata.

Every RPC must carry ``authorization: Bearer <token>`` except the standard
health service (``/grpc.health.v1.Health/``), which stays open for load
balancers and probes. A missing or wrong token gets UNAUTHENTICATED; the
comparison is constant-time.
"""
from __future__ import annotations

import hmac

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
HEADER = "authorization"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    return ((HEADER, f"Bearer {token}"),)


def _abort_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def deny(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    def deny_stream(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover (a generator, as the streaming handler must be)

    # Request-streaming forms: the refusal never reads (or decodes) the request, and the wire does not
    # tell the difference.
    kw = {"response_serializer": handler.response_serializer}
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.stream_unary_rpc_method_handler(deny, **kw)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty token")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        got = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == HEADER:
                got = value
                break
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if got is None:
            return _abort_handler(handler, "missing bearer token (metadata 'authorization: Bearer <token>')")
        if not hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._expected):
            return _abort_handler(handler, "wrong bearer token")
        return handler
