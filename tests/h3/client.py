"""HTTP/3 test client for burrow's integration tests (spawned as
`python3 tests/h3/client.py`).

Built on aioquic's sans-IO API (QuicConnection + H3Connection) driven by a
plain UDP socket and a select() loop of its own, so that it controls the
socket (NAT rebinding) and 0-RTT. Standard library + aioquic only.

Input: one JSON object on stdin (it may be followed by more lines, see
`wait_stdin_line`; stdin need not be closed):

  {
    "connect": "127.0.0.1:4433",      # server UDP address ("[::1]:4433" for IPv6)
    "server_name": "chat.test",       # SNI and :authority
    "authority": "chat.test:4433",    # optional, :authority if not server_name
    "cafile": "/path/ca.pem" | null,  # trust anchors (PEM); null: no verification
    "requests": [                     # run one after another on ONE connection
      {"method": "GET", "path": "/x",
       "headers": [["cookie", "a=b"]],  # names are lower-cased
       "body_b64": null,                # request body, base64 (sent with FIN)
       "stream": false,                 # print a "data" line per DATA chunk
       "migrate_after_bytes": 0,        # >0: after this many body bytes, move
                                        #     to a new UDP socket (new port)
       "migrate_change_cid": false,     # optional: also switch to a fresh
                                        #     connection ID when migrating
       "wait_stdin_line": false,        # optional, see below
       "raw_b64": null,                 # optional: these bytes as they are on
                                        #   the stream instead of a request,
       "raw_flood_bytes": 0,            #   then this many zero bytes, no FIN;
                                        #   "end" says "stop_sending" or "reset"
                                        #   when the server refuses the stream
       "raw_after_head_b64": null}      # optional: the head, then these bytes
                                        #   as they are and FIN
    ],
    "zero_rtt": false,                  # see below
    "timeout": 30                       # seconds, for the whole run
  }

Output: one JSON object per line on stdout, flushed after each line.
"conn" is the connection's number (0; with zero_rtt the resumed one is 1).

  {"event":"connected","conn":c,"alpn":"h3","local_port":N}
  {"event":"informational","conn":c,"index":i,"status":1xx,"headers":[[k,v],...]}
  {"event":"headers","conn":c,"index":i,"status":200,"headers":[[k,v],...]}
  {"event":"data","conn":c,"index":i,"len":N,"text":"..."}   # stream only; text
                                                  # is the chunk as lossy UTF-8
  {"event":"migrated","conn":c,"index":i,"old_port":A,"new_port":B,
   "cid_changed":bool}
  {"event":"trailers","conn":c,"index":i,"headers":[[k,v],...]}
  {"event":"waiting","conn":c,"index":i}          # wait_stdin_line only
  {"event":"end","conn":c,"index":i,"how":"fin"|"reset","code":E|null,
   "len":total_body_bytes,"sha256":"hex of the body"}
  {"event":"ticket","max_early_data_size":N|null,"forced":bool}  # zero_rtt
  {"event":"resumption","conn":1,"session_resumed":bool,
   "early_data_accepted":bool,"early_data_offered":bool,
   "request_sent_early":bool}                     # zero_rtt, 2nd connection
  {"event":"done"}
  {"event":"error","message":"..."}               # then exit code 1

"early_data_offered": aioquic put early_data in the ClientHello and installed
0-RTT keys; "request_sent_early": requests[0] went out before the handshake
completed, in 0-RTT packets; "early_data_accepted"/"session_resumed": what
the server answered (aioquic's quic.tls, via HandshakeCompleted).

"end" says "fin" only when the response stream ended with a QUIC FIN (an H3
DATA/HEADERS event with stream_ended=True) and "reset" only when the server
reset the stream (QUIC RESET_STREAM; "code" is its error code). Header names
and values are decoded as lossy UTF-8. Body bytes are hashed as they arrive
and not kept, so large downloads are fine.

cafile: a PEM file read by OpenSSL (X509_STORE_load_locations): comments and
private-key blocks in it are skipped. The server's leaf must chain to a
certificate in it (a self-signed leaf may be its own anchor, with or without
CA:TRUE, as the edge's state/self-signed.pem is) and must carry a
subjectAltName matching server_name (the CN is not used); it must also be
within its validity dates.

Migration (migrate_after_bytes): once that many body bytes of the request have
arrived, a new socket is bound (new ephemeral port, same local IP), the old
one closed, and a PING is sent from the new socket so the server sees the new
address at once (it validates the path and carries on; packets still in
flight to the old port are lost and retransmitted). That is a NAT rebinding:
the connection ID stays unless migrate_change_cid is true ("cid_changed" says
whether a spare connection ID from the server was there to switch to).

wait_stdin_line: after the request's first DATA chunk the client prints
"waiting" and the request does not count as finished (even after its "end")
until a line (or EOF) arrives on stdin; meanwhile the connection keeps
receiving and acknowledging. Only then does the next request start / the
client finish.

zero_rtt: connection 0 runs requests[0] and keeps the last session ticket
(if the ticket does not allow early data, its max_early_data_size is forced
to 0xffffffff so aioquic still offers 0-RTT; "ticket" reports it), then
closes. Connection 1 resumes with that ticket and sends requests[0] right
after the ClientHello (in 0-RTT packets when aioquic has 0-RTT keys), then
runs requests[1:]. If the server rejects early data, aioquic resends the
request in 1-RTT packets once it finds them lost.

The client binds the loopback address of the server's family when the server
is on loopback, otherwise the unspecified address; always port 0.
"""

