"""A protocol trace of the milter conversation: what Postfix sends, what the milter answers.

A unix-socket proxy between Postfix and a milter (``Trace(milter_socket)``,
then point smtpd_milters at ``trace.path``): it passes every byte on and
reads the milter protocol's packets on the way (a 4-byte length, a
command letter, its data), counting each command Postfix sends and each
answer the milter gives.  ``per_message(n)`` says what one message cost:
commands sent, and packets back (each answer Postfix waits for, and the
changes a milter asks for at the end of the message).  The letters are libmilter's (mfdef.h): C connect, H HELO,
M MAIL, R RCPT, T DATA, L header, N end of headers, B body, E end of
message, A abort, Q quit, D macros, O option negotiation.
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
from collections import Counter

NAMES = {"O": "negotiate", "C": "connect", "H": "helo", "M": "mail", "R": "rcpt", "T": "data",
         "L": "header", "N": "eoh", "B": "body", "E": "eom", "A": "abort", "Q": "quit",
         "D": "macros", "U": "unknown", "K": "quit-nc"}


class Trace:
    def __init__(self, milter_socket: str):
        self.milter = milter_socket
        self.dir = tempfile.mkdtemp(prefix="miltertrace-")
        os.chmod(self.dir, 0o755)
        self.path = os.path.join(self.dir, "trace.sock")
        self.sent: Counter = Counter()      # commands from Postfix
        self.answered: Counter = Counter()  # answers from the milter
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.sent.clear()
            self.answered.clear()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.milter)
            threading.Thread(target=self._pipe, args=(conn, upstream, self.sent),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, conn, self.answered),
                             daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counts: Counter) -> None:
        from sockpipe import copy
        buf = b""

        def seen(data: bytes) -> None:   # the packets: a 4-byte length, a letter, data
            nonlocal buf
            buf += data
            while len(buf) >= 5:
                (size,) = struct.unpack("!I", buf[:4])
                if len(buf) < 4 + size:
                    break
                with self._lock:
                    counts[chr(buf[4])] += 1
                buf = buf[4 + size:]
        copy(src, dst, seen)

    def per_message(self, messages: int) -> str:
        """Commands per message, and the milter's packets back (answers,
        and the changes it asks for at the end), in words."""
        with self._lock:
            sent = dict(self.sent)
            answers = sum(self.answered.values())
        parts = [f"{NAMES.get(k, k)} {v / messages:g}" for k, v in sorted(
            sent.items(), key=lambda kv: "OCHMRTLNBEDAQKU".find(kv[0]))]
        return f"{', '.join(parts)}; {answers / messages:g} packets back"

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass
