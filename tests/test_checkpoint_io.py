"""distlion_ds.checkpoint_io: atomic, checksummed checkpoint files.

Corruption (flipped bytes, truncation, missing or altered checksum) is refused with an error naming the file; kill -9
at every write / fsync / rename point of a save, and at random times, never leaves a torn file that is accepted, and
the marker always names a checkpoint that loads exactly.
"""

import hashlib
import json
import pathlib
import subprocess
import sys

import pytest
import torch

from distlion_ds import checkpoint_io as cio

# The saved states. Shared verbatim by the saving child (exec'd there) and the checks here; independent of the module
# under test, so the oracle is "what was handed to the save", built again from the step number.
STATE_SRC = """
import torch

def state(step, n):
    g = torch.Generator().manual_seed(1000 + step)
    return {"step": step, "w": torch.arange(n, dtype=torch.float32) * 0.5 + step,
            "m": torch.randn(n, generator=g), "b": torch.full((3, 5), step, dtype=torch.bfloat16),
            "meta": {"name": f"s{step}", "lr": 1e-3 * (step + 1)}}
"""
_ns: dict = {}
exec(STATE_SRC, _ns)
state = _ns["state"]

# The saving child: forked per trial from one interpreter that imported torch (a fork costs ms, an interpreter ~2 s).
# Each step saves a new file step_<i>.pt, overwrites ckpt.pt, then rewrites the marker "latest" (written last), and
# reports the completed step on a pipe. "inject" kills the child (SIGKILL) at its k-th save event (a chunk write
# inside torch.save, an fsync or a rename); "random" lets the parent kill it after a random delay.
HELPER = STATE_SRC + r"""
import json, os, random, signal, sys, time
from distlion_ds import checkpoint_io as cio

spec = json.loads(sys.argv[1])
root, n, mode = spec["root"], spec["n"], spec["mode"]

def child(trial_dir, kill_at, steps, wfd):
    events = [0]
    def hit():
        events[0] += 1
        if kill_at is not None and events[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    def wrap(fn):
        def wrapped(*a, **k):
            hit()
            return fn(*a, **k)
        return wrapped
    os.fsync, os.replace = wrap(os.fsync), wrap(os.replace)
    cio._HashingWriter.write = wrap(cio._HashingWriter.write)
    for step in range(steps):
        s = state(step, n)
        cio.atomic_save(s, os.path.join(trial_dir, f"step_{step}.pt"))
        cio.atomic_save(s, os.path.join(trial_dir, "ckpt.pt"))
        cio.atomic_write_text(os.path.join(trial_dir, "latest"), f"{step}\n")
        os.write(wfd, json.dumps({"done": step, "events": events[0]}).encode() + b"\n")
    os._exit(0)

def trial(name, kill_at, steps, delay):
    d = os.path.join(root, name)
    os.makedirs(d)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child(d, kill_at, steps, w)
    os.close(w)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    lines = b""
    while chunk := os.read(r, 65536):
        lines += chunk
    os.close(r)
    done = [json.loads(x) for x in lines.decode().splitlines()]
    return {"dir": d, "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "done": done}

out = []
if mode == "inject":
    count = trial("count", None, spec["steps"], None)
    out.append(count)
    total = count["done"][-1]["events"]
    for k in range(1, total + 1):
        out.append(dict(trial(f"k{k:04d}", k, spec["steps"], None), kill_at=k))
else:
    rng = random.Random(spec["seed"])
    for t in range(spec["trials"]):
        delay = rng.uniform(spec["min_delay"], spec["max_delay"])
        out.append(dict(trial(f"r{t:03d}", None, 10**6, delay), delay=delay))
print(json.dumps(out))
"""


