"""`RewardClient`: the blocking face of the client core (runs its steps with grpc)."""

from __future__ import annotations

from typing import Any

import grpc

from reward_server.client.core import (
    CLOSED,
    Check,
    ClientBase,
    Op,
    Sleep,
    Steps,
    Unary,
    face_methods,
    failure,
    health_request,
    status_name,
)


class RewardClient(ClientBase):
    """Blocking client. Thread-safe; reuse one per process. Its methods are those of
    `AsyncRewardClient`, blocking instead of ``async``."""

    _grpc = grpc

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel; calls in flight give up at their next retry."""
        self._closed = True
        self._closing.set()
        for c in self._channels:
            c.close()

    # ------------------------------------------------------------------ executing the steps
    def _run(self, steps: Steps[Any]) -> Any:
        try:
            op = next(steps)
            while True:
                op = steps.send(self._execute(op))
        except StopIteration as stop:
            return stop.value

    def _execute(self, op: Op) -> Any:
        if isinstance(op, Unary):
            return self._unary(op)
        if isinstance(op, Check):
            return self._check(op)
        assert isinstance(op, Sleep)
        self._closing.wait(op.seconds)
        return None

    def _unary(self, op: Unary) -> list[Any]:
        md = self._metadata
        if len(op.requests) == 1:  # the common path: no futures
            try:
                rpc = self._rpcs[op.targets[0]][op.method]
                return [rpc(op.requests[0], timeout=op.timeout, metadata=md)]
            except grpc.RpcError as err:
                return [failure(err)]
            except ValueError:  # "Cannot invoke RPC on closed channel!"
                return [CLOSED]
        futures: list[Any] = []
        for req, t in zip(op.requests, op.targets, strict=True):
            try:
                futures.append(
                    self._rpcs[t][op.method].future(req, timeout=op.timeout, metadata=md)
                )
            except ValueError:
                futures.append(CLOSED)
        out: list[Any] = []
        for fut in futures:
            try:
                out.append(fut if fut is CLOSED else fut.result())
            except grpc.RpcError as err:
                out.append(failure(err))
        return out

    def _check(self, op: Check) -> str:
        try:
            resp = self._health[op.index](
                health_request(op.service), timeout=op.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            return err.code().name
        except ValueError:
            return CLOSED.code.name
        return status_name(resp)


# The public methods (score, score_messages, score_ids, reference_logprobs, server_info, stats, health,
# wait_until_ready), derived from the core's one definition of each.
for _name, _method in face_methods(blocking=True).items():
    setattr(RewardClient, _name, _method)
