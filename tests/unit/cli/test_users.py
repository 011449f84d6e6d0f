"""`flushctl user add/passwd/del/list`: on a real store in tmp_path, as root.

The store refuses any file not root's, so these tests run as root (as the
unit tests do here), except the one that checks a non-root admin is
refused; it drops to nobody in a child process when it can.
"""

import calendar
import json
import os
import pty
import select
import sys
import time

import pytest
from click.testing import CliRunner

from flushctl.cli.main import main
from flushctl.logins import store
from flushctl.logins.passwords import verify_plain

ROOT = os.geteuid() == 0
as_root = pytest.mark.skipif(not ROOT, reason="the store is root's: run as root")


@pytest.fixture
def cfg(tmp_path):
    os.mkdir(tmp_path / "state")
    path = tmp_path / "flushctl.toml"
    path.write_text(f'[state]\ndirectory = "{tmp_path / "state"}"\n[odmr]\n'
                    '[domains."a.example"]\nusers = ["cust1", "shared"]\nodmr = true\n'
                    '[domains."b.example"]\nusers = ["shared"]\n')
    return str(path)


def logins_path(cfg):
    return os.path.join(os.path.dirname(cfg), "state", "logins")


def run(cfg, *args, input=None):
    result = CliRunner().invoke(main, ["--config", cfg, *args], input=input)
    return result.exit_code, result.stdout, result.stderr


def listed(cfg):
    code, out, err = run(cfg, "user", "list", "--json")
    assert (code, err) == (0, "")
    return json.loads(out)


@as_root
def test_add_reads_one_line_from_stdin(cfg):
    code, out, err = run(cfg, "user", "add", "cust1", input="s3cret pw\n")
    assert (code, out, err) == (0, "cust1: added\n", "")
    assert verify_plain(store.load(logins_path(cfg)), "cust1", "s3cret pw")


@as_root
def test_add_without_a_newline_and_with_crlf(cfg):
    assert run(cfg, "user", "add", "cust1", input="no newline")[0] == 0
    assert run(cfg, "user", "add", "shared", input="crlf\r\n")[0] == 0
    logins = store.load(logins_path(cfg))
    assert verify_plain(logins, "cust1", "no newline") and verify_plain(logins, "shared", "crlf")


@as_root
@pytest.mark.parametrize("stdin, message", [
    ("", "the password on standard input is empty"),
    ("\n", "the password on standard input is empty"),
    ("one\ntwo\n", "exactly one line"),
    ("nul\0byte\n", "CR, LF or NUL"),
    ("x" * 201 + "\n", "at most 200"),
])
def test_a_bad_password_on_stdin_is_refused(cfg, stdin, message):
    code, out, err = run(cfg, "user", "add", "cust1", input=stdin)
    assert code == 1 and out == ""
    assert err.startswith("Error: ") and message in err
    assert not os.path.exists(logins_path(cfg))


@as_root
def test_add_refuses_a_user_that_exists(cfg):
    run(cfg, "user", "add", "cust1", input="first\n")
    code, out, err = run(cfg, "user", "add", "cust1", input="second\n")
    assert code == 1 and out == ""
    assert "Error: cust1: there is a user of that name already" in err
    assert verify_plain(store.load(logins_path(cfg)), "cust1", "first")


@as_root
def test_add_warns_of_a_user_no_domain_names(cfg):
    code, out, err = run(cfg, "user", "add", "loner", input="pw\n")
    assert (code, out) == (0, "loner: added\n")
    assert err.startswith("Warning: no domain names loner in its users")


@as_root
@pytest.mark.parametrize("name", ["-rf", "a b", "x" * 65, ".hidden"])
def test_a_bad_user_name_is_refused(cfg, name):
    code, out, err = run(cfg, "user", "add", "--", name, input="pw\n")
    assert code == 1 and out == "" and "Error: not a login name" in err


