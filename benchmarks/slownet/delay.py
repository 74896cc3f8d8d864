"""A constant-delay line for forwarded IPv4 packets, in user space, over NFQUEUE (no netem on this kernel).

Usage (inside the router namespace, after ``iptables-legacy -A FORWARD -j NFQUEUE --queue-num Q``):
    python -m benchmarks.slownet.delay --queue Q --delay-ms 5

Why user space: the machines this benchmark was written on run a kernel built without ``sch_netem`` (and without
``fq`` / ``etf``, the qdiscs that honour ``skb->tstamp``), so ``tc ... netem delay`` fails with "Specified qdisc kind
is unknown". NFQUEUE is built in: the kernel hands each forwarded packet's metadata (not its bytes:
``NFQNL_COPY_META``) to this process and holds the packet until a verdict. We accept packets ``delay`` after they
arrived, in arrival order, with one batch verdict (``NFQNL_MSG_VERDICT_BATCH``: every id <= N) per wake-up.
``NFQA_CFG_F_GSO`` keeps TSO super-packets whole (otherwise the kernel would segment every 64 KiB packet into 45
before queueing). The process asks for SCHED_FIFO so that benchmark ranks busy on both cores do not delay it.

The protocol is the kernel's ``include/uapi/linux/netfilter/nfnetlink_queue.h``; spoken here with ``struct`` so the
benchmark needs no libnetfilter_queue bindings.
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NF_ACCEPT = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _msg(msg: int, queue: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs  # nfgenmsg: family, v0, res_id
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


class DelayLine:
    """Binds NFQUEUE ``queue`` and accepts every packet ``delay_s`` after its arrival, in order."""

    def __init__(self, queue: int, delay_s: float, maxlen: int = 200_000):
        self.queue = queue
        self.delay_s = delay_s
        # Releases are batched: a wake-up waits up to `slack` past the first due packet and accepts everything due
        # by then. 2.5 % of the delay, at most 0.25 ms: at 5 ms this halves the delay line's CPU per MB (one
        # wake-up per packet otherwise), at 0.1 ms it is 2.5 us, i.e. no batching.
        self.slack = min(0.25e-3, 0.025 * delay_s)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: a burst of 64 KiB packets' metadata
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self.seq = 0
        self._config(_attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_BIND, socket.htons(socket.AF_INET))))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("=IB", socket.htonl(0), NFQNL_COPY_META))
                     + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", maxlen))
                     + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO))
                     + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO)))
        self.sock.setblocking(False)
        self.pending: collections.deque[tuple[float, int]] = collections.deque()
        self.accepted = 0

    def _config(self, attrs: bytes) -> None:
        self.seq += 1
        self.sock.send(_msg(NFQNL_MSG_CONFIG, self.queue, attrs, self.seq, NLM_F_REQUEST | NLM_F_ACK))
        data = self.sock.recv(65536)
        _, kind, _, _, _ = struct.unpack_from("=IHHII", data)
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, 16)
            if err:
                raise OSError(-err, f"NFQUEUE config of queue {self.queue} failed: {os.strerror(-err)}")

    def _verdict_upto(self, packet_id: int) -> None:
        self.seq += 1
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
        self.sock.setblocking(True)
        self.sock.send(_msg(NFQNL_MSG_VERDICT_BATCH, self.queue, attrs, self.seq))
        self.sock.setblocking(False)

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            due = time.monotonic() + self.delay_s
            off = 0
            while off + 16 <= len(data):
                n, kind, _, _, _ = struct.unpack_from("=IHHII", data, off)
                if n < 16:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    a = off + 20  # nlmsghdr (16) + nfgenmsg (4)
                    while a + 4 <= off + n:
                        alen, akind = struct.unpack_from("=HH", data, a)
                        if alen < 4:
                            break
                        if akind & 0x7FFF == NFQA_PACKET_HDR:
                            (pid,) = struct.unpack_from("!I", data, a + 4)
                            self.pending.append((due, pid))
                            break
                        a += (alen + 3) & ~3
                off += (n + 3) & ~3

    def run(self, stop_after_s: float | None = None) -> None:
        end = None if stop_after_s is None else time.monotonic() + stop_after_s
        while end is None or time.monotonic() < end:
            now = time.monotonic()
            last = None
            while self.pending and self.pending[0][0] <= now:
                last = self.pending.popleft()[1]
                self.accepted += 1
            if last is not None:
                self._verdict_upto(last)
            timeout = max(0.0, self.pending[0][0] + self.slack - time.monotonic()) if self.pending else 0.5
            r, _, _ = select.select([self.sock], [], [], timeout)
            if r:
                self._drain()

    def close(self) -> None:
        if self.pending:
            self._verdict_upto(self.pending[-1][1])
            self.pending.clear()
        self.sock.setblocking(True)
        self._config(_attr(NFQA_CFG_CMD, struct.pack("=BxH", NFQNL_CFG_CMD_UNBIND, socket.htons(socket.AF_INET))))
        self.sock.close()


def _exit(signum, frame):
    raise SystemExit(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queue", type=int, default=0)
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--max-seconds", type=float, default=None, help="exit after this long (a bound for safety)")
    args = ap.parse_args(argv)
    try:  # SCHED_FIFO: packets must leave on time even when every core runs a benchmark rank
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError as exc:
        print(f"delay: SCHED_FIFO unavailable ({exc}); latency will jitter under load", file=sys.stderr)
    signal.signal(signal.SIGTERM, _exit)
    line = DelayLine(args.queue, args.delay_ms / 1e3)
    print("ready", flush=True)
    try:
        line.run(args.max_seconds)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        line.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
