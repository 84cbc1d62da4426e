"""Score requests multiplexed over one long-lived ScoreStream per server (the asyncio client's
``score_stream=True``).

A unary call costs gRPC Python a call object, its metadata and completion-queue events on both
sides; one stream carries any number of requests for the cost of a message each. Measured on this
project's 2-core CPU with single-item requests (32 clients, the tiny model): the server's CPU per
request 6.2-7.4 ms over Score, 4.5-5.8 ms over ScoreStream, throughput 1.23x (docs/BENCHMARKS.md,
"Token-in scoring and per-request cost"). That is the traffic of veRL and OpenRLHF, which score
each sample on its own as its rollout finishes.

The server answers a stream's requests in order (docs/API.md, ScoreStream), so the responses are
matched to the waiting callers first in, first out. A request the server refuses comes back in
the stream with its status and becomes the same `Failure` a unary call would have given, so the
client's retries, splitting and per-item fallback work unchanged; a broken stream fails every
waiting call with the stream's status (UNAVAILABLE when the server went away) and the next call
opens a new stream.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import grpc

from reward_server.api.rlhf.v1 import reward_service_pb2 as pb
from reward_server.client.retry import Failure

_CODES = {c.value[0]: c for c in grpc.StatusCode}


def response_outcome(resp: pb.ScoreResponse) -> pb.ScoreResponse | Failure:
    """A stream's response, or the `Failure` its `status` stands for."""
    if not resp.HasField("status"):
        return resp
    code = _CODES.get(resp.status.code, grpc.StatusCode.UNKNOWN)
    return Failure(code, resp.status.message)


class ScoreStreamMux:
    """Concurrent Score requests over one ScoreStream; create and use it in one event loop."""

    def __init__(self, open_stream: Any, metadata: Any) -> None:
        """`open_stream` is the channel's ScoreStream multicallable (a stub's ``ScoreStream``)."""
        self._open = open_stream
        self._metadata = metadata
        self._call: Any = None
        self._reader: asyncio.Task | None = None
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._write_lock = asyncio.Lock()

    async def score(self, request: pb.ScoreRequest, timeout: float) -> pb.ScoreResponse | Failure:
        """Send `request` on the stream (opened on first use, reopened after a failure) and wait
        up to `timeout` seconds for its response. A request that times out is still answered by
        the server (its answer is dropped here): a stream cannot cancel one of its requests."""
        fut = asyncio.get_running_loop().create_future()
        async with self._write_lock:  # one writer at a time; order of writes = order of futures
            if self._call is None:
                self._call = self._open(metadata=self._metadata)
                self._reader = asyncio.ensure_future(self._read(self._call, self._waiting))
            self._waiting.append(fut)
            call = self._call
            try:
                await call.write(request)
            except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as err:
                # the transport broke under us (a refused request is answered in the stream, not
                # here): this call fails as the others waiting on the stream, UNAVAILABLE, so
                # the client retries it (on another replica when it has one). The reader may
                # have seen the break first (it then failed `fut` already and dropped `call`).
                self._broken(
                    call,
                    Failure(grpc.StatusCode.UNAVAILABLE, f"the stream to the server broke: {err}"),
                )
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            fut.cancel()  # keeps its place in the queue; its response is dropped on arrival
            return Failure(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer in {timeout:.3g}s")

    async def _read(self, call: Any, waiting: collections.deque[asyncio.Future]) -> None:
        try:
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    self._broken(call, Failure(grpc.StatusCode.UNAVAILABLE, "stream ended"))
                    return
                fut = waiting.popleft()
                if not fut.done():
                    fut.set_result(response_outcome(raw))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of the stream fails its waiters
            self._broken(call, _failure_of(err))

    def _broken(self, call: Any, failure: Failure) -> None:
        """Fail every call waiting on `call` and forget it (the next call opens a new one)."""
        if call is not None and self._call is call:
            self._call = None
            waiting, self._waiting = self._waiting, collections.deque()
        else:
            return
        for f in waiting:
            if not f.done():
                f.set_result(failure)
        call.cancel()

    async def close(self) -> None:
        """Cancel the stream; calls still waiting get CANCELLED."""
        call, self._call = self._call, None
        for f in self._waiting:
            if not f.done():
                f.set_result(Failure(grpc.StatusCode.CANCELLED, "the client was closed"))
        self._waiting.clear()
        if call is not None:
            call.cancel()
        if self._reader is not None:
            self._reader.cancel()


def _failure_of(err: BaseException) -> Failure:
    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        return Failure(err.code(), err.details() or "")
    return Failure(grpc.StatusCode.UNAVAILABLE, f"stream failed: {err!r}")