def _run_helper(spec: dict) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", HELPER, json.dumps(spec)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _assert_equal_state(got, want):
    assert set(got) == set(want)
    assert got["step"] == want["step"] and got["meta"] == want["meta"]
    for key in ("w", "m", "b"):
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def _check_trial(result: dict, n: int) -> dict:
    """The invariants of one killed save loop; returns what was seen (for the outcome counts)."""
    d = pathlib.Path(result["dir"])
    completed = result["done"][-1]["done"] if result["done"] else -1
    seen = {"marker": None, "temporaries": 0, "torn_refused": 0}
    # The marker, when present, verifies (an in-place rewrite never leaves it refused) and names the last completed
    # step or the one being saved (killed after the marker's rename, before the save returned).
    marker = d / "latest"
    if marker.exists():
        step = int(cio.read_verified_text(marker))
        assert step in (completed, completed + 1), (step, completed)
        _assert_equal_state(cio.load_verified(d / f"step_{step}.pt"), state(step, n))
        seen["marker"] = step
    else:
        assert completed == -1
    # Every checkpoint file under a final name is accepted and exact; an overwritten one is the old or the new state.
    for f in d.glob("step_*.pt"):
        step = int(f.stem.split("_")[1])
        assert step <= completed + 1
        _assert_equal_state(cio.load_verified(f), state(step, n))
    if (d / "ckpt.pt").exists():
        got = cio.load_verified(d / "ckpt.pt")
        assert got["step"] in (completed, completed + 1)
        _assert_equal_state(got, state(got["step"], n))
    # A stray temporary is what a torn file would be: put under the final name beside the sidecar, it is refused
    # unless it is complete (then it loads exactly).
    for tmp in d.glob(".*.tmp.*"):
        seen["temporaries"] += 1
        final = tmp.name[1:].split(".tmp.")[0]
        if final.endswith(".sha256") or not (d / (final + ".sha256")).exists():
            continue
        probe = d / "probe"
        probe.mkdir(exist_ok=True)
        (probe / final).write_bytes(tmp.read_bytes())
        (probe / (final + ".sha256")).write_bytes((d / (final + ".sha256")).read_bytes())
        try:
            if final == "latest":
                got_step = int(cio.read_verified_text(probe / final))
                assert got_step in (completed, completed + 1)
            else:
                got = cio.load_verified(probe / final)
                _assert_equal_state(got, state(got["step"], n))
        except cio.CheckpointCorruptError as e:
            assert str(probe / final) in str(e)
            seen["torn_refused"] += 1
    return seen


