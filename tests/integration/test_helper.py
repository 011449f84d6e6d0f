"""Issue 15, item 4: the release helper is the one daemon that keeps root,
and the kernel, not the asker, says who may ask it for what.

Clients that are not root run as forked children of the test that give up
root for good before they act (this machine's Python lives where only root
may read, so a fresh non-root interpreter cannot start; what runs after
the fork is the same CLI and client code)."""

import json
import os
import socket
import stat
import tempfile

import pytest

from conftest import wait_until

# imported now: after the fork the child may no longer read the library
import click.testing  # noqa: F401
import flushctl.cli.main
import flushctl.config
import flushctl.privsep.helper  # noqa: F401  what `flushctl flush` imports
import flushctl.heldmail.library  # noqa: F401
import flushctl.privsep.client
import flushctl.privsep.errors
import flushctl.privsep.wire  # noqa: F401

NOGROUP = 65534    # the helper's group in the test stacks ([helper] group = "nogroup")
ADMIN = 4242       # no passwd entry: a member of the group by its gid
OUTSIDER = 4243


def as_user(uid: int, gid: int, groups: list[int], fn):
    """Run ``fn()`` in a child that is ``uid``/``gid``/``groups`` for good;
    what it returns (JSON-able), or ("raised", text)."""
    out = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                result = fn()
            except BaseException as exc:   # noqa: BLE001 the parent asserts on it
                result = ["raised", f"{type(exc).__name__}: {exc}"]
            out.write(json.dumps(result).encode())
            out.flush()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    out.seek(0)
    return json.loads(out.read())


def cli_as(uid, gid, groups, config, *args):
    """`flushctl ARGS` as that user: (exit code, stdout, stderr)."""
    def run():
        from click.testing import CliRunner
        result = CliRunner().invoke(
            flushctl.cli.main.main, ["--config", str(config), *args])
        return [result.exit_code, result.stdout, result.stderr]
    return as_user(uid, gid, groups, run)


def hello_as(uid, gid, groups, cfg, role):
    """Ask the helper for ``role`` as that user: "ok" or why not."""
    def run():
        try:
            flushctl.privsep.client.connect(cfg, role).close()
            return "ok"
        except flushctl.privsep.errors.PrivsepError as exc:
            return str(exc)
    return as_user(uid, gid, groups, run)


@pytest.fixture
def stack(make_stack):
    stack = make_stack()
    stack.start_helper()
    return stack


def test_the_helper_socket_is_roots_and_its_groups_only(stack):
    path = stack.cfg.helper_socket
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, NOGROUP, 0o660)
    parent = os.stat(os.path.dirname(path))
    assert parent.st_uid == 0 and not parent.st_mode & 0o022
    assert stack.helper is not None and stack.helper.poll() is None
    # one helper per socket: a second one refuses to start, the first goes on
    second = stack.flushctl("helper", check=False, timeout=30)
    assert second.returncode == 1 and "another helper already listens" in second.stderr
    assert stack.helper.poll() is None
    assert hello_as(0, 0, [], stack.cfg, "admin") == "ok"


def test_a_non_root_admin_in_the_group_releases_through_the_helper(stack):
    """`flushctl flush` by a member of [helper] group who is not root: the
    helper releases (the same outcome and output as root's), and --wait
    waits through it."""
    stack.send(["u@customer.test"])
    stack.send(["v@customer.test"])
    wait_until(lambda: len(stack.queue()) == 2, what="held")
    stack.sink.start()
    code, out, err = cli_as(ADMIN, OUTSIDER, [NOGROUP], stack.config_path,
                            "flush", "--wait", "--timeout", "60", "customer.test")
    assert code == 0, (out, err)
    assert f"customer.test: released 2 message(s) to 127.0.0.1:{stack.sink.port}" in out
    assert out.rstrip().endswith("customer.test: nothing held")
    assert len(stack.sink.messages()) == 2
    [row] = stack.status("customer.test")
    assert row["last_flush_trigger"] == "admin"
    assert f"event=connect role=admin uid={ADMIN}" in stack.daemon_log("helper")
    # nothing held now: said so, exit 0
    code, out, _ = cli_as(ADMIN, NOGROUP, [], stack.config_path, "flush", "customer.test")
    assert (code, out.strip()) == (0, "customer.test: nothing held")


def test_the_helpers_answers_keep_the_documented_exit_codes(stack):
    """Paused and unreachable, asked through the helper: exit 4 and 3, as
    for root; an unknown domain is refused before anything is asked."""
    stack.send(["u@customer.test"])
    wait_until(lambda: len(stack.queue()) == 1, what="held")
    stack.flushctl("pause", "customer.test")
    code, _, err = cli_as(ADMIN, NOGROUP, [], stack.config_path, "flush", "customer.test")
    assert code == 4 and "paused" in err
    stack.flushctl("resume", "customer.test")
    code, _, err = cli_as(ADMIN, NOGROUP, [], stack.config_path, "flush", "customer.test")
    assert code == 3, err       # smtp-sink not started: the server does not answer
    assert stack.queue()[0]["queue_name"] == "hold"
    code, _, err = cli_as(ADMIN, NOGROUP, [], stack.config_path, "flush", "nowhere.test")
    assert code == 1 and "not a configured domain" in err