import base64
import hashlib
import ipaddress
import json
import os
import select
import socket
import ssl
import sys
import time

from aioquic.h3.connection import H3_ALPN, ErrorCode, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (ConnectionTerminated, HandshakeCompleted,
                                 StopSendingReceived, StreamReset)
from aioquic import tls

MAX_EARLY_DATA = 0xFFFFFFFF
RECV_BATCH = 256  # datagrams handled before events are processed


class ClientError(Exception):
    pass


def emit(**obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def text(b):
    return b.decode("utf-8", errors="replace")


class Stdin:
    """Reads fd 0 unbuffered: the JSON input, then single lines."""

    def __init__(self):
        self.buf = b""
        self.eof = False

    def _fill(self):
        chunk = os.read(0, 65536)
        if chunk:
            self.buf += chunk
        else:
            self.eof = True

    def read_json(self):
        decoder = json.JSONDecoder()
        while True:
            s = self.buf.decode("utf-8", errors="replace")
            stripped = s.lstrip()
            if stripped:
                try:
                    obj, end = decoder.raw_decode(stripped)
                except ValueError:
                    obj = None
                if obj is not None:
                    rest = stripped[end:]
                    # the rest of the JSON's own line is not a "line" for
                    # wait_stdin_line
                    nl = rest.find("\n")
                    rest = rest[nl + 1:] if nl >= 0 else ""
                    self.buf = rest.encode("utf-8")
                    return obj
            if self.eof:
                raise ClientError("stdin: no complete JSON object")
            self._fill()

    def take_line(self):
        """A line (or EOF) already buffered? Consumes it."""
        nl = self.buf.find(b"\n")
        if nl >= 0:
            self.buf = self.buf[nl + 1:]
            return True
        if self.eof:
            return True
        return False

    def on_readable(self):
        self._fill()


def parse_addr(s):
    host, sep, port = s.rpartition(":")
    if not sep:
        raise ClientError(f"connect: bad address {s!r}")
    host = host.strip("[]")
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
    if not infos:
        raise ClientError(f"connect: cannot resolve {s!r}")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def new_socket(family, server):
    try:
        loopback = ipaddress.ip_address(server[0]).is_loopback
    except ValueError:
        loopback = False
    if family == socket.AF_INET6:
        bind = ("::1" if loopback else "::", 0)
    else:
        bind = ("127.0.0.1" if loopback else "0.0.0.0", 0)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
        except OSError:
            pass
    sock.bind(bind)
    sock.setblocking(False)
    return sock


class Request:
    def __init__(self, index, spec):
        self.index = index
        self.spec = spec
        self.stream_id = None
        self.hasher = hashlib.sha256()
        self.length = 0
        self.final_headers = False
        self.ended = False
        self.migrate_after = int(spec.get("migrate_after_bytes") or 0)
        self.migrated = False
        self.wait_stdin = bool(spec.get("wait_stdin_line"))
        self.waiting = False  # waiting for a stdin line
        self.got_line = not self.wait_stdin

    @property
    def complete(self):
        return self.ended and self.got_line


class Connection:
    """One QUIC connection running a list of requests in turn."""

    def __init__(self, cfg, conn_no, server, family, authority, specs, deadline,
                 stdin, zero_rtt=False):
        self.conn_no = conn_no
        self.server = server
        self.family = family
        self.authority = authority
        self.deadline = deadline
        self.stdin = stdin
        self.zero_rtt = zero_rtt
        self.requests = [Request(i, s) for i, s in enumerate(specs)]
        self.current = 0
        self.ticket = None
        self.connected = False
        self.closing = False
        self.peer_closed = False
        self.request_sent_early = False
        self.early_data_offered = False
        self.ping_uid = 0

        self.quic = QuicConnection(
            configuration=cfg, session_ticket_handler=self._on_ticket)
        self.sock = new_socket(family, server)

    def _on_ticket(self, ticket):
        self.ticket = ticket

    # -- plumbing -----------------------------------------------------------

    def flush(self):
        now = time.monotonic()
        for data, addr in self.quic.datagrams_to_send(now=now):
            try:
                self.sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                pass  # dropped; QUIC loss recovery resends it

    def local_port(self):
        return self.sock.getsockname()[1]

    def _norm_addr(self, addr):
        # aioquic drops datagrams whose source is not exactly the server's
        # address tuple
        if addr[:2] == self.server[:2]:
            return self.server
        return addr

    def _recv_batch(self):
        now = time.monotonic()
        for _ in range(RECV_BATCH):
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue
            self.quic.receive_datagram(data, self._norm_addr(addr), now)

    def _on_closed(self, ev):
        """The connection is closing (by the peer or by aioquic itself)."""
        if self.closing or self.peer_closed:
            return
        if self.connected and self._done():
            self.peer_closed = True  # after the last response: not an error
            return
        raise ClientError(
            f"connection closed: code={ev.error_code:#x} "
            f"frame_type={ev.frame_type} reason={ev.reason_phrase!r}")

    def _check_closed(self):
        # aioquic reports its own close (e.g. a failed certificate check) as
        # an event only after the closing period; its pending close is seen
        # at once here
        ev = getattr(self.quic, "_close_event", None)
        if ev is not None:
            self._on_closed(ev)

    def _emit(self, **obj):
        emit(event=obj.pop("event"), conn=self.conn_no, **obj)

    # -- requests -----------------------------------------------------------

    def _send_request(self, req):
        spec = req.spec
        method = spec.get("method") or "GET"
        path = spec.get("path") or "/"
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", self.authority.encode()),
            (b":path", path.encode()),
        ]
        for k, v in spec.get("headers") or []:
            headers.append((k.lower().encode(), v.encode()))
        if spec.get("raw_b64"):
            # Bytes as they are on a new request stream, no HTTP/3 framing
            # of ours (a hostile client), then `raw_flood_bytes` more
            # without FIN: the server should stop or reset the stream.
            req.stream_id = self.quic.get_next_available_stream_id()
            self.quic.send_stream_data(req.stream_id, base64.b64decode(spec["raw_b64"]))
            flood = int(spec.get("raw_flood_bytes") or 0)
            chunk = b"\x00" * 65536
            while flood > 0:
                n = min(flood, len(chunk))
                self.quic.send_stream_data(req.stream_id, chunk[:n])
                flood -= n
            return
        body = base64.b64decode(spec["body_b64"]) if spec.get("body_b64") else b""
        req.stream_id = self.quic.get_next_available_stream_id()
        if spec.get("raw_after_head_b64"):
            # A proper head, then these bytes as they are, then FIN (a
            # hostile client's body framing).
            self.h3.send_headers(req.stream_id, headers, end_stream=False)
            self.quic.send_stream_data(req.stream_id,
                                       base64.b64decode(spec["raw_after_head_b64"]),
                                       end_stream=True)
            return
        self.h3.send_headers(req.stream_id, headers, end_stream=not body)
        if body:
            self.h3.send_data(req.stream_id, body, end_stream=True)

    def _start_next(self):
        while self.current < len(self.requests):
            req = self.requests[self.current]
            if req.stream_id is None:
                self._send_request(req)
                return
            if not req.complete:
                return
            self.current += 1

    def _active(self):
        if self.current < len(self.requests):
            req = self.requests[self.current]
            if req.stream_id is not None:
                return req
        return None

    def _finish(self, req, how, code):
        if req.ended:
            return
        req.ended = True
        self._emit(event="end", index=req.index, how=how, code=code,
                   len=req.length, sha256=req.hasher.hexdigest())
        if req.complete:
            self.current += 1
            self._start_next()

    def _migrate(self, req):
        old = self.sock
        old_port = self.local_port()
        self.sock = new_socket(self.family, self.server)  # bound before close:
        old.close()                                       # the port differs
        cid_changed = False
        if req.spec.get("migrate_change_cid"):
            before = self._peer_cid()
            self.quic.change_connection_id()
            cid_changed = self._peer_cid() != before
        self.ping_uid += 1
        self.quic.send_ping(self.ping_uid)  # show the server the new address
        self._emit(event="migrated", index=req.index, old_port=old_port,
                   new_port=self.local_port(), cid_changed=cid_changed)

    def _peer_cid(self):
        cid = getattr(self.quic, "_peer_cid", None)
        return getattr(cid, "cid", None)

    def _on_h3(self, ev, req):
        if req is None or ev.stream_id != req.stream_id:
            return
        if isinstance(ev, HeadersReceived):
            headers = [[text(k), text(v)] for k, v in ev.headers]
            status = None
            for k, v in ev.headers:
                if k == b":status":
                    status = int(v)
            if req.final_headers:
                self._emit(event="trailers", index=req.index, headers=headers)
            elif status is not None and 100 <= status < 200:
                self._emit(event="informational", index=req.index,
                           status=status, headers=headers)
            else:
                req.final_headers = True
                self._emit(event="headers", index=req.index, status=status,
                           headers=headers)
        elif isinstance(ev, DataReceived):
            if ev.data:
                first = req.length == 0
                req.length += len(ev.data)
                req.hasher.update(ev.data)
                if req.spec.get("stream"):
                    self._emit(event="data", index=req.index, len=len(ev.data),
                               text=text(ev.data))
                if first and req.wait_stdin and not req.waiting:
                    req.waiting = True
                    self._emit(event="waiting", index=req.index)
                    if self.stdin.take_line():
                        req.got_line = True
                if (req.migrate_after > 0 and not req.migrated
                        and req.length >= req.migrate_after):
                    req.migrated = True
                    self._migrate(req)
        if ev.stream_ended:
            self._finish(req, "fin", None)

    def _process_events(self):
        while True:
            ev = self.quic.next_event()
            if ev is None:
                break
            if isinstance(ev, HandshakeCompleted):
                self.connected = True
                self._emit(event="connected", alpn=ev.alpn_protocol,
                           local_port=self.local_port())
                if ev.alpn_protocol not in H3_ALPN:
                    raise ClientError(f"server chose ALPN {ev.alpn_protocol!r}")
                if self.zero_rtt:
                    self._emit(event="resumption",
                               session_resumed=bool(ev.session_resumed),
                               early_data_accepted=bool(ev.early_data_accepted),
                               early_data_offered=self.early_data_offered,
                               request_sent_early=self.request_sent_early)
                if self.requests and self.requests[0].stream_id is None:
                    self._start_next()
            elif isinstance(ev, ConnectionTerminated):
                self._on_closed(ev)
            req = self._active()
            if isinstance(ev, StreamReset) and req and ev.stream_id == req.stream_id:
                self._finish(req, "reset", ev.error_code)
            if (isinstance(ev, StopSendingReceived) and req
                    and ev.stream_id == req.stream_id and req.spec.get("raw_b64")):
                self._finish(req, "stop_sending", ev.error_code)
            for h3ev in self.h3.handle_event(ev):
                self._on_h3(h3ev, self._active())

    def _done(self):
        return self.current >= len(self.requests)

    # -- main loop ----------------------------------------------------------

    def run(self, need_ticket=False):
        self.quic.connect(self.server, now=time.monotonic())
        self.h3 = H3Connection(self.quic)
        if self.zero_rtt:
            crypto = self.quic._cryptos.get(tls.Epoch.ZERO_RTT)
            self.early_data_offered = bool(
                crypto is not None and crypto.send.is_valid())
            if self.requests:
                self._start_next()  # in 0-RTT packets if the keys exist
                self.request_sent_early = self.early_data_offered
        self.flush()

        ticket_wait_until = None
        while True:
            if self._done() and self.connected:
                if not need_ticket or self.ticket is not None:
                    break
                if self.peer_closed:
                    raise ClientError("no session ticket from the server")
                if ticket_wait_until is None:
                    ticket_wait_until = time.monotonic() + 5
                elif time.monotonic() > ticket_wait_until:
                    raise ClientError("no session ticket from the server")
            now = time.monotonic()
            if now >= self.deadline:
                raise ClientError("timeout")
            wait = self.deadline - now
            timer = self.quic.get_timer()
            if timer is not None:
                wait = min(wait, max(0.0, timer - now))
            if ticket_wait_until is not None:
                wait = min(wait, max(0.0, ticket_wait_until - now))
            req = self._active()
            watch_stdin = (req is not None and req.waiting and not req.got_line
                           and not self.stdin.eof)
            rlist = [self.sock] + ([0] if watch_stdin else [])
            readable, _, _ = select.select(rlist, [], [], wait)
            if self.sock in readable:
                self._recv_batch()
            if 0 in readable:
                self.stdin.on_readable()
            if req is not None and req.waiting and not req.got_line:
                if self.stdin.take_line():
                    req.got_line = True
                    if req.complete:
                        self.current += 1
                        self._start_next()
            timer = self.quic.get_timer()
            if timer is not None and time.monotonic() >= timer:
                self.quic.handle_timer(time.monotonic())
            self._process_events()
            self._check_closed()
            self.flush()

    def close(self):
        self.closing = True
        self.quic.close(error_code=ErrorCode.H3_NO_ERROR)
        self.flush()
        self.sock.close()


