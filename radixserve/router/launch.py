"""`radixserve serve --dp N`: N replica processes on one host behind a router on the serve port.

Each replica is `radixserve serve` on 127.0.0.1 and a free port, on its own GPU
(`CUDA_VISIBLE_DEVICES` set to one device) or, on the CPU, as its own process with
an even share of the cores (`OMP_NUM_THREADS`, unless set). The API key reaches
them through `$RADIXSERVE_API_KEY`, never a command line. The router starts once
every replica has printed its address and answers its health check.

A replica process that exits is reported (its status, on the log) and taken out
of the router; it is started again, up to `MAX_RESTARTS` times per replica, and
joins the router once healthy. SIGTERM or SIGINT drains the router, then stops
every replica (SIGTERM: they drain too; SIGKILL after the drain timeout).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from radixserve.router.app import BackgroundRouter
from radixserve.router.state import RouterConfig

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3
API_KEY_ENV = "RADIXSERVE_API_KEY"
_READY = re.compile(r"radixserve: serving (\S+) at (http://\S+)")
_POLL_S = 0.2


@dataclass
class ReplicaProcess:
    index: int
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    url: str | None = None
    model_name: str | None = None
    restarts: int = 0
    ready: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self.url = None
        self.ready.clear()
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True)
        threading.Thread(target=self._read, args=(self.proc,), name=f"replica-{self.index}-log", daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None, "started with stdout=PIPE"
        for line in proc.stdout:
            match = _READY.search(line)
            if match and proc is self.proc and not self.ready.is_set():
                self.model_name, self.url = match.group(1), match.group(2)
                self.ready.set()
            sys.stderr.write(f"[replica {self.index}] {line}")
            sys.stderr.flush()

    def stop(self, timeout: float) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("replica %d (pid %d) did not stop in %g s: killing it", self.index, proc.pid, timeout)
            proc.kill()
            proc.wait()


def replica_env(index: int, n: int, devices: Sequence[str] | None, api_key: str | None) -> dict[str, str]:
    """The environment of replica `index` of `n`: its GPU, or its share of the CPU cores."""
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    if api_key is not None:
        env[API_KEY_ENV] = api_key
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices[index]
    elif "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // n))
    return env


class ReplicaFleet:
    """The replica processes of `serve --dp`, started, watched and stopped together."""

    def __init__(self, argv: Sequence[str], n: int, devices: Sequence[str] | None, api_key: str | None,
                 drain_timeout: float) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"dp must be an integer >= 1, got {n!r}")
        if devices is not None and len(devices) < n:
            raise ValueError(f"dp: {n} replicas need {n} GPU groups (one GPU each, or tensor_parallel_size GPUs "
                             f"each), this host has {len(devices)}")
        self.replicas = [ReplicaProcess(i, list(argv), replica_env(i, n, devices, api_key)) for i in range(n)]
        self.drain_timeout = drain_timeout

    def start(self, stop: threading.Event) -> bool:
        """Start every replica and wait until each has printed its address; False if one exited first
        or `stop` was set."""
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            while not r.ready.wait(_POLL_S):
                if stop.is_set():
                    return False
                if r.proc is not None and r.proc.poll() is not None:
                    logger.error("replica %d exited with status %s before serving", r.index, r.proc.returncode)
                    return False
        return True

    def watch(self, router: BackgroundRouter, stop: threading.Event) -> None:
        """Until `stop`: a replica that exits leaves the router and starts again (up to MAX_RESTARTS)."""
        restarting: list[ReplicaProcess] = []
        while not stop.wait(_POLL_S):
            for r in self.replicas:
                if r.proc is None or r.proc.poll() is None or r in restarting:
                    continue
                logger.error("replica %d (pid %d, %s) exited with status %s", r.index, r.proc.pid, r.url,
                             r.proc.returncode)
                if r.url is not None:
                    router.call(functools.partial(_remove, router, r.url))
                if r.restarts >= MAX_RESTARTS:
                    logger.error("replica %d exited %d times: left out", r.index, r.restarts + 1)
                    r.proc = None
                    continue
                r.restarts += 1
                r.start()
                restarting.append(r)
            for r in list(restarting):
                if r.ready.is_set() and r.url is not None:
                    logger.warning("replica %d restarted at %s (pid %s)", r.index, r.url, r.proc.pid if r.proc else "-")
                    router.call(functools.partial(_add, router, r.url))
                    restarting.remove(r)

    def stop(self) -> None:
        threads = [threading.Thread(target=r.stop, args=(self.drain_timeout + 5.0,)) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas if r.url is not None]


def _remove(router: BackgroundRouter, url: str) -> None:
    try:
        router.state.remove(url)
    except KeyError:
        pass


def _add(router: BackgroundRouter, url: str) -> None:
    try:
        router.state.add(url)
    except ValueError:
        return
    router.state.wake.set()  # checked at once: it joins the rotation when healthy


def run_fleet(
    fleet: ReplicaFleet, config: RouterConfig, on_ready: Callable[[str, ReplicaFleet], None] | None = None
) -> int:
    """Start the replicas and the router; serve until SIGTERM/SIGINT; stop everything. Returns the status:
    0, or 1 when the replicas could not start."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if not fleet.start(stop):
            return 0 if stop.is_set() else 1
        router = BackgroundRouter(dataclasses.replace(config, replicas=tuple(fleet.urls)))
        with router:
            deadline = time.monotonic() + 60.0
            while len(router.state.replicas.healthy()) < len(fleet.urls) and time.monotonic() < deadline:
                time.sleep(_POLL_S)  # their first health checks, read without the loop: a snapshot
            if on_ready is not None:
                on_ready(router.url, fleet)
            fleet.watch(router, stop)
        return 0
    finally:
        fleet.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
