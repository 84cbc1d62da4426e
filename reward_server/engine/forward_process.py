"""A model's forward in its own process (``forward_process``): the model-worker process of
Triton's Python backend and TorchServe, for CPU serving.

Why: in one process the forward thread's Python (module calls and op dispatch between a small
model's kernels) and the request path (gRPC, asyncio, tokenisation) take turns on one interpreter
lock, so neither runs at the speed it would alone (docs/BENCHMARKS.md, "Token-in scoring and
per-request cost"). Here the engine's forward stream sends the batch (the runner's picklable
items) through a pipe to a worker process holding the model and blocks on the answer without the
lock; the worker's Python has an interpreter of its own.

Memory: the model is loaded once. The main process loads the runner as usual (it keeps the
tokenizer, the heads and the metadata; only the forward runs elsewhere), moves its weights into shared memory (`torch.nn.Module.share_memory`) and sends the runner to each worker
through the pipe; torch's reductions for `multiprocessing` pass the shared weights as file
descriptors, so the workers map the same pages (https://pytorch.org/docs/stable/notes/multiprocessing.html).
Each worker costs its own interpreter, torch and activations, not a model (gpt2-small: 311 MB of
private memory per worker; docs/BENCHMARKS.md). Workers are spawned, not forked (the server has
threads), so a program that embeds the engine needs the usual ``if __name__ == "__main__"``.

A worker that dies (killed, crashed) fails the batch it was running with UNAVAILABLE and is
started again for the next batch; the server keeps serving. Workers exit with the server: they
are daemonic (stopped at a clean exit), stop at end of file on their pipe, and watch their
parent's pid (so a server killed with SIGKILL leaves no orphan behind).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from reward_server.errors import Unavailable

log = logging.getLogger(__name__)

NOT_SHIPPED = ("_fast_encode", "on_sharing")
"""Runner attributes the worker does not get: the main process's tokenisation closure (not
picklable, and the worker does not tokenise) and the main process's metrics callback (the worker
collects what it would have reported and returns it with the results)."""
START_TIMEOUT_S = 120.0
"""Longest a worker may take to start and take over the runner."""
GroupsCallback = Callable[[str, int, list[int]], None]


def _watch_parent(parent: int) -> None:
    """Exit when the parent is gone (reparented: the server was killed without cleaning up)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _worker_main(conn: Any, parent: int) -> None:
    """A worker: take the runner, then answer forwards until end of file or ``None``."""
    # the server decides when its workers stop: a Ctrl-C or SIGHUP sent to the whole process
    # group (a terminal) is the server's to handle
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="watch").start()
    import torch

    from reward_server.models.prefix import tokens_saved
    from reward_server.models.runner import one_at_a_time

    cls, state, threads, alone = conn.recv()
    if threads:
        torch.set_num_threads(threads)
    runner = object.__new__(cls)
    runner.__dict__.update(state)
    sharing: list[tuple[str, int, list[int]]] = []

    def report(model: str, groups: Sequence[Any]) -> None:
        sharing.append((model, tokens_saved(groups), [len(g.members) for g in groups]))

    runner.on_sharing = report  # read by runners that share prefixes; others ignore it
    forward = one_at_a_time(runner.forward) if alone else runner.forward
    conn.send(("ready", os.getpid()))
    current = torch.get_num_threads()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        batch, want = msg
        if want and want != current:  # elastic threads (ForwardProcess.forward)
            torch.set_num_threads(want)
            current = want
        sharing.clear()
        try:
            out = forward(batch)
            reply: tuple = ("ok", out, list(sharing), current)
        except Exception as exc:  # noqa: BLE001 - the main process fails the batch with it
            reply = ("error", exc, None, current)
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), None, current))


