"""A gRPC service for tests/grpc.rs: raw-bytes methods (no protobuf
compiler needed) on service burrow.Test, listening on 127.0.0.1:0; prints
"PORT <n>" once it listens, and serves until killed.

- Echo (unary): answers b"echo:" + request.
- Count (server streaming): request is a decimal n; sends b"1".."n", and
  before each message after the first waits until the client has said
  (with Ack) that it got the one before, so a proxy that held messages
  back would stall the call (and it fails after 10 s).
- Ack (unary): request is a decimal i; records that message i arrived.
- Sum (client streaming): adds up decimal messages.
- Chat (bidirectional): answers each message with b"re:" + message, as it
  comes.
- Fail (unary): fails with INVALID_ARGUMENT and a message naming the
  request.
"""

import sys
import threading
from concurrent import futures

import grpc

acked = {}
cond = threading.Condition()


def echo(request, context):
    return b"echo:" + request


def count(request, context):
    n = int(request)
    for i in range(1, n + 1):
        if i > 1:
            with cond:
                if not cond.wait_for(lambda: acked.get(i - 1), timeout=10):
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"message {i - 1} was never acknowledged")
        yield str(i).encode()


def ack(request, context):
    with cond:
        acked[int(request)] = True
        cond.notify_all()
    return b"ok"


def total(request_iterator, context):
    return str(sum(int(m) for m in request_iterator)).encode()


def chat(request_iterator, context):
    for m in request_iterator:
        yield b"re:" + m


def fail(request, context):
    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                  "bad request: " + request.decode())


handlers = {
    "Echo": grpc.unary_unary_rpc_method_handler(echo),
    "Count": grpc.unary_stream_rpc_method_handler(count),
    "Ack": grpc.unary_unary_rpc_method_handler(ack),
    "Sum": grpc.stream_unary_rpc_method_handler(total),
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
}

server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers(
    (grpc.method_handlers_generic_handler("burrow.Test", handlers),))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"PORT {port}", flush=True)
server.wait_for_termination()
sys.exit(0)
