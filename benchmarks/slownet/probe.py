"""TCP goodput between two emulated hosts (the calibration of netns.SlowNet.probe).

Usage:  python -m benchmarks.slownet.probe serve ADDR NBYTES   (prints "listening", then "<bytes/s> <seconds>")
        python -m benchmarks.slownet.probe send ADDR NBYTES
Goodput is timed at the receiver from the first byte to the last, so connection set-up and slow start's first
round trip are not in it.
"""

from __future__ import annotations

import socket
import sys
import time

PORT = 5999


def serve(addr: str, nbytes: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, PORT))
        s.listen(1)
        print("listening", flush=True)
        s.settimeout(60)
        conn, _ = s.accept()
        with conn:
            buf = bytearray(1 << 20)
            got, t0 = 0, None
            while got < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                if t0 is None:
                    t0, first = time.perf_counter(), n
                got += n
            dt = time.perf_counter() - t0
            conn.sendall(b"k")
    print(f"{(got - first) / dt:.0f} {dt:.4f}", flush=True)


def send(addr: str, nbytes: int) -> None:
    with socket.create_connection((addr, PORT), timeout=60) as c:
        block = b"\0" * (1 << 20)
        left = nbytes
        while left > 0:
            c.sendall(block[: min(left, len(block))])
            left -= len(block)
        c.recv(1)


if __name__ == "__main__":
    {"serve": serve, "send": send}[sys.argv[1]](sys.argv[2], int(sys.argv[3]))
