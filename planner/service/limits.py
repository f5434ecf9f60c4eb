"""Concurrency budgets, stream deadlines and request decoding for the gRPC server.

The server's worker pool has ``max_workers`` threads and an unbounded queue: a
call that finds every thread busy waits behind the others. Long-lived calls
(plan streams, progress streams, reflection) could therefore take every thread
and starve the rest, health checks included. :class:`LimitsInterceptor`
(outermost interceptor) keeps that from happening:

* ``Health`` (Check and the non-blocking Watch) is never counted or refused;
  every other call is, from its arrival to its end:
* at most ``max_workers - health_reserve`` calls of any other kind at once, so
  ``health_reserve`` threads are always free for health checks;
* at most ``max_workers - health_reserve - unary_reserve`` streams at once, so
  unary calls (Submit, GetServerInfo, ...) always have ``unary_reserve`` threads;
* per kind: ``max_plan_streams`` StreamPlans, ``max_report_streams``
  ReportProgress, ``max_other_streams`` other streams (server reflection).

A call over a budget is refused at once with RESOURCE_EXHAUSTED, the message
naming the limit and its option. Streams get deadlines: a StreamPlans or
ReportProgress (or reflection) call whose first message does not arrive within
``handshake_s`` ends with DEADLINE_EXCEEDED, and so does a client stream silent
for ``stream_idle_s`` between messages. (Once a plan stream is open, executor
liveness is the heartbeat timeout's job.)

Every handler is served in its request-streaming form (the wire does not tell
the difference), so the budget is released in the handler's ``finally`` on
every path, and a request that does not parse answers INVALID_ARGUMENT (naming
the message type) instead of gRPC's INTERNAL "Exception deserializing request!".
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import grpc

from ditplan.planner.service.errors import Cancelled, DeadlineExceeded, InvalidArgument

HEALTH_PREFIX = "/grpc.health.v1.Health/"
PLANNER_PREFIX = "/ditplan.v1.Planner/"
PLAN_STREAM = PLANNER_PREFIX + "StreamPlans"
REPORT_STREAM = PLANNER_PREFIX + "ReportProgress"


@dataclass(frozen=True)
class Limits:
    max_workers: int = 64
    health_reserve: int = 4  # threads only health checks may use
    unary_reserve: int = 8  # threads streams may not use (left to unary calls)
    max_plan_streams: int = 16
    max_report_streams: int = 32
    max_other_streams: int = 4  # server reflection
    handshake_s: float = 5.0  # a stream's first message within this
    stream_idle_s: float = 30.0  # a client stream's next message within this

    @property
    def call_budget(self) -> int:
        return self.max_workers - self.health_reserve

    @property
    def stream_budget(self) -> int:
        return self.max_workers - self.health_reserve - self.unary_reserve

    def validate(self) -> None:
        for name in ("health_reserve", "unary_reserve", "max_plan_streams", "max_report_streams",
                     "max_other_streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("handshake_s", "stream_idle_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name[:-2].replace('_', '-')} must be > 0 s, got {getattr(self, name)}")
        if self.stream_budget < 1:
            raise ValueError(f"--max-workers {self.max_workers} leaves no thread for streams: it must exceed "
                             f"--health-reserve {self.health_reserve} + --unary-reserve {self.unary_reserve}")


class _Kind:
    def __init__(self, name: str, limit: int, option: str, stream: bool) -> None:
        self.name, self.limit, self.option, self.stream = name, limit, option, stream
        self.active = 0
        self.refused = 0


class Limiter:
    """Counters of calls in flight per kind, with the shared budgets; thread-safe."""

    def __init__(self, limits: Limits) -> None:
        limits.validate()
        self.limits = limits
        self._lock = threading.Lock()
        self.kinds = {
            "plan": _Kind("StreamPlans streams", limits.max_plan_streams, "--max-plan-streams", True),
            "report": _Kind("ReportProgress streams", limits.max_report_streams, "--max-report-streams", True),
            "other": _Kind("other streams (reflection)", limits.max_other_streams, "--max-other-streams", True),
            "unary": _Kind("unary calls", limits.call_budget, "--max-workers - --health-reserve", False),
        }
        self.calls = 0  # every counted call
        self.streams = 0

    def acquire(self, kind: str) -> str | None:
        """Take a slot of ``kind``; None on success, else why not (naming the limit)."""
        k, lim = self.kinds[kind], self.limits
        with self._lock:
            why = None
            if k.active >= k.limit:
                why = f"{k.active} {k.name} open, limit {k.limit} ({k.option})"
            elif k.stream and self.streams >= lim.stream_budget:
                why = (f"{self.streams} streams open, limit {lim.stream_budget} (--max-workers {lim.max_workers} "
                       f"- --health-reserve {lim.health_reserve} - --unary-reserve {lim.unary_reserve})")
            elif self.calls >= lim.call_budget:
                why = (f"{self.calls} calls in flight, limit {lim.call_budget} (--max-workers {lim.max_workers} "
                       f"- --health-reserve {lim.health_reserve})")
            if why is not None:
                k.refused += 1
                return f"server busy: {why}; retry later"
            k.active += 1
            self.calls += 1
            if k.stream:
                self.streams += 1
            return None

    def release(self, kind: str) -> None:
        k = self.kinds[kind]
        with self._lock:
            k.active -= 1
            self.calls -= 1
            if k.stream:
                self.streams -= 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"calls": self.calls, "streams": self.streams,
                    **{name: {"active": k.active, "refused": k.refused} for name, k in self.kinds.items()}}


# --- request decoding --------------------------------------------------------------------------------

class _Undecodable:
    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _decoding(deserializer, method: str):
    """``deserializer`` returning an :class:`_Undecodable` instead of raising on bytes that do not parse."""
    if deserializer is None:
        return None
    name = getattr(getattr(deserializer, "__self__", None), "__name__", None) or method.rsplit("/", 1)[-1]

    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends
            return _Undecodable(f"request message is not a valid {name} ({len(data)} bytes): {exc}")

    return decode


def _checked(msg, n: int):
    if isinstance(msg, _Undecodable):
        raise InvalidArgument(f"message {n}: {msg.error}")
    return msg


# --- stream reading with deadlines -------------------------------------------------------------------

class TimedRequests:
    """A request iterator read by a helper thread, so the worker can give up on a silent client.

    ``__next__`` raises :class:`DeadlineExceeded` when the first message takes over ``handshake_s``
    or a later one over ``idle_s``, :class:`InvalidArgument` on a message that does not parse,
    :class:`Cancelled` when the client went away. The helper is not a pool thread; it ends with the call."""

    _END = object()

    def __init__(self, it, handshake_s: float, idle_s: float, what: str) -> None:
        self._it, self._handshake_s, self._idle_s, self._what = it, handshake_s, idle_s, what
        self._q: queue.Queue = queue.Queue(maxsize=16)
        self._done = threading.Event()
        self.n = 0
        threading.Thread(target=self._run, name="ditplan-stream-reader", daemon=True).start()

    def _put(self, item) -> bool:
        while not self._done.is_set():
            try:
                self._q.put(item, timeout=0.25)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for msg in self._it:
                if not self._put(msg):
                    return
            item = self._END
        except BaseException as exc:  # noqa: BLE001 - handed to the worker
            item = exc
        self._put(item)

    def close(self) -> None:
        self._done.set()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done.is_set():
            raise StopIteration
        timeout = self._handshake_s if self.n == 0 else self._idle_s
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            self.close()
            if self.n == 0:
                raise DeadlineExceeded(f"{self._what}: no message within {timeout:g} s of opening the stream "
                                       "(--handshake-timeout)") from None
            raise DeadlineExceeded(f"{self._what}: no message for {timeout:g} s after message {self.n} "
                                   "(--stream-idle-timeout)") from None
        if item is self._END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            if isinstance(item, grpc.RpcError):
                raise Cancelled(f"{self._what}: the client went away") from None
            raise item
        self.n += 1
        return _checked(item, self.n - 1)


def _first(requests, context, method: str):
    """The one request message of a unary-request method (None when the call is over)."""
    try:
        msg = next(iter(requests))
    except StopIteration:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} requires exactly one request message, got none")
    except (DeadlineExceeded, InvalidArgument) as exc:
        context.abort(exc.code, exc.message)
    except (Cancelled, grpc.RpcError):
        return None
    if isinstance(msg, _Undecodable):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg.error)
    return msg


# --- the interceptor ---------------------------------------------------------------------------------

def _kind(method: str, handler: grpc.RpcMethodHandler) -> str:
    if method == PLAN_STREAM:
        return "plan"
    if method == REPORT_STREAM:
        return "report"
    if method.startswith(PLANNER_PREFIX):
        return "unary"  # by the method, not the handler (the auth interceptor's refusals are streaming forms)
    if handler.request_streaming or handler.response_streaming:
        return "other"
    return "unary"


def _refuse(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with RESOURCE_EXHAUSTED without reading its request."""
    def deny(requests, context):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def deny_stream(requests, context):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        yield  # pragma: no cover

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(deny, response_serializer=handler.response_serializer)