def make_config(server_name, cafile):
    cfg = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        server_name=server_name,
        max_data=64 << 20,
        max_stream_data=32 << 20,
    )
    if cafile:
        cfg.load_verify_locations(cafile=cafile)
    else:
        cfg.verify_mode = ssl.CERT_NONE
    return cfg


def main():
    stdin = Stdin()
    spec = stdin.read_json()
    deadline = time.monotonic() + float(spec.get("timeout") or 30)
    family, server = parse_addr(spec["connect"])
    server_name = spec["server_name"]
    authority = spec.get("authority") or server_name
    cafile = spec.get("cafile")
    requests = spec.get("requests") or []

    if spec.get("zero_rtt"):
        if not requests:
            raise ClientError("zero_rtt needs at least one request")
        first = Connection(make_config(server_name, cafile), 0, server, family,
                           authority, requests[:1], deadline, stdin)
        first.run(need_ticket=True)
        first.close()
        ticket = first.ticket
        forced = ticket.max_early_data_size != MAX_EARLY_DATA
        emit(event="ticket", max_early_data_size=ticket.max_early_data_size,
             forced=forced)
        if forced:
            ticket.max_early_data_size = MAX_EARLY_DATA
        cfg = make_config(server_name, cafile)
        cfg.session_ticket = ticket
        second = Connection(cfg, 1, server, family, authority, requests,
                            deadline, stdin, zero_rtt=True)
        second.run()
        second.close()
    else:
        conn = Connection(make_config(server_name, cafile), 0, server, family,
                          authority, requests, deadline, stdin)
        conn.run()
        conn.close()
    emit(event="done")


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # report everything as one "error" line
        msg = str(exc) if isinstance(exc, ClientError) else f"{type(exc).__name__}: {exc}"
        try:
            emit(event="error", message=msg)
        except OSError:
            pass  # stdout is gone
        sys.exit(1)
