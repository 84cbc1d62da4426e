"""`AsyncRewardClient`: the asyncio face of the client core (runs its steps with grpc.aio)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from reward_server.api.rlhf.v1 import reward_service_pb2_grpc as pb_grpc
from reward_server.client import core
from reward_server.client.stream_mux import ScoreStreamMux


class AsyncRewardClient(core.ClientBase):
    """asyncio client: the methods of `RewardClient`, as coroutines. Create it inside the event
    loop that uses it."""

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel; calls in flight give up at their next retry."""
        self._closed = True
        self._closing.set()
        for m in self._muxes.values():
            await m.close()
        for c in self._channels:
            await c.close()

    # ------------------------------------------------------------------ executing the steps
    async def _run(self, steps: core.Steps[Any]) -> Any:
        try:
            op = next(steps)
            while True:
                op = steps.send(await self._execute(op))
        except StopIteration as stop:
            return stop.value

    async def _execute(self, op: core.Op) -> Any:
        if isinstance(op, core.Unary):
            if len(op.requests) == 1:
                return [await self._one(op.method, op.requests[0], op.targets[0], op.timeout)]
            parts = zip(op.requests, op.targets, strict=True)
            return await asyncio.gather(*(self._one(op.method, r, t, op.timeout) for r, t in parts))
        if isinstance(op, core.Check):
            return await self._check(op)
        assert isinstance(op, core.Sleep)
        await asyncio.sleep(op.seconds)
        return None

    async def _one(self, method: str, request: Any, target: int, timeout: float) -> Any:
        if self._score_stream and method == "Score":
            if self._closed:
                return core.CLOSED
            return await self._mux(target).score(request, timeout)
        try:
            return await self._rpcs[target][method](
                request, timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            return core.failure(err)
        except (ValueError, grpc.aio.UsageError):  # the channel was closed
            return core.CLOSED

    def _mux(self, target: int) -> ScoreStreamMux:
        """The ScoreStream multiplexer of channel `target` (made on first use, in this loop)."""
        mux = self._muxes.get(target)
        if mux is None:
            stub = pb_grpc.RewardServiceStub(self._channels[target])
            mux = self._muxes[target] = ScoreStreamMux(stub.ScoreStream, self._metadata)
        return mux

    async def _check(self, op: core.Check) -> str:
        try:
            resp = await self._health[op.index](
                core.health_request(op.service), timeout=op.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            return err.code().name
        except (ValueError, grpc.aio.UsageError):
            return core.CLOSED.code.name
        return core.status_name(resp)


# The public methods (score, score_messages, score_ids, reference_logprobs, server_info, stats, health,
# wait_until_ready), derived from the core's one definition of each.
for _name, _method in core.face_methods(blocking=False).items():
    setattr(AsyncRewardClient, _name, _method)