def test_round_trip_and_sidecar_format(tmp_path):
    obj = state(3, 1000)
    path = tmp_path / "a.pt"
    digest = cio.atomic_save(obj, path)
    # Independent oracle: hashlib over the bytes on disk; the sidecar is one sha256sum line.
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "a.pt.sha256").read_text() == f"{digest}  a.pt\n"
    _assert_equal_state(cio.load_verified(path), obj)
    _assert_equal_state(torch.load(path, weights_only=True), obj)  # still a plain torch.save file
    # Overwrite: the sidecar ends with exactly the new digest, no temporaries are left.
    digest2 = cio.atomic_save(state(4, 1000), path)
    assert (tmp_path / "a.pt.sha256").read_text() == f"{digest2}  a.pt\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "a.pt.sha256"]
    cio.atomic_write_text(tmp_path / "latest", "global_step7")
    assert cio.read_verified_text(tmp_path / "latest") == "global_step7"
    assert (tmp_path / "latest").read_text() == "global_step7"  # readable by tools that know nothing of sidecars
    data = bytes(range(256)) * 3
    cio.atomic_write_bytes(tmp_path / "blob", data)
    assert cio.read_verified_bytes(tmp_path / "blob") == data
    # Streaming: many writes of memoryviews of different sizes; the sidecar is the hash of the concatenation.
    chunks = [torch.arange(n, dtype=torch.int32).numpy().tobytes() for n in (1, 1000, 7, 65536)]
    digest = cio.atomic_write_stream(tmp_path / "stream", lambda f: [f.write(memoryview(c)) for c in chunks])
    assert digest == hashlib.sha256(b"".join(chunks)).hexdigest() == cio.verify_file(tmp_path / "stream")
    assert cio.read_verified_bytes(tmp_path / "stream") == b"".join(chunks)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_flipped_byte_refused(tmp_path, where):
    path = tmp_path / "m.pt"
    cio.atomic_save(state(1, 4096), path)
    raw = bytearray(path.read_bytes())
    i = {"start": 0, "middle": len(raw) // 2, "end": len(raw) - 1}[where]
    raw[i] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(cio.CheckpointCorruptError) as e:
        cio.load_verified(path)
    assert str(path) in str(e.value) and "previous checkpoint" in str(e.value)
    assert isinstance(e.value, ValueError) and e.value.path == str(path)


def test_truncated_refused_naming_the_file(tmp_path):
    path = tmp_path / "m.pt"
    cio.atomic_save(state(1, 4096), path)
    full = path.read_bytes()
    for keep in (0, 1, len(full) // 2, len(full) - 1):
        path.write_bytes(full[:keep])
        with pytest.raises(cio.CheckpointCorruptError, match="truncated or corrupted") as e:
            cio.load_verified(path)
        assert str(path) in str(e.value) and f"({keep} bytes)" in str(e.value)
    text = tmp_path / "latest"
    cio.atomic_write_text(text, "12\n")
    text.write_text("1")
    with pytest.raises(cio.CheckpointCorruptError, match="latest"):
        cio.read_verified_text(text)


def test_missing_or_altered_checksum_refused(tmp_path):
    path = tmp_path / "m.pt"
    cio.atomic_save(state(1, 64), path)
    sidecar = tmp_path / "m.pt.sha256"
    good = sidecar.read_text()
    sidecar.unlink()
    with pytest.raises(cio.CheckpointCorruptError, match=r"m\.pt\.sha256 is missing") as e:
        cio.load_verified(path)
    assert str(path) in str(e.value)
    # torch.save output without a sidecar (not written through checkpoint_io) is refused too, not trusted.
    torch.save(state(1, 64), tmp_path / "plain.pt")
    with pytest.raises(cio.CheckpointCorruptError, match="missing"):
        cio.load_verified(tmp_path / "plain.pt")
    for bad in ("", "zz  m.pt\n", good.replace("m.pt", "other.pt"), good.rstrip("\n"), good[:-10] + "\n"):
        sidecar.write_text(bad)
        with pytest.raises(cio.CheckpointCorruptError, match="malformed") as e:
            cio.load_verified(path)
        assert str(path) in str(e.value)
    digest = good.split()[0]
    flipped = ("0" if digest[0] != "0" else "1") + digest[1:]
    sidecar.write_text(f"{flipped}  m.pt\n")
    with pytest.raises(cio.CheckpointCorruptError, match="mismatch"):
        cio.load_verified(path)
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        cio.load_verified(tmp_path / "nothere.pt")


def test_failed_save_leaves_the_old_file(tmp_path):
    path = tmp_path / "m.pt"
    cio.atomic_save(state(1, 64), path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(Exception):  # noqa: B017  (whatever pickling raises for a lambda)
        cio.atomic_save({"f": lambda: 0}, path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_makedirs_durable(tmp_path):
    target = tmp_path / "a" / "b" / "c"
    cio.makedirs_durable(target)
    assert target.is_dir()
    cio.makedirs_durable(target)  # idempotent


def test_lean_import():
    code = ("import sys, distlion_ds.checkpoint_io; "
            "print(sorted(m for m in ('triton', 'deepspeed', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_kill_at_every_point_of_a_save(tmp_path):
    """SIGKILL at each write / fsync / rename event of a 3-step save loop (one trial per event)."""
    n = 300
    results = _run_helper({"root": str(tmp_path), "n": n, "mode": "inject", "steps": 3})
    count, trials = results[0], results[1:]
    assert not count["killed"] and count["exit"] == 0 and [x["done"] for x in count["done"]] == [0, 1, 2]
    assert len(trials) == count["done"][-1]["events"] >= 60
    markers, torn_refused = {}, 0
    for t in trials:
        assert t["killed"], t
        seen = _check_trial(t, n)
        markers[seen["marker"]] = markers.get(seen["marker"], 0) + 1
        torn_refused += seen["torn_refused"]
    assert torn_refused > 0  # kills inside torch.save left torn temporaries, and each one was refused
    # Kills land in every step: some before any marker, and some with each step's marker in place.
    assert set(markers) == {None, 0, 1, 2}, markers


def test_kill_at_random_times_during_saves(tmp_path):
    """SIGKILL after a random delay while the child saves 2 x 2 MB files and the marker in a loop."""
    n = 256 * 1024
    results = _run_helper({"root": str(tmp_path), "n": n, "mode": "random", "trials": 12, "seed": 9,
                           "min_delay": 0.05, "max_delay": 1.5})
    assert len(results) == 12
    for t in results:
        assert t["killed"], t
        _check_trial(t, n)
    assert sum(t["done"] != [] for t in results) >= 6  # most trials got past their first checkpoint