@as_root
def test_passwd_changes_the_password_and_refuses_a_missing_user(cfg):
    run(cfg, "user", "add", "cust1", input="first\n")
    code, out, err = run(cfg, "user", "passwd", "cust1", input="second\n")
    assert (code, out, err) == (0, "cust1: password changed\n", "")
    logins = store.load(logins_path(cfg))
    assert verify_plain(logins, "cust1", "second") and not verify_plain(logins, "cust1", "first")
    code, out, err = run(cfg, "user", "passwd", "ghost", input="pw\n")
    assert code == 1 and "Error: ghost: no such user" in err
    code, out, err = run(cfg, "user", "passwd", "cust1", input="")
    assert code == 1 and "empty" in err


@as_root
def test_del_refuses_a_missing_user_and_warns_of_domains_that_name_it(cfg):
    run(cfg, "user", "add", "shared", input="pw\n")
    code, out, err = run(cfg, "user", "del", "shared")
    assert (code, out) == (0, "shared: deleted\n")
    assert err.startswith("Warning: shared is still in the users of a.example, b.example")
    code, out, err = run(cfg, "user", "del", "shared")
    assert code == 1 and out == "" and "Error: shared: no such user" in err


@as_root
def test_list_json_has_every_user_of_store_and_config_and_no_secret(cfg):
    assert listed(cfg) == [
        {"user": "cust1", "domains": ["a.example"], "has_password": False, "changed": None},
        {"user": "shared", "domains": ["a.example", "b.example"], "has_password": False,
         "changed": None},
    ]
    before = int(time.time())
    run(cfg, "user", "add", "cust1", input="TopSecret\n")
    run(cfg, "user", "add", "zed", input="TopSecret\n")
    rows = {r["user"]: r for r in listed(cfg)}
    assert sorted(rows) == ["cust1", "shared", "zed"]
    assert rows["cust1"]["has_password"] is True and rows["zed"]["domains"] == []
    changed = calendar.timegm(time.strptime(rows["cust1"]["changed"], "%Y-%m-%dT%H:%M:%SZ"))
    assert before <= changed <= time.time()
    assert rows["shared"]["changed"] is None
    code, out, _ = run(cfg, "user", "list")
    assert code == 0 and out.splitlines()[0].split() == ["USER", "PASSWORD", "CHANGED", "DOMAINS"]
    for text in (out, json.dumps(rows)):
        assert "TopSecret" not in text and "VG9wU2VjcmV0" not in text and "scrypt" not in text


@as_root
def test_list_says_a_store_others_may_read_is_refused(cfg):
    run(cfg, "user", "add", "cust1", input="pw\n")
    os.chmod(logins_path(cfg), 0o644)
    code, out, err = run(cfg, "user", "list", "--json")
    assert code == 1 and out == ""
    assert "plaintext-equivalent" in err and "chmod 600" in err


def test_not_root_is_refused(cfg):
    """As nobody (a child that drops root when the tests run as root)."""
    if not ROOT:
        code, out, err = run(cfg, "user", "list", "--json")
    else:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child: drop root, run, report, leave without cleanup
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                result = run(cfg, "user", "list", "--json")
                os.write(write, json.dumps(result).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as fh:
            code, out, err = json.loads(fh.read() or "[null, null, null]")
        os.waitpid(pid, 0)
    assert code == 1 and out == ""
    assert err.startswith("Error: must be run as root")


@as_root
def test_on_a_terminal_the_password_is_asked_twice_hidden(cfg):
    pid, fd = pty.fork()
    if pid == 0:   # the child: the pty is its terminal
        os.execv(sys.executable, [sys.executable, "-m", "flushctl", "--config", cfg,
                                  "user", "add", "cust1"])
    seen = b""

    def expect(what: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 30
        while what not in seen and time.monotonic() < deadline:
            if select.select([fd], [], [], 1)[0]:
                try:
                    seen += os.read(fd, 1024)
                except OSError:
                    break
        assert what in seen, seen

    expect(b"Password: ")
    os.write(fd, b"typed pw\n")
    expect(b"Repeat for confirmation: ")
    os.write(fd, b"typed pw\n")
    expect(b"cust1: added")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"typed pw" not in seen   # not echoed
    assert verify_plain(store.load(logins_path(cfg)), "cust1", "typed pw")