def test_who_may_ask_is_what_the_kernel_says(stack):
    """A local user outside the group cannot even connect; a member cannot
    take a daemon's role; a daemon's user cannot take the admin's, nor
    release as an admin; nothing is released by any of them."""
    cfg = stack.cfg
    stack.send(["u@customer.test"])
    wait_until(lambda: len(stack.queue()) == 1, what="held")
    stack.sink.start()
    refused = hello_as(OUTSIDER, OUTSIDER, [], cfg, "admin")
    assert "may not use the release helper" in refused, refused
    code, _, err = cli_as(OUTSIDER, OUTSIDER, [], stack.config_path, "flush", "customer.test")
    assert code == 1 and "may not use the release helper" in err
    for role in ("gateway", "poller", "scrape"):
        answer = hello_as(ADMIN, NOGROUP, [], cfg, role)
        assert "refused" in answer and "user" in answer, (role, answer)
    # nobody is the gateway's and the poller's user here
    assert hello_as(65534, NOGROUP, [], cfg, "gateway") == "ok"
    assert hello_as(65534, NOGROUP, [], cfg, "poller") == "ok"
    answer = hello_as(65534, NOGROUP, [], cfg, "admin")
    assert "runs a daemon" in answer, answer
    code, _, err = cli_as(65534, NOGROUP, [], stack.config_path, "flush", "customer.test")
    assert code == 1 and "runs a daemon" in err
    assert hello_as(ADMIN, NOGROUP, [], cfg, "root") != "ok"
    assert stack.queue()[0]["queue_name"] == "hold" and stack.sink.started() == 0
    log = stack.daemon_log("helper")
    assert "event=refused role=admin uid=65534" in log


def test_an_admin_asks_only_what_an_admin_asks(stack):
    """Over an admin's connection: a poller's or a gateway's request, or
    garbage, ends that connection; a wrong domain is answered with an
    error; the helper goes on serving."""
    cfg = stack.cfg

    def talk(*lines):
        replies = []
        with flushctl.privsep.client.connect(cfg, "admin") as sock, sock.makefile("rb") as f:
            for line in lines:
                try:
                    sock.sendall(line.encode() + b"\n")
                    reply = f.readline()
                except (BrokenPipeError, ConnectionResetError):
                    reply = b""
                replies.append(json.loads(reply) if reply else None)
        return replies

    assert talk('{"op": "flush", "domain": "elsewhere.test"}')[0]["error"].endswith(
        "not a configured domain")
    for hostile in ('{"op": "candidates"}', '{"op": "metrics"}',
                    '{"id": 1, "domain": "customer.test", "trigger": "finger", "client": "unknown"}',
                    '{"op": "flush", "domain": "customer.test", "trigger": "peer"}',
                    "not json"):
        assert talk(hostile, '{"op": "wait", "domain": "customer.test"}') == [None, None], \
            hostile
    assert talk('{"op": "wait", "domain": "customer.test"}') == [
        {"present": 0, "verdict": True}]
    # a client that says nothing is hung up on; the helper is still there
    with socket.socket(socket.AF_UNIX) as idle:
        idle.connect(cfg.helper_socket)
        idle.settimeout(30)
        assert idle.recv(10) == b""
    assert stack.helper.poll() is None


def test_no_role_crowds_out_the_others(stack):
    """Each role has room of its own, and a uid's silent connections are
    few: the poller's user holding all it may, or a member opening
    connections that say nothing, leaves the admin and the gateway served."""
    cfg = stack.cfg
    held = [flushctl.privsep.client.connect(cfg, "poller") for _ in range(2)]
    held += [flushctl.privsep.client.connect(cfg, "scrape") for _ in range(2)]
    with pytest.raises(flushctl.privsep.errors.PrivsepError, match="2 poller connections already"):
        flushctl.privsep.client.connect(cfg, "poller")
    silent = []
    for _ in range(20):    # as root: its own 8 silent ones, then hung up on at once
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(cfg.helper_socket)
        silent.append(sock)
    silent[-1].settimeout(10)
    assert silent[-1].recv(10) == b""
    assert hello_as(ADMIN, NOGROUP, [], cfg, "admin") == "ok"
    assert hello_as(65534, NOGROUP, [], cfg, "gateway") == "ok"
    for sock in held + silent:
        sock.close()
    wait_until(lambda: hello_as(65534, NOGROUP, [], cfg, "poller") == "ok", 15,
               what="the poller's room free again")


