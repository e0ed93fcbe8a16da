"""A tiny authoritative DNS server over UDP on loopback, for tests: real DNS messages
(dnspython's message classes), answers chosen per name by the test.

Unknown names get NXDOMAIN; ``cname``/``a`` give records, ``servfail`` a SERVFAIL and ``drop``
no answer at all (the client times out). ``queries`` lists the (name, type) pairs asked.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

CNAME, A, SERVFAIL, DROP = "CNAME", "A", "SERVFAIL", "DROP"


class DnsServer:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.behaviour: dict[str, tuple[str, str]] = {}
        self.queries: list[tuple[str, str]] = []
        self._stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cname(self, name: str, target: str) -> None:
        self.behaviour[name] = (CNAME, target.rstrip(".") + ".")

    def a(self, name: str, address: str) -> None:
        self.behaviour[name] = (A, address)

    def servfail(self, name: str) -> None:
        self.behaviour[name] = (SERVFAIL, "")

    def drop(self, name: str) -> None:
        self.behaviour[name] = (DROP, "")

    def nxdomain(self, name: str) -> None:
        self.behaviour.pop(name, None)

    def close(self) -> None:
        self._stopping = True
        self.sock.sendto(b"", ("127.0.0.1", self.port))  # wake the receiving thread
        self.thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while True:
            data, peer = self.sock.recvfrom(4096)
            if self._stopping:
                return
            reply = self._answer(data)
            if reply is not None:
                self.sock.sendto(reply, peer)

    def _answer(self, data: bytes) -> bytes | None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
        kind, value = self.behaviour.get(name, ("", ""))
        if kind == DROP:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if kind == SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif not kind:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif kind == CNAME or question.rdtype == dns.rdatatype.A:
            response.answer.append(dns.rrset.from_text(question.name, 300, "IN", kind, value))
            target = self.behaviour.get(value.rstrip(".").lower(), ("", ""))
            if kind == CNAME and question.rdtype == dns.rdatatype.A and target[0] == A:
                # the CNAME's target in the same answer, as an authoritative server that
                # holds both names gives it (resolvers such as Pebble's need it)
                response.answer.append(dns.rrset.from_text(value, 300, "IN", A, target[1]))
        return response.to_wire()
