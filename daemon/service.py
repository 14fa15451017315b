"""``dmuserd serve`` as a long-running service: run until a signal, stop in order."""

from __future__ import annotations

import signal

import structlog
import trio

from dmuserd.daemon.config import DaemonSpec
from dmuserd.daemon.runtime import Daemon

log = structlog.get_logger("dmuserd.daemon")


async def run_until_signal(spec: DaemonSpec, control_socket: str | None) -> None:
    """Run until SIGINT/SIGTERM, then stop in order."""
    daemon = Daemon(spec, control_socket=control_socket)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            async for signum in signals:
                log.info("signal received, stopping", signal=signal.Signals(signum).name)
                await daemon.stop()
                break
