"""The release helper's rules: who may take which role (pure but for the
user and group databases, which here are Debian's own), and its config."""

import pwd

import pytest

from flushctl import config
from flushctl.config import ConfigError
from flushctl.privsep.roles import Peer, refusal

CFG = config.parse("""
[milter]
user = "bin"
[gateway]
user = "nobody"
[poller]
user = "daemon"
[helper]
group = "nogroup"
""", "/etc/flushctl/flushctl.toml")

NOBODY = pwd.getpwnam("nobody").pw_uid
DAEMON = pwd.getpwnam("daemon").pw_uid
BIN = pwd.getpwnam("bin").pw_uid
NOGROUP = 65534


def peer(uid, *groups):
    return Peer(pid=1234, uid=uid, gid=groups[0] if groups else uid,
                groups=frozenset(groups or (uid,)))


@pytest.mark.parametrize("role", ["gateway", "poller", "scrape", "admin"])
def test_root_may_take_any_role(role):
    assert refusal(role, peer(0, 0), CFG) is None


def test_each_daemon_role_belongs_to_its_user_only():
    assert refusal("gateway", peer(NOBODY, NOGROUP), CFG) is None
    assert refusal("poller", peer(DAEMON, 1), CFG) is None
    assert refusal("scrape", peer(DAEMON, 1), CFG) is None
    assert "not [gateway] user" in refusal("gateway", peer(DAEMON, NOGROUP), CFG)
    assert "not [poller] user" in refusal("poller", peer(NOBODY, NOGROUP), CFG)
    assert "not [poller] user" in refusal("scrape", peer(4242, NOGROUP), CFG)


def test_admins_are_the_groups_members_that_run_no_daemon():
    assert refusal("admin", peer(4242, NOGROUP), CFG) is None
    assert refusal("admin", peer(4242, 4242, 100, NOGROUP), CFG) is None  # a supplementary group
    assert "not in group nogroup" in refusal("admin", peer(4242, 4242, 100), CFG)
    for daemon_uid in (NOBODY, DAEMON, BIN):   # gateway, poller, milter
        assert "runs a daemon" in refusal("admin", peer(daemon_uid, NOGROUP), CFG)


def test_a_role_that_does_not_exist_or_a_group_that_does_not():
    assert "no such role" in refusal("root", peer(4242, NOGROUP), CFG)
    missing = config.parse('[helper]\ngroup = "no-such-group-here"\n', "f.toml")
    assert "there is no group" in refusal("admin", peer(4242, NOGROUP), missing)


def test_an_empty_daemon_user_gives_its_role_to_root_only():
    one = config.parse('[gateway]\nuser = ""\n[poller]\nuser = ""\n', "f.toml")
    assert refusal("gateway", peer(NOBODY, NOGROUP), one) is not None
    assert refusal("poller", peer(NOBODY, NOGROUP), one) is not None
    assert refusal("gateway", peer(0, 0), one) is None


def test_helper_config_defaults_and_errors():
    cfg = config.parse("", "f.toml")
    assert (cfg.helper_socket, cfg.helper_group) == ("/run/flushctl/helper.sock", "flushctl")
    cfg = config.parse('[helper]\nsocket = "/run//x/./h.sock"\ngroup = "mx-admins"\n', "f.toml")
    assert (cfg.helper_socket, cfg.helper_group) == ("/run/x/h.sock", "mx-admins")
    with pytest.raises(ConfigError, match=r"f.toml: helper.socket: must be an absolute path"):
        config.parse('[helper]\nsocket = "helper.sock"\n', "f.toml")
    with pytest.raises(ConfigError, match=r"f.toml: helper.group: not a group name"):
        config.parse('[helper]\ngroup = "Bad Group"\n', "f.toml")
    with pytest.raises(ConfigError, match=r"f.toml: helper.user: unknown key"):
        config.parse('[helper]\nuser = "x"\n', "f.toml")


def test_a_helper_whose_backlog_is_full_is_waited_for(tmp_path):
    """A unix socket with a full backlog refuses a connect at once
    (EAGAIN): a starting daemon waits for it as for a helper not yet
    there, rather than giving up at once."""
    import socket
    import time

    from flushctl.privsep import client
    from flushctl.privsep.errors import PrivsepError
    path = tmp_path / "helper.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(0)
    crowd = []
    try:
        while True:   # fill the backlog: nobody accepts
            sock = socket.socket(socket.AF_UNIX)
            sock.setblocking(False)
            try:
                sock.connect(str(path))
            except BlockingIOError:
                sock.close()
                break
            crowd.append(sock)
        cfg = config.parse(f'[helper]\nsocket = "{path}"\n', "f.toml")
        started = time.monotonic()
        with pytest.raises(PrivsepError, match="not running"):
            client.connect(cfg, "admin", wait=1.0)
        assert time.monotonic() - started >= 1.0
    finally:
        for sock in crowd:
            sock.close()
        listener.close()
