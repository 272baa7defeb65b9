"""A loopback TCP forwarder the tests can cut and restore: a Redis outage as the processes behind it see
it (connections reset, new ones refused) while Redis itself, and every key's TTL, runs on."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

BUFFER_BYTES = 65536


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1", userinfo: str = "") -> None:
        """`userinfo` (`user:password@`) goes into `url`: the Redis behind wants credentials."""
        self._target = (host, target_port)
        self._userinfo = userinfo
        self._listener = socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self.cuts = 0
        threading.Thread(target=self._accept, name=f"tcp-proxy {self.port}", daemon=True).start()

    def __repr__(self) -> str:
        return f"<TcpProxy :{self.port} -> :{self._target[1]} {'open' if self._open.is_set() else 'cut'}>"

    def url(self, db: int = 0) -> str:
        return f"redis://{self._userinfo}127.0.0.1:{self.port}/{db}"

    def cut(self) -> None:
        """Every connection through the proxy is reset, and new ones are closed as they arrive."""
        self._open.clear()
        self.cuts += 1
        with self._lock:
            for sock in list(self._sockets):
                _close(sock)
            self._sockets.clear()

    def restore(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._listener)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5.0)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(BUFFER_BYTES):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)
            with self._lock:
                self._sockets.discard(source)
                self._sockets.discard(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
