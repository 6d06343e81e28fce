"""The meter-gateway command: start-up failures are one line and exit 1 (SPEC §10), settings a
container gives override the file, a clean stop leaves no lock file, --help reads as text."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from meter_gateway.cli import main
from tests.gatewayproc import free_port
from tests.helpers import eventually

ROOT = Path(__file__).parent.parent


def _env(**extra: str) -> dict[str, str]:
    """The test's environment, minus overrides it may carry, with this tree first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METER_GATEWAY_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _config(tmp_path: Path, **settings: Any) -> Path:
    """A config on free loopback ports and a SQLite store in ``tmp_path``."""
    doc: dict[str, Any] = {
        "server": {
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "otlp_grpc": {"listen": f"127.0.0.1:{free_port()}"},
            "otlp_http": {"listen": f"127.0.0.1:{free_port()}"},
        },
        "store": {"url": f"sqlite:///{tmp_path}/gw.db"},
        "auth": {"api_keys": [{"name": "admin", "key": "k" * 20, "scopes": ["admin"]}]},
    }
    for path, value in settings.items():
        node = doc
        *parents, leaf = path.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(doc))
    return config


def _serve(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``meter-gateway serve`` expected to fail at start-up (so it returns on its own)."""
    return subprocess.run(
        [sys.executable, "-m", "meter_gateway", "serve", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=config.parent,
        env=env or _env(),
        timeout=120,
    )


def _listen(config: Path) -> str:
    return str(yaml.safe_load(config.read_text())["server"]["http"]["listen"])


@contextlib.contextmanager
def _running(
    config: Path, listen: str, *args: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """A gateway serving its HTTP API on ``listen`` until the block ends."""
    log = config.parent / "gateway.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meter_gateway", "serve", "--config", str(config), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=config.parent,
            env=env or _env(),
        )
    url = f"http://{listen}"
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited {proc.returncode}: {log.read_text()}")
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200

        eventually(ready, "the gateway to become ready", 60)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _one_line(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 1, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("meter-gateway: cannot start: ")
    return lines[0]


# --- one line and exit 1 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listener", "what"),
    [("http", "the HTTP API"), ("otlp_http", "OTLP/HTTP"), ("otlp_grpc", "OTLP/gRPC")],
)
def test_a_busy_port_is_one_line_and_exit_1(tmp_path: Path, listener: str, what: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        run = _serve(_config(tmp_path, **{f"server__{listener}": {"listen": listen}}))
    line = _one_line(run)
    assert line.endswith(
        f"{what} could not listen on {listen} (server.{listener}.listen): address already in use"
    )
    assert not (tmp_path / "gw.db").exists()  # nothing was opened before the listeners


def test_a_sqlite_store_in_use_is_one_line_then_a_clean_stop_removes_the_lock_file(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    with _running(config, _listen(config)) as proc:
        assert (tmp_path / "gw.db.lock").exists()
        line = _one_line(_serve(_config(other, store={"url": f"sqlite:///{tmp_path}/gw.db"})))
        assert line.endswith(f"{tmp_path}/gw.db is in use by another meter-gateway process")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert (tmp_path / "gw.db").exists()
    assert not (tmp_path / "gw.db.lock").exists()


def test_postgresql_unreachable_is_one_line_and_exit_1(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://meter:secret@127.0.0.1:{port}/meter"
    line = _one_line(_serve(_config(tmp_path, store={"url": url})))
    assert f"store postgresql://meter:***@127.0.0.1:{port}/meter: cannot open PostgreSQL" in line
    assert "refused" in line.lower()
    assert "secret" not in line


def test_postgresql_without_the_extra_names_the_pip_command(tmp_path: Path) -> None:
    # psycopg is installed here; this interpreter behaves as if it were not.
    site = tmp_path / "no-psycopg"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['psycopg'] = None\n")
    env = _env(PYTHONPATH=f"{site}{os.pathsep}{ROOT}")
    url = "postgresql://meter@127.0.0.1:5432/meter"
    line = _one_line(_serve(_config(tmp_path, store={"url": url}), env=env))
    assert line.endswith(
        "PostgreSQL support is not installed (psycopg is missing); install it with: "
        "pip install 'meter-gateway[postgres]'"
    )


# --- settings a container gives -----------------------------------------------------------------


def test_arguments_override_environment_override_file(tmp_path: Path) -> None:
    port = free_port()
    config = _config(tmp_path)  # its own HTTP port and gw.db
    env = _env(
        METER_GATEWAY_HTTP_LISTEN=f"127.0.0.1:{free_port()}",  # loses to --http-listen
        METER_GATEWAY_STORE_URL=f"sqlite:///{tmp_path}/from-env.db",  # wins over the file
    )
    listen = f"127.0.0.1:{port}"
    with _running(config, listen, "--http-listen", listen, env=env) as proc:
        assert (tmp_path / "from-env.db").exists()
        assert not (tmp_path / "gw.db").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert not (tmp_path / "from-env.db.lock").exists()


def test_a_bad_override_is_a_config_error_naming_its_source(tmp_path: Path) -> None:
    run = _serve(_config(tmp_path), "--store", "mysql://db")
    assert run.returncode == 2
    assert run.stderr.splitlines() == [
        f"{tmp_path / 'gateway.yaml'}: store.url (from --store): 'mysql://db': "
        "expected sqlite:///path or postgresql://..."
    ]


# --- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["check-config", "--help"]])
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text
    assert ":class:" not in text
    if argv[0] == "serve":
        for name in ("--http-listen", "METER_GATEWAY_HTTP_LISTEN", "--store"):
            assert name in text
        assert "METER_GATEWAY_STORE_URL" in text
        assert "the argument,\nthen the environment variable, then the config file" in text
