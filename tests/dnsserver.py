"""A small authoritative DNS server for tests (dnspython), on a loopback UDP port.

Records live in a dict the test may change while the server runs:
``server.records[("mail.example", "A")] = ["127.0.0.3"]``;
``("example", "MX")`` takes ``[(10, "mail.example")]``, ``[(0, ".")]`` is a
Null MX, ``"SERVFAIL"`` answers that.  A name with no record of any type
is NXDOMAIN.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

TTL = 300


class DNSServer:
    def __init__(self, host: str = "127.0.0.1"):
        self.records: dict[tuple[str, str], list] = {}
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.host, self.port = self.sock.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> "DNSServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        values = self.records.get((name, rdtype), [])
        if values == "SERVFAIL":
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if values:
            if rdtype == "MX":
                texts = [f"{pref} {host if host == '.' else host + '.'}" for pref, host in values]
            else:
                texts = [str(v) for v in values]
            response.answer.append(dns.rrset.from_text_list(
                question.name, TTL, dns.rdataclass.IN, question.rdtype, texts))
        return response

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
                self.sock.sendto(self._answer(query).to_wire(), peer)
            except Exception:  # a test server: a bad packet is just dropped
                continue
