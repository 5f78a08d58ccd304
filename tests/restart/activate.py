#!/usr/bin/env python3
"""Plays systemd's part for tests/restart.rs.

Holds the edge's listening sockets for the whole test, as systemd holds
those of burrow-edge.socket: HTTPS and admin on TCP, the tunnel on UDP,
all on 127.0.0.1 port 0. Runs `burrow edge` on them through socket
activation (LISTEN_FDS, LISTEN_PID, fds from 3 on).

  SIGUSR2  start the edge
  SIGUSR1  restart it as `systemctl restart` does: SIGTERM, wait for it to
           exit, start it again on the same sockets
  SIGHUP   crash it: SIGKILL, wait for it to exit (SIGUSR2 starts it again,
           on the sockets it had)
  SIGTERM  stop it and exit

Events are JSON lines on stderr, among the edge's own log lines.
usage: activate.py BURROW EDGE_TOML
"""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time

burrow, config = sys.argv[1], sys.argv[2]


def log(message, **fields):
    print(json.dumps({"message": message, **fields}), file=sys.stderr, flush=True)


def tcp_listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(4096)
    return s


https, admin = tcp_listener(), tcp_listener()
tunnel = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tunnel.bind(("127.0.0.1", 0))
# Copies on fds 6, 7 and 8, inheritable; the shell that starts the edge
# moves them to 3, 4 and 5 (systemd's numbering).
for i, s in enumerate((https, tunnel, admin)):
    os.dup2(s.fileno(), 6 + i)


def addr(s):
    host, port = s.getsockname()
    return f"{host}:{port}"


events = queue.SimpleQueue()
for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGTERM):
    signal.signal(sig, lambda signum, _frame: events.put(signum))

log("sockets", https=addr(https), tunnel=addr(tunnel), admin=addr(admin))

child = None


def start():
    global child
    child = subprocess.Popen(
        [
            "sh",
            "-c",
            'exec 3<&6 4<&7 5<&8 6<&- 7<&- 8<&-; LISTEN_PID=$$ LISTEN_FDS=3 exec "$0" "$@"',
            burrow,
            "--log-format",
            "json",
            "edge",
            "--config",
            config,
        ],
        pass_fds=(6, 7, 8),
        stdin=subprocess.DEVNULL,
    )
    log("started", pid=child.pid)


def stop():
    began = time.monotonic()
    child.send_signal(signal.SIGTERM)
    code = child.wait()
    log("stopped", code=code, took_ms=int((time.monotonic() - began) * 1000))


while True:
    try:
        sig = events.get(timeout=0.05)
    except queue.Empty:
        continue
    if sig == signal.SIGUSR2:
        start()
    elif sig == signal.SIGUSR1:
        stop()
        start()
    elif sig == signal.SIGHUP:
        child.kill()
        log("killed", code=child.wait())
        child = None
    else:
        if child is not None:
            stop()
        break
