"""N emulated hosts on one machine: Linux network namespaces, veth links to a router namespace, tc shaping.

Topology (a star, like hosts on one switch; every link is the host's NIC)::

    host i  (namespace <prefix>h<i>, address 10.77.<i+1>.2, device snh<i>)
       |  veth, shaped both ways: tbf on snh<i> (upload) and on snr<i> (download)
    router  (namespace <prefix>r, 10.77.<i+1>.1 on snr<i>, ip_forward=1,
             every forwarded packet through the NFQUEUE delay line of delay.py when latency > 0)

Latency is one-way host-to-host (a ping's RTT is twice it plus the base ~0.05 ms). It is added once, in the
router, so neither host's TCP stack holds the delayed packets (netem on a sender's own egress interacts with TCP
Small Queues). Rate is enforced by ``tbf`` (netem is not built into this kernel: see delay.py). Ranks in the same
host namespace talk over loopback, unshaped, as processes on one machine do (tensor parallelism in scenario 3).

Every object lives in namespaces named ``dlsn<pid>...``, so concurrent runs do not collide and a crashed run's
leftovers are recognisable (:func:`cleanup_stale`); only addresses inside those namespaces are used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PREFIX = "dlsn"
NFQUEUE_NUM = 0
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$")
_LAT_RE = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)$")


def parse_rate(text: str) -> float:
    """``"100mbit"`` -> bits per second."""
    m = _RATE_RE.match(text.strip().lower())
    if not m:
        raise ValueError(f"bad bandwidth {text!r}: use e.g. 10gbit, 1gbit, 100mbit")
    return float(m.group(1)) * {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def parse_latency(text: str) -> float:
    """``"5ms"`` -> seconds."""
    m = _LAT_RE.match(text.strip().lower())
    if not m:
        raise ValueError(f"bad latency {text!r}: use e.g. 0.1ms, 5ms")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


def check_prerequisites() -> str | None:
    """None when this process can build the network; otherwise the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, tc); run it with sudo or as root"
    hints = {"ip": "iproute2", "tc": "iproute2", "iptables-legacy": "iptables", "ping": "iputils-ping"}
    for tool, package in hints.items():  # ping calibrates the latency each table reports (RTT column)
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command (apt-get install {package})"
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    return None


