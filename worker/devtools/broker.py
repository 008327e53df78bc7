"""A throwaway RabbitMQ node of the test's own, started from the installed ``rabbitmq-server``.

Tests that stop, restart or break a broker use one of these, never the machine's default node
(other test runs and other people share that one). Each node has its own name, AMQP and
distribution ports, data and log folders, Erlang cookie and an empty plugin list (so no
management listener competes for 15672); it is shut down and its folder removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from worker.devtools.procs import free_port

_BIN = Path("/usr/lib/rabbitmq/bin")


class OwnBroker:
    def __init__(self) -> None:
        self.name = f"invtest-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="invoicing-rabbit-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        home = self.dir / "home"
        return {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            # Not /etc/rabbitmq/rabbitmq-env.conf: it names the default node.
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
        }

    def ctl(self, *args: str, timeout: float = 120) -> None:
        """``rabbitmqctl -n <this node> ARGS``."""
        subprocess.run(
            [str(_BIN / "rabbitmqctl"), "-q", "-n", self.name, *args],
            env=self._env(),
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    async def start(self) -> str:
        try:
            return await self._start()
        except BaseException:
            await self.shutdown()  # a node half up must not outlive the test
            raise

    async def _start(self) -> str:
        home = self.dir / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex, encoding="ascii")
        cookie.chmod(0o400)
        (self.dir / "enabled_plugins").write_text("[].\n", encoding="ascii")
        (self.dir / "rabbitmq-env.conf").write_text("", encoding="ascii")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n", encoding="ascii"
        )
        await asyncio.to_thread(
            subprocess.run,
            [str(_BIN / "rabbitmq-server"), "-detached"],
            env=self._env(),
            cwd=self.dir,
            check=True,
            capture_output=True,
            timeout=60,
        )
        # -detached returns before the node exists: wait for its pid file, then for the app.
        await asyncio.to_thread(self.ctl, "wait", str(self.dir / "pid"), "--timeout", "90")
        return self.url

    async def stop_app(self) -> None:
        await asyncio.to_thread(self.ctl, "stop_app")

    async def start_app(self) -> None:
        await asyncio.to_thread(self.ctl, "start_app")
        await asyncio.to_thread(self.ctl, "await_startup", "--timeout", "90")

    async def shutdown(self) -> None:
        try:
            await asyncio.to_thread(self.ctl, "shutdown", timeout=60)
        except subprocess.CalledProcessError:
            pass  # not running (it never started, or it is gone already)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
