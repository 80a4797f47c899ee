"""Server-side evaluation (``[eval]``): global versions scored on held-out text by a child process.

The coordinator's worker only hands versions over: it offers each new version, and when the
child is idle it writes the newest one waiting as a snapshot frame (``compression``'s format)
into ``<state_dir>/eval/`` and asks the child (``python -m edge_agent.scorer``, which holds the
base model and the text) to score it. Older versions waiting are skipped, so scoring never
queues up behind a fast fleet. Scores go into the ``evals`` table and from there to
``status``, ``history``, ``watch`` (through the retained coordinator status) and ``/metrics``.

The child failing never stops aggregation: a crash is logged with the end of its stderr, the
version it was scoring is skipped, and a new child starts when the next version waits, after a
growing delay (30 s to 10 min; a score resets it); a setup error (the model or the data
directory: exit codes 2 to 4) is reported in the status and not retried until the coordinator
restarts.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from compression import FrameKind, compress_dense
from compression.exitcodes import ExitCode
from compression.protocol import TrainableSpec
from coordinator.config import CoordinatorConfig

log = logging.getLogger(__name__)

RESTART_MIN_S, RESTART_MAX_S = 30.0, 600.0
SETUP_ERRORS = (ExitCode.CONFIG, ExitCode.MODEL, ExitCode.DATA)
MAX_REPLY_BYTES = 4096


class ServerEval:
    """The scorer child and the versions waiting for it; every method runs on the worker thread."""

    def __init__(self, cfg: CoordinatorConfig, store: Any, spec: TrainableSpec, metrics: Any) -> None:
        self.cfg = cfg
        self.store = store
        self.spec = spec
        self.metrics = metrics
        self.dir = Path(cfg.state_dir) / "eval"
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("v*.frame*"):  # frames of a previous run: nothing is waiting for them
            stale.unlink(missing_ok=True)
        self.last: dict[str, Any] | None = store.last_eval()
        self.error: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        self._waiting: tuple[int, dict[str, np.ndarray]] | None = None
        self._in_flight: int | None = None
        self._start_at = 0.0
        self._delay = RESTART_MIN_S
        if self.last is not None:
            self._export(self.last)

    # -- what the service calls ------------------------------------------------------------

    def offer(self, version: int, state: dict[str, np.ndarray], force: bool = False) -> None:
        """A new version: scored if it is an ``every``-th one (the newest such one waits), or
        ``force`` (the version the coordinator starts at) unless it has a score already."""
        if force and self.last is not None and self.last["version"] == version:
            return
        if force or version % self.cfg.eval.every == 0:
            self._waiting = (version, state)

    def poll(self, now: float | None = None) -> None:
        """Take the child's scores, notice it ended, and hand it the next version when idle."""
        now = time.monotonic() if now is None else now
        while True:
            try:
                line = self._replies.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._ended(now)
            else:
                self._reply(line)
        if self._waiting is None or self._in_flight is not None or self.error is not None:
            return
        if self._proc is None and now >= self._start_at:
            self._start()
        if self._proc is not None:
            self._send(*self._waiting)
            self._waiting = None

    def status(self) -> dict[str, object]:
        """For the retained coordinator status: the last score, or why there is none."""
        out: dict[str, object] = {}
        if self.last is not None:
            out["server_eval"] = {k: self.last[k] for k in ("version", "loss", "blocks")}
        if self.error is not None:
            out["server_eval_error"] = self.error[:300]
        return out

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # the child ends at the end of its input
            proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(5)

    # -- the child -------------------------------------------------------------------------

    def _argv(self) -> list[str]:
        e = self.cfg.eval
        return [
            sys.executable, "-m", "edge_agent.scorer", "--source", self.cfg.model.source, "--data-dir", e.data_dir,
            "--spec", json.dumps(self.spec.to_dict()), "--seq-len", str(e.seq_len), "--blocks", str(e.blocks),
            "--batch-size", str(e.batch_size), "--threads", str(e.threads), "--quantize", e.quantize,
            "--cache-root", str(self.dir / "model-cache"),
        ]  # fmt: skip

    def _start(self) -> None:
        log.info("starting the scorer for [eval] (%s)", self.cfg.eval.data_dir)
        try:
            self._proc = subprocess.Popen(
                self._argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
            )
        except OSError as exc:
            self.error = f"cannot start the scorer: {exc}"
            log.error("[eval] %s", self.error)
            return
        assert self._proc.stdout is not None and self._proc.stderr is not None
        threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True, name="eval-stdout").start()
        threading.Thread(target=self._read_stderr, args=(self._proc.stderr,), daemon=True, name="eval-stderr").start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._replies.put(line[:MAX_REPLY_BYTES])
        self._replies.put(None)  # the child ended

    def _read_stderr(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._stderr.append(line.rstrip()[:500])
            log.debug("scorer: %s", line.rstrip()[:500])

    def _send(self, version: int, state: dict[str, np.ndarray]) -> None:
        path = self.dir / f"v{version:08d}.frame"
        tmp = path.with_suffix(".frame.tmp")
        tmp.write_bytes(compress_dense(state, FrameKind.SNAPSHOT, zstd_level=1))
        os.replace(tmp, path)
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"version": version, "frame": str(path)}) + "\n")
            self._proc.stdin.flush()
        except OSError:  # it ended; its end is read from stdout next
            path.unlink(missing_ok=True)
            return
        self._in_flight = version

    def _reply(self, line: str) -> None:
        try:
            doc = json.loads(line)
            version = int(doc["version"])
        except (ValueError, KeyError, TypeError):
            log.warning("[eval] the scorer said something unexpected: %r", line[:200])
            return
        (self.dir / f"v{version:08d}.frame").unlink(missing_ok=True)
        self._in_flight = None
        if "error" in doc:
            log.warning("[eval] version %d could not be scored: %s", version, str(doc["error"])[:300])
            return
        try:
            loss, blocks, seconds = float(doc["loss"]), int(doc["blocks"]), float(doc["seconds"])
        except (ValueError, KeyError, TypeError):
            log.warning("[eval] the scorer's reply for version %d lacks a score: %r", version, line[:200])
            return
        if not np.isfinite(loss):
            log.warning("[eval] version %d scored a non-finite loss; not recorded", version)
            return
        self.store.record_eval(version, loss, blocks, seconds)
        self.last = {"version": version, "loss": loss, "blocks": blocks, "seconds": seconds}
        self._delay = RESTART_MIN_S
        self._export(self.last)
        log.info("[eval] version %d: held-out loss %.4f on %d blocks (%.1fs)", version, loss, blocks, seconds)

    def _ended(self, now: float) -> None:
        proc, self._proc = self._proc, None
        code = proc.wait() if proc is not None else None
        if self._in_flight is not None:
            (self.dir / f"v{self._in_flight:08d}.frame").unlink(missing_ok=True)
            self._in_flight = None
        tail = " | ".join(list(self._stderr)[-3:])
        if code in SETUP_ERRORS:
            self.error = f"the scorer cannot start (exit {code}): {tail}"
            log.error("[eval] %s; server-side evaluation is off until the coordinator restarts", self.error)
            return
        self._start_at = now + self._delay
        log.error("[eval] the scorer ended (exit %s): %s; starting it again in %.0fs", code, tail, self._delay)
        self._delay = min(2 * self._delay, RESTART_MAX_S)

    def _export(self, last: dict[str, Any]) -> None:
        self.metrics.server_eval_loss.set(last["loss"])
        self.metrics.server_eval_version.set(last["version"])


def open_evaluation(cfg: CoordinatorConfig, store: Any, spec: TrainableSpec, metrics: Any) -> ServerEval | None:
    return ServerEval(cfg, store, spec, metrics) if cfg.eval.enabled else None
