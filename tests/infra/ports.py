"""Free loopback ports, waiting for things to come up, and ending the processes started."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 0.1) -> object:
    """Call ``check`` until it returns something truthy without raising; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except Exception as e:  # the thing is not up yet
            last = e
        else:
            if result:
                return result
        time.sleep(every)
    raise TimeoutError(f"{what} not ready after {timeout} s (last error: {last!r})")


def ended(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Wait for ``process`` (already asked to stop) to end; kill it after ``timeout`` seconds."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