def test_the_helper_goes_on_after_running_out_of_file_descriptors(stack):
    """accept() failing (EMFILE) is logged and the helper accepts again
    once descriptors are free: not a helper that looks alive and answers
    nobody."""
    import psutil
    wait_until(lambda: "event=start socket=" in stack.daemon_log("helper"), 15,
               what="the helper serving")
    proc = psutil.Process(stack.helper.pid)
    soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
    proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds() + 2, hard))
    crowd = []
    try:
        for _ in range(8):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(stack.cfg.helper_socket)
            crowd.append(sock)
        wait_until(lambda: "stage=accept" in stack.daemon_log("helper"), 15,
                   what="the failed accept logged")
    finally:
        for sock in crowd:
            sock.close()
        proc.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    wait_until(lambda: hello_as(ADMIN, NOGROUP, [], stack.cfg, "admin") == "ok", 20,
               what="served again")
    assert stack.helper.poll() is None


def test_the_socket_directory_is_reachable_whatever_the_umask(stack):
    """A helper started under a tight umask (systemd's UMask=0027) makes
    the directory of its socket searchable, so the group reaches it."""
    import subprocess
    import sys
    cfg_text = stack.config_path.read_text()
    other = stack.state_dir.parent / "run2" / "deeper" / "helper.sock"
    path = stack.state_dir.parent / "umask.toml"
    path.write_text(cfg_text.replace(stack.cfg.helper_socket, str(other)))
    proc = subprocess.Popen(["sh", "-c", 'umask 027; exec "$@"', "sh", sys.executable, "-m",
                             "flushctl", "--config", str(path), "helper"],
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_until(lambda: os.path.exists(other), 15, what="the second helper's socket")
        assert stat.S_IMODE(os.stat(other.parent).st_mode) == 0o755
        cfg = flushctl.config.load(str(path))
        assert hello_as(ADMIN, NOGROUP, [], cfg, "admin") == "ok"
    finally:
        proc.terminate()
        proc.wait(15)


def test_the_gateways_listeners_go_to_the_gateways_user_only(stack):
    """The helper binds the gateway's finger and policy sockets as root and
    sends them with its answer to the gateway's role; another local user
    asking for that role gets a refusal and no socket."""
    cfg = stack.cfg

    def ask():
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(cfg.helper_socket)
        sock.sendall(b'{"role": "gateway"}\n')
        data, names = b"", []
        while not data.endswith(b"\n"):
            chunk, fds, _, _ = socket.recv_fds(sock, 4096, 8)
            for fd in fds:
                with socket.socket(fileno=fd) as got:
                    names.append(got.getsockname())
            if not chunk:
                break
            data += chunk
        return [json.loads(data), names]

    for uid, groups in ((OUTSIDER, []), (ADMIN, [NOGROUP])):
        reply, names = as_user(uid, NOGROUP, groups, ask)
        assert "error" in reply and names == [], (uid, reply, names)
    reply, names = as_user(65534, NOGROUP, [], ask)
    assert reply["role"] == "gateway", reply
    assert names == [[cfg.finger_listen.host, cfg.finger_listen.port],
                     cfg.policy_listen.path], names


def test_a_gateway_that_shuts_its_listeners_spoils_them_for_no_one(stack):
    """The gateway holds the very sockets the helper keeps (SCM_RIGHTS
    shares them): one that shuts them down (taken over, or buggy) stops
    them for the helper too. The next gateway the helper grants gets
    sockets bound anew, that take connections."""
    cfg = stack.cfg

    def finger_and_policy_take_connections():
        try:
            with socket.create_connection((cfg.finger_listen.host, cfg.finger_listen.port), 5):
                pass
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(cfg.policy_listen.path)
            return True
        except OSError:
            return False

    def spoil():
        sock, listeners = flushctl.privsep.client.connect_gateway(cfg)
        for listener in listeners:
            listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        sock.close()
        return "spoiled"

    def take():
        sock, listeners = flushctl.privsep.client.connect_gateway(cfg)
        for listener in listeners:
            listener.close()
        sock.close()
        return "taken"

    assert as_user(65534, NOGROUP, [], take) == "taken"
    assert finger_and_policy_take_connections()
    assert as_user(65534, NOGROUP, [], spoil) == "spoiled"
    assert not finger_and_policy_take_connections()
    assert as_user(65534, NOGROUP, [], take) == "taken"
    assert finger_and_policy_take_connections()
    assert "event=rebind for=gateway" in stack.daemon_log("helper")
    # root may take the gateway's role (to ask), but is sent no listener
    with flushctl.privsep.client.connect(cfg, "gateway"):
        pass
    try:
        flushctl.privsep.client.connect_gateway(cfg)
        raise AssertionError("root was sent the gateway's listeners")
    except flushctl.privsep.errors.PrivsepError as exc:
        assert "sent 0 listening sockets" in str(exc)
