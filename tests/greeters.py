"""TCP listeners on loopback that greet as an SMTP server would (or do not),
for the prober to knock on: the unit tests of the prober and the poller."""

from __future__ import annotations

import socket
import threading
import time

GREETING = b"220 mx.customer.test ESMTP\r\n"


class Greeter:
    """Says ``greeting`` to each client after ``delay`` seconds (``None``:
    says nothing; ``b""``: hangs up at once), then keeps what the client
    sends in ``received`` until it hangs up.  ``waiting`` counts clients
    waiting for their greeting right now, ``most_waiting`` the most at once."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 greeting: bytes | None = GREETING, delay: float = 0.0):
        self.greeting, self.delay = greeting, delay
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.host, self.port = self.sock.getsockname()
        self.connections = self.waiting = self.most_waiting = 0
        self.received = b""
        self.lock = threading.Lock()
        self.done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.waiting += 1
            self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            with conn:
                conn.settimeout(10)
                time.sleep(self.delay)
                with self.lock:
                    self.waiting -= 1
                if self.greeting is None:
                    self.done.wait(10)
                    return
                if self.greeting:
                    conn.sendall(self.greeting)
                    while chunk := conn.recv(4096):
                        with self.lock:
                            self.received += chunk
        except OSError:
            pass

    def close(self) -> None:
        self.done.set()
        self.sock.close()


def greeters():
    """A fixture's body: ``make(**kwargs)`` starts a ``Greeter``; all stop after."""
    made = []

    def make(**kwargs) -> Greeter:
        made.append(Greeter(**kwargs))
        return made[-1]
    yield make
    for greeter in made:
        greeter.close()