def _run(cmd: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    logger.debug("$ %s", " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise RuntimeError(f"command failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr.strip()}")
    return out


def cleanup_stale() -> list[str]:
    """Delete namespaces left by benchmark runs whose process no longer exists; returns what was deleted."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    removed = []
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = re.match(rf"^{PREFIX}(\d+)[a-z]*(r|h\d+)$", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _delete_namespace(name)
            removed.append(name)
    return removed


@dataclass(frozen=True)
class Host:
    index: int
    ns: str
    addr: str
    dev: str


class SlowNet:
    """Build, shape and tear down the emulated network. A context manager; teardown also runs on SIGTERM.

    Args:
        n_hosts: number of host namespaces.
        tag: distinguishes several networks built by one process (lowercase letters).
    """

    def __init__(self, n_hosts: int, tag: str = ""):
        if not 1 <= n_hosts <= 200:
            raise ValueError(f"n_hosts must be in [1, 200], got {n_hosts}")
        if not re.fullmatch(r"[a-z]*", tag) or len(tag) > 4:
            raise ValueError(f"tag must be at most 4 lowercase letters, got {tag!r}")
        self.prefix = f"{PREFIX}{os.getpid()}{tag}"
        self.router = f"{self.prefix}r"
        self.hosts = [Host(i, f"{self.prefix}h{i}", f"10.77.{i + 1}.2", f"snh{i}") for i in range(n_hosts)]
        self._created: list[str] = []
        self._delay: subprocess.Popen | None = None
        self._children: list[subprocess.Popen] = []
        self.rate_bps: float | None = None
        self.latency_s: float = 0.0

    # ------------------------------------------------------------------ lifecycle
    _SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> SlowNet:
        # Explicit handlers: a background job inherits SIGINT ignored, and SIGTERM/SIGHUP would skip `finally`.
        self._old_handlers = {s: signal.getsignal(s) for s in self._SIGNALS}
        for s in self._SIGNALS:
            signal.signal(s, _raise_keyboard_interrupt)
        try:
            self.create()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for s in self._SIGNALS:  # a second Ctrl-C must not abort the teardown half-way
            signal.signal(s, signal.SIG_IGN)
        try:
            self.teardown()
        finally:
            for s, h in self._old_handlers.items():
                signal.signal(s, h)

    def create(self) -> None:
        reason = check_prerequisites()
        if reason:
            raise RuntimeError(reason)
        _run(["ip", "netns", "add", self.router])
        self._created.append(self.router)
        r = ["ip", "-n", self.router]
        _run(r + ["link", "set", "lo", "up"])
        _run(["ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        for h in self.hosts:
            _run(["ip", "netns", "add", h.ns])
            self._created.append(h.ns)
            _run(["ip", "link", "add", h.dev, "netns", h.ns, "type", "veth", "peer", "name", f"snr{h.index}",
                  "netns", self.router])
            _run(r + ["addr", "add", f"10.77.{h.index + 1}.1/24", "dev", f"snr{h.index}"])
            _run(r + ["link", "set", f"snr{h.index}", "up"])
            hn = ["ip", "-n", h.ns]
            _run(hn + ["link", "set", "lo", "up"])
            _run(hn + ["addr", "add", f"{h.addr}/24", "dev", h.dev])
            _run(hn + ["link", "set", h.dev, "up"])
            _run(hn + ["route", "add", "default", "via", f"10.77.{h.index + 1}.1"])
            # Hosts on a long fat pipe get tuned TCP buffers (the defaults cap a 10 ms RTT flow near 400 MB/s).
            _run(["ip", "netns", "exec", h.ns, "sysctl", "-qw", "net.ipv4.tcp_rmem=4096 131072 33554432",
                  "net.ipv4.tcp_wmem=4096 65536 33554432"])
        logger.info("network %s: %d hosts behind router %s", self.prefix, len(self.hosts), self.router)

    def teardown(self) -> None:
        """Stop what this object started and delete its namespaces (deleting a namespace deletes its veths)."""
        for p in self._children + ([self._delay] if self._delay else []):
            _kill(p)
        self._children.clear()
        self._delay = None
        for ns in reversed(self._created):
            _delete_namespace(ns)
        if self._created:
            logger.info("network %s torn down", self.prefix)
        self._created.clear()

    # ------------------------------------------------------------------ shaping
    def shape(self, rate: str | float, latency: str | float) -> None:
        """Set every link to ``rate`` (each direction) and the one-way host-to-host ``latency``."""
        bps = parse_rate(rate) if isinstance(rate, str) else float(rate)
        lat = parse_latency(latency) if isinstance(latency, str) else float(latency)
        bytes_per_s = bps / 8
        # burst >= one TSO super-packet (64 KiB) so tbf never splits one; >= 1 ms at line rate so that the
        # refill granularity of the qdisc watchdog does not cap the rate. Queue: 50 ms at line rate.
        burst = int(max(96 * 1024, bytes_per_s * 1e-3))
        for h in self.hosts:
            for ns, dev in ((h.ns, h.dev), (self.router, f"snr{h.index}")):
                _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(bps)}bit",
                      "burst", str(burst), "latency", "50ms"])
        self._set_delay(lat)
        self.rate_bps, self.latency_s = bps, lat

    def _set_delay(self, lat: float) -> None:
        ipt = ["ip", "netns", "exec", self.router, "iptables-legacy"]
        if self._delay is not None:
            _run(ipt + ["-D", "FORWARD", "-j", "NFQUEUE", "--queue-num", str(NFQUEUE_NUM)], check=False)
            _kill(self._delay)
            self._delay = None
        if lat <= 0:
            return
        self._delay = subprocess.Popen(
            ["ip", "netns", "exec", self.router, sys.executable, "-m", "benchmarks.slownet.delay",
             "--queue", str(NFQUEUE_NUM), "--delay-ms", repr(lat * 1e3), "--max-seconds", "86400"],
            cwd=_repo_root(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = self._delay.stdout.readline().strip()
        if line != "ready":
            err = self._delay.stderr.read() if self._delay.poll() is not None else ""
            _kill(self._delay)
            self._delay = None
            raise RuntimeError(f"delay line did not start: {line!r} {err}")
        _run(ipt + ["-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", str(NFQUEUE_NUM)])

    def check_delay_alive(self) -> None:
        if self._delay is not None and self._delay.poll() is not None:
            raise RuntimeError(f"the delay line exited ({self._delay.returncode}): {self._delay.stderr.read()}")

    # ------------------------------------------------------------------ processes
    def popen(self, host: int, cmd: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        """Start ``cmd`` inside host ``host``'s namespace (in its own session, killed at teardown)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.hosts[host].ns, *cmd], env=env, cwd=_repo_root(),
                             start_new_session=True, **kw)
        self._children.append(p)
        return p

    def forget(self, p: subprocess.Popen) -> None:
        if p in self._children:
            self._children.remove(p)

    def exec(self, host: int, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return _run(["ip", "netns", "exec", self.hosts[host].ns, *cmd], timeout=timeout)

    # ------------------------------------------------------------------ calibration
    def probe(self, nbytes: int | None = None, timeout: float = 60) -> dict:
        """Measured RTT (ping, host 0 -> 1) and TCP goodput (host 0 -> host 1) under the current shaping."""
        if len(self.hosts) < 2:
            return {}
        out: dict = {}
        if shutil.which("ping"):
            res = _run(["ip", "netns", "exec", self.hosts[0].ns, "ping", "-q", "-c", "5", "-i", "0.05",
                        self.hosts[1].addr], check=False, timeout=timeout)
            m = re.search(r"= [\d.]+/([\d.]+)/", res.stdout)
            out["rtt_ms"] = float(m.group(1)) if m else None
        if nbytes is None:  # ~1.5 s of line rate, at least 2 MB, at most 200 MB
            nbytes = int(min(200e6, max(2e6, 1.5 * (self.rate_bps or 1e9) / 8)))
        py = [sys.executable, "-m", "benchmarks.slownet.probe"]
        srv = self.popen(1, py + ["serve", self.hosts[1].addr, str(nbytes)], stdout=subprocess.PIPE, text=True)
        try:
            srv.stdout.readline()  # "listening"
            self.exec(0, py + ["send", self.hosts[1].addr, str(nbytes)], timeout=timeout)
            line = srv.communicate(timeout=timeout)[0].strip().splitlines()[-1]
            out["goodput_MBps"] = float(line.split()[0]) / 1e6
        finally:
            _kill(srv)
            self.forget(srv)
        out["probe_bytes"] = nbytes
        return out


def _delete_namespace(ns: str) -> None:
    """Kill whatever still runs inside ``ns`` (only this harness starts processes there), then delete it: a
    namespace outlives its name while a process holds it."""
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "netns", "del", ns], check=False)


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _kill(p: subprocess.Popen, grace: float = 3.0) -> None:
    """Terminate a process this module started, and its session (it was started with start_new_session)."""
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=grace)


def wait_all(procs: list[subprocess.Popen], timeout: float, net: SlowNet | None = None) -> list[int]:
    """Wait for every process; on timeout or a failure of any, kill the rest. Returns the exit codes."""
    end = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c not in (None, 0) for c in codes):
            time.sleep(1.0)  # let the others report their side of the failure
            for p in procs:
                _kill(p)
            return [p.returncode for p in procs]
        if time.monotonic() > end:
            for p in procs:
                _kill(p)
            raise TimeoutError(f"ranks did not finish within {timeout:.0f} s")
        if net is not None:
            net.check_delay_alive()
        time.sleep(0.1)
