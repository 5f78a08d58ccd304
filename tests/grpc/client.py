"""The gRPC client for tests/grpc.rs: calls burrow.Test through the edge
with TLS (the edge's self-signed certificate as the root) and prints one
JSON object with what happened.

usage: client.py EDGE_ADDR CA_PEM HOST
"""

import json
import sys

import grpc

addr, ca, host = sys.argv[1], sys.argv[2], sys.argv[3]
with open(ca, "rb") as f:
    creds = grpc.ssl_channel_credentials(root_certificates=f.read())
channel = grpc.secure_channel(addr, creds, options=[
    ("grpc.ssl_target_name_override", host),
    ("grpc.default_authority", host),
])
grpc.channel_ready_future(channel).result(timeout=20)


def method(kind, name):
    return getattr(channel, kind)("/burrow.Test/" + name)


out = {}
out["echo"] = method("unary_unary", "Echo")(b"hello", timeout=20).decode()

# Server streaming: each message is acknowledged (through the edge too)
# before the server sends the next, so they must arrive one by one.
ack = method("unary_unary", "Ack")
got = []
for m in method("unary_stream", "Count")(b"5", timeout=60):
    got.append(m.decode())
    ack(m, timeout=20)
out["count"] = got

out["sum"] = method("stream_unary", "Sum")(
    iter([b"1", b"2", b"3", b"4"]), timeout=20).decode()

out["chat"] = [m.decode() for m in method("stream_stream", "Chat")(
    iter([b"a", b"b", b"c"]), timeout=20)]

try:
    method("unary_unary", "Fail")(b"42", timeout=20)
    out["fail"] = None
except grpc.RpcError as e:
    out["fail"] = {"code": e.code().name, "message": e.details()}

print(json.dumps(out), flush=True)