class LimitsInterceptor(grpc.ServerInterceptor):
    """Budgets, stream deadlines and INVALID_ARGUMENT for undecodable requests (see the module doc).

    Put it first (outermost): it must see every handler the others return."""

    def __init__(self, limits: Limits) -> None:
        self.limiter = Limiter(limits)
        self.limits = limits

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler  # health: never counted, never refused (Watch is non-blocking: holds no thread)
        kind = _kind(method, handler)
        why = self.limiter.acquire(kind)
        if why is not None:
            return _refuse(handler, why)
        return self._wrap(handler, kind, method)

    def _wrap(self, handler: grpc.RpcMethodHandler, kind: str, method: str) -> grpc.RpcMethodHandler:
        lim, limiter = self.limits, self.limiter
        released = []
        lock = threading.Lock()

        def release() -> None:
            with lock:
                if released:
                    return
                released.append(True)
            limiter.release(kind)

        decode = _decoding(handler.request_deserializer, method) if method.startswith(PLANNER_PREFIX) else \
            handler.request_deserializer
        short = method.rsplit("/", 1)[-1]
        timed = kind in ("plan", "report", "other")
        ser = handler.response_serializer

        def requests_of(it, context):
            context.add_callback(release)  # however the call ends (the finally below covers the rest)
            if timed:
                return TimedRequests(it, lim.handshake_s, lim.stream_idle_s, short)
            return it

        if not handler.request_streaming and not handler.response_streaming:
            inner = handler.unary_unary

            def unary_unary(it, context):
                try:
                    req = _first(requests_of(it, context), context, short)
                    return None if req is None else inner(req, context)
                finally:
                    release()
            return grpc.stream_unary_rpc_method_handler(unary_unary, request_deserializer=decode,
                                                        response_serializer=ser)
        if not handler.request_streaming:
            inner_s = handler.unary_stream

            def unary_stream(it, context):
                try:
                    requests = requests_of(it, context)
                    req = _first(requests, context, short)
                    if isinstance(requests, TimedRequests):
                        requests.close()  # the handshake is done; the rest of the call is the response stream
                    if req is not None:
                        yield from inner_s(req, context)
                finally:
                    release()
            return grpc.stream_stream_rpc_method_handler(unary_stream, request_deserializer=decode,
                                                         response_serializer=ser)
        if not handler.response_streaming:
            inner_su = handler.stream_unary

            def stream_unary(it, context):
                requests = requests_of(it, context)
                try:
                    return inner_su(requests, context)
                finally:
                    if isinstance(requests, TimedRequests):
                        requests.close()
                    release()
            return grpc.stream_unary_rpc_method_handler(stream_unary, request_deserializer=decode,
                                                        response_serializer=ser)
        inner_ss = handler.stream_stream

        def stream_stream(it, context):
            requests = requests_of(it, context)
            try:
                yield from inner_ss(requests, context)
            finally:
                if isinstance(requests, TimedRequests):
                    requests.close()
                release()
        return grpc.stream_stream_rpc_method_handler(stream_stream, request_deserializer=decode,
                                                     response_serializer=ser)
