"""The data directory is private to the server's user: a fresh one from a real server subprocess has every
directory 0700 and every file 0600 (database, WAL, output, exit records), and a looser one is tightened."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import anyio
import pytest

from server.store import Store
from testkit.rawserver import start_server

pytestmark = pytest.mark.anyio


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_fresh_data_dir_is_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "data"
    server = await start_server(tmp_path, "--data-dir", str(data_dir), "--detach")  # detached: exit records too
    try:
        fired = await server.call("run_shell_background", command="head -c 300000 /dev/zero | tr '\\0' x")
        reply = await server.call("poll_output", task_ids=[fired["task_id"]], timeout_s=20)
        assert reply["done"][0]["status"] == "completed"
        files = [p for p in data_dir.rglob("*") if p.is_file()]
        names = {p.name for p in files}
        assert {"offload.db", "offload.db-wal", "offload.db-shm"} <= names
        assert any(n.endswith(".log") for n in names) and any(n.endswith(".exit") for n in names), names
        assert {str(p): oct(mode(p)) for p in files if mode(p) != 0o600} == {}
        for folder in (data_dir, data_dir / "output", data_dir / "instances"):
            assert mode(folder) == 0o700, folder
    finally:
        server.process.terminate()
        with anyio.fail_after(10):
            await server.process.wait()


def test_a_looser_data_dir_is_tightened_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "output").mkdir(parents=True)
    data_dir.chmod(0o755)
    (data_dir / "output").chmod(0o755)
    leaked = data_dir / "output" / "old.log"
    leaked.write_text("an old task's output")
    leaked.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="server.store"):
        Store.open(data_dir).close()
    assert mode(data_dir) == 0o700 and mode(data_dir / "output") == 0o700
    assert mode(leaked) == 0o600 and mode(data_dir / "offload.db") == 0o600
    assert "tightening" in caplog.text and "tightened 1 files" in caplog.text
