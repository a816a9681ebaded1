"""A local Argilla on loopback: ``noida-db`` (Elasticsearch + Redis), the server and its worker.

Everything lives under one home folder (``ALIGN_ARGILLA_HOME``, default
``~/.cache/align/argilla``): the noida-db data, the server's SQLite database,
logs, and ``state.json`` with the ports and the PIDs of the three processes.
The data survives ``down``/``up``; ports are reused when still free.

Each process runs in its own session, so ``down`` can stop it and any
children by its process group, and only after checking that the PID still
belongs to the process we started (its start time is in the state file), so
a recycled PID is never killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from align.argilla.install import default_home, ensure_server_venv, noida_binary, venv_python
from align.data.io import atomic_path
from align.errors import AlignError

# What `database users create_default` creates; printed by `up` (a local, loopback-only stack).
DEFAULT_USERNAME = "argilla"
DEFAULT_PASSWORD = "1234"
DEFAULT_API_KEY = "argilla.apikey"

PROCESS_NAMES = ("noida-db", "server", "worker")
_STATE_FILE = "state.json"


class LocalStackError(AlignError):
    """The local Argilla could not be started or stopped; says which part and where its log is."""


@dataclass
class ProcessRef:
    pid: int
    start_time: int  # from /proc/<pid>/stat, so a recycled PID is not mistaken for ours


@dataclass
class StackState:
    home: str
    host: str
    elasticsearch_port: int
    redis_port: int
    server_port: int
    processes: dict[str, ProcessRef] = field(default_factory=dict)
    started_at: float = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server_port}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StackState":
        processes = {k: ProcessRef(**v) for k, v in data.pop("processes", {}).items()}
        return cls(**data, processes=processes)


@dataclass
class StackStatus:
    home: Path
    state: StackState | None
    alive: dict[str, bool]
    answering: bool

    @property
    def running(self) -> bool:
        return self.answering and all(self.alive.get(name) for name in PROCESS_NAMES)

    @property
    def url(self) -> str | None:
        return self.state.url if self.state else None

    def lines(self) -> list[str]:
        if self.state is None:
            return [f"no local Argilla in {self.home} (start one with `align argilla up`)"]
        head = "running" if self.running else "partly running" if any(self.alive.values()) else "stopped"
        lines = [f"local Argilla: {head}", f"  UI and API: {self.state.url}"
                 + ("" if self.answering else " (not answering)")]
        for name in PROCESS_NAMES:
            ref = self.state.processes.get(name)
            lines.append(f"  {name:<9} pid {ref.pid if ref else '-':<8} {'up' if self.alive.get(name) else 'down'}")
        lines.append(f"  data and logs: {self.home}")
        return lines


def credential_lines() -> list[str]:
    return [f"  sign in as: {DEFAULT_USERNAME} / {DEFAULT_PASSWORD}",
            f"  API key:    {DEFAULT_API_KEY}  (the default for this local stack)"]


# ----------------------------------------------------------------------------- processes


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; fields after the closing parenthesis are fixed.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _reap(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie (no-op for others' processes)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def is_alive(ref: ProcessRef) -> bool:
    _reap(ref.pid)
    return _start_time(ref.pid) == ref.start_time


def _spawn(name: str, cmd: list[str], home: Path, env: dict[str, str]) -> ProcessRef:
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as out:
        # start_new_session: the process leads its own group, so `down` can stop its children with it.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=home, start_new_session=True)
    started = None
    for _ in range(50):
        started = _start_time(proc.pid)
        if started is not None:
            break
        time.sleep(0.02)
    if started is None:
        raise LocalStackError(f"{name} exited at once; see {logs / f'{name}.log'}")
    # Forget the Popen object on purpose: the process outlives this call (and this Python process).
    proc.returncode = 0
    return ProcessRef(proc.pid, started)


def _stop(ref: ProcessRef, grace: float = 10.0) -> bool:
    """SIGTERM the process group, wait, then SIGKILL. False if it was not running."""
    if not is_alive(ref):
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(ref.pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not is_alive(ref):
                return True
            time.sleep(0.1)
    return not is_alive(ref)


def _log_tail(home: Path, name: str, lines: int = 15) -> str:
    path = home / "logs" / f"{name}.log"
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"\nlast lines of {path}:\n" + "\n".join(f"  {line}" for line in text)


# ----------------------------------------------------------------------------- ports and readiness


def free_port(host: str = "127.0.0.1", preferred: int | None = None) -> int:
    if preferred and _port_free(host, preferred):
        return preferred
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def server_answers(url: str) -> bool:
    # /api/v1/status asks the search engine for a shape noida-db does not give; /version does not.
    return _http_ok(f"{url}/api/v1/version")


def _wait(what: str, ready: Any, ref: ProcessRef | None, home: Path, log_name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if ref is not None and not is_alive(ref):
            raise LocalStackError(f"{what} stopped while starting" + _log_tail(home, log_name))
        time.sleep(0.5)
    raise LocalStackError(f"{what} did not become ready in {timeout:.0f} s" + _log_tail(home, log_name))


# ----------------------------------------------------------------------------- state


def read_state(home: Path) -> StackState | None:
    path = home / _STATE_FILE
    if not path.is_file():
        return None
    try:
        return StackState.from_json(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as exc:
        raise LocalStackError(f"{path} is not a state file align wrote ({exc}); stop the processes it names by hand "
                              "and delete it") from None


def _write_state(home: Path, state: StackState) -> None:
    with atomic_path(home / _STATE_FILE) as tmp:
        tmp.write_text(json.dumps(state.to_json(), indent=1))


def status(home: Path | None = None) -> StackStatus:
    home = Path(home or default_home())
    state = read_state(home)
    if state is None:
        return StackStatus(home, None, {}, False)
    alive = {name: is_alive(ref) for name, ref in state.processes.items()}
    return StackStatus(home, state, alive, server_answers(state.url))


# ----------------------------------------------------------------------------- up / down


def _server_env(home: Path, state: StackState) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARGILLA_")}
    env.update(
        ARGILLA_HOME_PATH=str(home / "server"),
        ARGILLA_ELASTICSEARCH=f"http://{state.host}:{state.elasticsearch_port}",
        ARGILLA_REDIS_URL=f"redis://{state.host}:{state.redis_port}/0",
        ARGILLA_ENABLE_TELEMETRY="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_OFFLINE="1",
    )
    return env


def _run_once(name: str, cmd: list[str], home: Path, env: dict[str, str], timeout: float = 180) -> None:
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=home, timeout=timeout)
    if done.returncode != 0:
        raise LocalStackError(f"`{' '.join(cmd[-3:])}` failed (exit {done.returncode})" + _log_tail(home, name))


def up(home: Path | None = None, *, host: str = "127.0.0.1", venv: Path | None = None,
       timeout: float = 180) -> StackStatus:
    """Start the local stack (installing the server venv first if needed); a running stack is left alone."""
    home = Path(home or default_home())
    current = status(home)
    if current.running:
        return current
    if current.state is not None:
        down(home)  # a half-running stack (a crash, a reboot): stop what is left and start clean
    venv = ensure_server_venv(venv)
    python = str(venv_python(venv))
    previous = current.state
    state = StackState(
        home=str(home), host=host,
        elasticsearch_port=free_port(host, previous.elasticsearch_port if previous else None),
        redis_port=free_port(host, previous.redis_port if previous else None),
        server_port=free_port(host, previous.server_port if previous else None),
        started_at=time.time(),
    )
    if len({state.elasticsearch_port, state.redis_port, state.server_port}) < 3:
        raise LocalStackError("could not find three distinct free ports on the loopback interface")
    (home / "server").mkdir(parents=True, exist_ok=True)
    env = _server_env(home, state)
    try:
        state.processes["noida-db"] = _spawn("noida-db", [
            str(noida_binary(venv)), "start", "--data-dir", str(home / "noida"), "--host", host,
            "--only", "elasticsearch,redis", "--elasticsearch-port", str(state.elasticsearch_port),
            "--redis-port", str(state.redis_port)], home, env)
        _write_state(home, state)  # from here on `down` can clean up whatever happens next
        _wait("noida-db (Elasticsearch, Redis)",
              lambda: _http_ok(f"http://{host}:{state.elasticsearch_port}/") and _tcp_open(host, state.redis_port),
              state.processes["noida-db"], home, "noida-db", 60)
        _run_once("setup", [python, "-m", "argilla_server", "database", "migrate"], home, env)
        _run_once("setup", [python, "-m", "argilla_server", "database", "users", "create_default",
                            "--password", DEFAULT_PASSWORD, "--api-key", DEFAULT_API_KEY], home, env)
        state.processes["server"] = _spawn("server", [
            python, "-m", "argilla_server", "start", "--host", host, "--port", str(state.server_port),
            "--no-access-log"], home, env)
        # One worker process: this is a laptop-sized stack, and the machine's cores are shared.
        state.processes["worker"] = _spawn("worker", [python, "-m", "argilla_server", "worker", "--num-workers", "1"],
                                           home, env)
        _write_state(home, state)
        _wait("the Argilla server", lambda: server_answers(state.url), state.processes["server"], home, "server",
              timeout)
        if not is_alive(state.processes["worker"]):
            raise LocalStackError("the Argilla worker stopped while starting" + _log_tail(home, "worker"))
    except BaseException:
        down(home)
        raise
    return status(home)


def down(home: Path | None = None) -> list[str]:
    """Stop the processes the state file names (server first, noida-db last). Returns those stopped."""
    home = Path(home or default_home())
    state = read_state(home)
    if state is None:
        return []
    stopped = [name for name in ("worker", "server", "noida-db")
               if name in state.processes and _stop(state.processes[name])]
    still = [name for name, ref in state.processes.items() if is_alive(ref)]
    if still:
        raise LocalStackError(f"could not stop {', '.join(still)} (PIDs "
                              f"{', '.join(str(state.processes[n].pid) for n in still)})")
    state.processes = {}
    _write_state(home, state)  # keep the ports, so the next `up` reuses them
    return stopped
