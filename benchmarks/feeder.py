"""The client side of the ingest scenario, run as its own process.

``python -m benchmarks.feeder ENDPOINT PATH PARAMS_JSON [fields]`` encodes every
batch first (lines, or with ``fields`` field values the daemon renders), sends one warm-up batch (so the daemon has opened the file), then sends
the batches over one DEALER as fast as acks allow, keeping ``window`` batches
unacknowledged, and prints one JSON line: records, batches, seconds (first
send to last ack).
"""

import json
import sys
import time

import zmq

from clh_writerd import protocol

from .harness import Params
from .workload import PROGRAM, encode_batches, file_options

TIMEOUT_MS = 30_000


def _expect_ack(dealer: zmq.Socket) -> int:
    if not dealer.poll(TIMEOUT_MS):
        raise SystemExit(f"feeder: no reply within {TIMEOUT_MS / 1000:g}s")
    reply = protocol.decode_reply(dealer.recv())
    if not isinstance(reply, protocol.Ack):
        raise SystemExit(f"feeder: the daemon refused a batch: {reply}")
    return reply.seq


def feed(endpoint: str, path: str, params: Params, fields: bool = False) -> dict:
    client = protocol.new_client_id(PROGRAM)
    options = file_options(params)
    payloads = encode_batches(params, path, fields)
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send(protocol.encode_batch(client, 0, path, options, ["warm-up"]))
        _expect_ack(dealer)
        total = len(payloads)
        window = max(1, params.window)
        sent = acked = 0
        started = time.perf_counter()
        while acked < total:
            while sent < total and sent - acked < window:
                dealer.send(payloads[sent], copy=False)
                sent += 1
            seq = _expect_ack(dealer)
            if seq != acked + 1:
                raise SystemExit(f"feeder: ack for batch {seq} arrived, expected {acked + 1}")
            acked += 1
        seconds = time.perf_counter() - started
    finally:
        dealer.close(0)
        context.term()
    return {"records": params.records, "batches": len(payloads), "seconds": seconds, "warmup_records": 1}


def main() -> None:
    endpoint, path, params_json = sys.argv[1:4]
    result = feed(endpoint, path, Params(**json.loads(params_json)), fields=sys.argv[4:5] == ["fields"])
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
