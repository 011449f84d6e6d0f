"""Fuzzing the two parsers that read what strangers send: the finger query
line and the policy request (ETRN). Tens of thousands of inputs, seeded
(a failure names its seed), built from valid requests by mutation and
from raw bytes; every outcome must be one the gateway handles.

    FLUSHCTL_FUZZ=200000 tests/run tests/fuzz     # a longer run
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from flushctl import names

from flushctl.protocols import finger

from flushctl.protocols import smtpd_policy
from flushctl.gateway.gate import ALLOWED, Gate
from flushctl.gateway.replies import etrn_action
from flushctl.heldmail.outcome import NOTHING, Outcome

COUNT = int(os.environ.get("FLUSHCTL_FUZZ", "30000"))
SEED = int(os.environ.get("FLUSHCTL_FUZZ_SEED", "1985"))

FINGER_SEEDS = [b"customer.example\r\n", b"/W customer.example\r\n", b"?customer.example\r\n",
                b"\r\n", b"x@y\r\n", "bücher.example\r\n".encode(), b"CUSTOMER.EXAMPLE.\r\n", b"/w\r\n"]
POLICY_SEED = (b"request=smtpd_access_policy\nprotocol_state=ETRN\nprotocol_name=ESMTP\n"
               b"client_address=192.0.2.7\nclient_name=client.example\n"
               b"etrn_domain=customer.example\ninstance=1a2b.3c4d\n")
ALPHABET = b"\x00\r\n\t =@#/.:-_\xff\xc3\xa9aZ9\x7f"


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if op == 0:
            data[pos:pos] = bytes([rng.choice(ALPHABET)]) * rng.choice((1, 1, 2, 64, 600))
        elif op == 1 and data:
            del data[pos:pos + rng.randint(1, 10)]
        elif op == 2 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 3:
            data[pos:pos] = rng.randbytes(rng.randint(1, 20))
        else:
            data = data * rng.choice((2, 50))
        del data[100_000:]   # 100 KB lines at most, as a hostile client might send
    return bytes(data)


def check_finger_line(line: bytes) -> str:
    """Parse one finger query line; every outcome must be one the gateway handles."""
    query = finger.parse(line)
    assert query.kind in (finger.EMPTY, finger.DOMAIN, finger.REPORT, finger.FORWARD,
                          finger.INVALID)
    if query.kind in (finger.DOMAIN, finger.REPORT):
        assert names.domain(query.domain) == query.domain     # canonical, ASCII
        assert query.domain.isascii() and len(query.domain) <= 253
    reply = finger.lines_to_bytes([finger.NOT_SERVED.format(domain=query.domain)])
    assert b"\n" not in reply[:-2]                             # one line, always
    return query.kind


def check_policy_block(block: bytes, gate: Gate) -> str:
    """Parse one policy request; 'refused', 'parsed' or 'etrn' (an ETRN request)."""
    try:
        request = smtpd_policy.parse(block)
    except smtpd_policy.ProtocolError:
        return "refused"
    assert len(request.attrs) <= smtpd_policy.MAX_ATTRIBUTES
    if request.state != "ETRN":
        return "parsed"
    try:
        domain = names.wire_domain(request.etrn_domain)
    except ValueError:
        return "etrn"
    assert names.domain(domain) == domain
    # an unknown domain is never allowed, whatever the client address says
    assert gate.check(request.client_address, domain, 0.0) != ALLOWED
    action = etrn_action(domain, Outcome(NOTHING, 0, "", "", None))
    assert smtpd_policy.answer(action).count(b"\n") == 2
    return "etrn"


def empty_gate() -> Gate:
    return Gate({}, per_minute=60, burst=30)


def test_finger_parser_fuzz():
    rng = random.Random(SEED)
    kinds = {}
    for n in range(COUNT):
        line = (mutate(rng, rng.choice(FINGER_SEEDS)) if n % 4
                else rng.randbytes(rng.randint(0, 700)))
        kind = check_finger_line(line)
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"finger: {COUNT} fuzzed lines (seed {SEED}): {dict(sorted(kinds.items()))}")
    assert kinds.get(finger.DOMAIN) and kinds.get(finger.INVALID)


def test_policy_parser_fuzz():
    rng = random.Random(SEED + 1)
    gate = empty_gate()
    counts = {"refused": 0, "parsed": 0, "etrn": 0}
    for n in range(COUNT):
        block = mutate(rng, POLICY_SEED) if n % 4 else rng.randbytes(rng.randint(0, 2000))
        counts[check_policy_block(block, gate)] += 1
    refused, etrn = counts["refused"], counts["etrn"]
    parsed = counts["parsed"] + etrn
    print(f"policy: {COUNT} fuzzed requests (seed {SEED + 1}): {parsed} parsed "
          f"({etrn} ETRN), {refused} refused as not the protocol")
    assert parsed and refused and etrn


@pytest.mark.parametrize("target", ["finger", "policy"])
def test_coverage_guided_fuzz(target, tmp_path):
    """atheris (libFuzzer) from the valid requests as seeds, COUNT runs."""
    pytest.importorskip("atheris")
    seeds = FINGER_SEEDS if target == "finger" else [POLICY_SEED, POLICY_SEED + b"\n"]
    for n, seed in enumerate(seeds):
        (tmp_path / f"seed{n}").write_bytes(seed)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("coverage_guided.py")), target,
         str(tmp_path), f"-runs={COUNT}", f"-seed={SEED}", "-max_len=4096",
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [line for line in proc.stderr.splitlines() if line.startswith("Done ")]
    last = [line for line in proc.stderr.splitlines() if "cov:" in line][-1]
    print(f"{target}: coverage-guided (atheris, seed {SEED}): {done[0] if done else '?'}; "
          f"{last.split('#', 1)[-1].strip()}")
    assert done
