"""CLI arguments that look like options or carry shell metacharacters never
reach a Postfix command line: each is refused with a clear error, and the
queue is as it was."""

from conftest import wait_until

HOSTILE = [
    "-d ALL",
    "--", "ALL",
    "customer.test;postsuper -d ALL",
    "customer.test && postsuper -d ALL",
    "$(postsuper -d ALL)",
    "`postsuper -d ALL`",
    "customer.test\n-d ALL",
    "customer.test -d ALL",
    "../../etc/passwd",
    "*",
    "customer.test\x00x",
]


def test_hostile_domain_arguments(stack):
    stack.send(["user@customer.test"])
    wait_until(lambda: len(stack.queue()) == 1, what="held")
    before = stack.queue()
    refused = 0
    for command in ("flush", "purge", "pause", "resume", "status", "return"):
        for arg in HOSTILE:
            if "\x00" in arg:
                continue  # no argv can carry a NUL byte
            extra = ["--yes"] if command == "purge" else []
            proc = stack.flushctl(command, *extra, "--", arg, check=False)
            assert proc.returncode in (1, 2), (command, arg, proc.stdout, proc.stderr)
            assert proc.stderr.startswith("Error:") or "Usage:" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
            refused += 1
    assert stack.queue() == before   # nothing released, deleted or changed
    assert not stack.status("customer.test")[0]["paused"]
    print(f"{refused} hostile domain arguments refused; the queue is untouched")