class _Worker:
    """One worker process and the main process's end of its pipe."""

    def __init__(self, ctx: Any, payload: tuple, name: str) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main, args=(child, os.getpid()), daemon=True, name=name
        )
        self.proc.start()
        child.close()
        self.conn.send(payload)
        try:
            if not self.conn.poll(START_TIMEOUT_S):
                raise RuntimeError(f"did not start in {START_TIMEOUT_S:.0f}s")
            _, self.pid = self.conn.recv()
        except (EOFError, OSError, RuntimeError) as exc:
            self.close()
            why = "exited" if isinstance(exc, (EOFError, OSError)) else str(exc)
            raise RuntimeError(
                f"forward process {name} {why} (exit code {self.proc.exitcode}) while taking "
                "over the model; its error is in the server's log above"
            ) from exc

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to stop; kill it if it does not."""
        with contextlib.suppress(OSError, ValueError):  # gone already
            self.conn.send(None)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout)
        self.conn.close()


class ForwardProcess:
    """Runs `runner.forward` in `streams` worker processes (one per forward stream); anything
    else is the runner's, in this process. `forward` blocks the calling thread (a forward
    stream) without the interpreter lock until a worker answers."""

    def __init__(
        self,
        runner: Any,
        streams: int = 1,
        threads: int = 0,
        on_groups: GroupsCallback | None = None,
        batch_invariant: bool = False,
        max_threads: int = 0,
    ) -> None:
        import torch
        import torch.multiprocessing  # noqa: F401 - registers tensor sharing with the pickler

        self.runner = runner
        self.name = getattr(runner, "name", "model")
        self.on_groups = on_groups
        model = getattr(runner, "model", None)
        if model is None:
            raise ValueError(
                f"forward_process: model {self.name!r} has no torch model (backend "
                f"{getattr(runner, 'backend', '?')!r}); it runs the torch backend only"
            )
        model.share_memory()  # the workers map these pages: one copy of the weights
        state = {k: v for k, v in runner.__dict__.items() if k not in NOT_SHIPPED}
        threads = threads or torch.get_num_threads()
        # elastic threads: a forward that starts while the other workers are idle takes up to
        # `max_threads` (a lone request gets the cores one thread per worker would leave idle);
        # under load each worker keeps `threads`. Not in batch-invariant mode (a forward's float
        # sums are split across its threads: their number must stay fixed).
        self.threads = threads
        self.max_threads = 0 if batch_invariant else max(max_threads, threads)
        self.last_threads = threads  # intra-op threads of the last forward answered
        # batch-invariant: the worker runs the items one at a time (`one_at_a_time`), so a batch
        # still crosses the pipe once
        self._payload = (type(runner), state, threads, batch_invariant)
        self._ctx = mp.get_context("spawn")
        self._idle: queue.SimpleQueue[int] = queue.SimpleQueue()  # free worker slots
        self._workers: list[_Worker | None] = []
        self._closed = False
        self.restarts = 0
        try:
            for i in range(max(1, streams)):
                self._workers.append(self._spawn(i))
                self._idle.put_nowait(i)
        except BaseException:
            self.close()
            raise

    def _spawn(self, slot: int) -> _Worker:
        t0 = time.monotonic()
        w = _Worker(self._ctx, self._payload, f"forward-{self.name}-{slot}")
        log.info(
            "model %r: forward process %d (pid %d) started in %.1fs",
            self.name,
            slot,
            w.pid,
            time.monotonic() - t0,
        )
        return w

    @property
    def pids(self) -> list[int]:
        """The worker processes' pids (of the live ones)."""
        return [w.pid for w in self._workers if w is not None]

    def forward(self, batch: Sequence[Any]) -> list[Any]:
        """The runner's forward of `batch`, run by a free worker. UNAVAILABLE when the worker
        died while running it (it is started again meanwhile, for the next batch)."""
        slot = self._idle.get()
        w = self._workers[slot]
        if w is None or self._closed:  # stopped, or the restart after a crash failed
            try:
                if self._closed:
                    raise Unavailable(f"model {self.name!r}: its forward process is stopped")
                w = self._workers[slot] = self._spawn(slot)
            except BaseException:
                self._idle.put_nowait(slot)
                raise
        try:
            w.conn.send((list(batch), self._threads_for_next()))
            reply = w.conn.recv()
        except (EOFError, OSError) as exc:
            code = _exitcode(w)
            self._workers[slot] = None
            w.conn.close()
            log.error(
                "model %r: forward process (pid %d) exited (%s) during a batch of %d items; "
                "starting it again",
                self.name,
                w.pid,
                code,
                len(batch),
            )
            threading.Thread(
                target=self._restart, args=(slot,), daemon=True, name=f"restart-{self.name}"
            ).start()
            raise Unavailable(
                f"model {self.name!r}: the forward process (pid {w.pid}) exited ({code}) while "
                "scoring this batch; it is being restarted, retry the request"
            ) from exc
        self._idle.put_nowait(slot)
        status, out, sharing, self.last_threads = reply
        if status == "error":
            raise out
        if sharing and self.on_groups is not None:
            for model, saved, sizes in sharing:
                self.on_groups(model, saved, sizes)
        return out

    def _threads_for_next(self) -> int:
        """Intra-op threads for the forward about to start: the cores left to it by the workers
        running now (`max_threads` shared among them), at least `threads`; 0 = unchanged."""
        if self.max_threads <= self.threads:
            return 0
        running = len(self._workers) - self._idle.qsize()  # this forward's slot included
        return max(self.threads, self.max_threads // max(1, running))

    def _restart(self, slot: int) -> None:
        """Start a crashed worker's replacement, then free its slot (a failed start leaves the
        slot empty: the next forward on it tries again)."""
        try:
            if not self._closed:
                self._workers[slot] = self._spawn(slot)
                self.restarts += 1
        except Exception:  # noqa: BLE001 - logged; the next forward retries
            log.exception("model %r: forward process %d did not restart", self.name, slot)
        finally:
            self._idle.put_nowait(slot)

    def __getattr__(self, attr: str) -> Any:
        """Everything but the forward is the runner's (warm-up items, calibration)."""
        runner = self.__dict__.get("runner")
        if runner is None:
            raise AttributeError(attr)
        return getattr(runner, attr)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker: each once its running forward (if any) has ended, within
        `timeout` seconds; a worker still busy then is killed. Forwards called after this
        answer UNAVAILABLE. Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        end = time.monotonic() + timeout
        taken = 0
        for _ in self._workers:  # wait for the running forwards to hand their slots back
            try:
                self._idle.get(timeout=max(0.0, end - time.monotonic()))
                taken += 1
            except queue.Empty:
                break
        for i, w in enumerate(self._workers):
            if w is not None:
                w.close()
                self._workers[i] = None
        for i in range(taken):  # wake any forward still waiting for a slot: it sees _closed
            self._idle.put_nowait(i)


def _exitcode(w: _Worker) -> str:
    w.proc.join(1.0)
    code = w.proc.exitcode
    if code is None:
        return "still running"
    return f"signal {-code}" if code < 0 else f"exit code {code}"
