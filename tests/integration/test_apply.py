"""`flushctl apply` on a real Postfix instance."""

import hashlib

from conftest import Sink, Stack, default_domains, write_config
from instance import PostfixInstance


def fingerprint(pf):
    etc = pf.config_directory
    files = sorted(p for p in etc.rglob("*") if p.is_file())
    return {str(p.relative_to(etc)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def fresh_stack(tmp_domains=None):
    sink = Sink()
    pf = PostfixInstance.create({"smtpd_milters": "inet:127.0.0.1:8891",
                                 "relay_domains": ""})
    state = pf.root / "state"
    state.mkdir()
    cfg = pf.root / "flushctl.toml"
    write_config(cfg, pf, state, tmp_domains or default_domains(sink.port))
    return Stack(pf=pf, config_path=cfg, state_dir=state, sink=sink)


def test_apply_sets_everything_then_changes_nothing():
    stack = fresh_stack()
    try:
        first = stack.flushctl("apply").stdout
        assert "set relay_domains" in first
        settings = stack.pf.postconf("-n")
        mapdir = stack.pf.config_directory / "flushctl"
        for expected in [
            f"relay_domains = hash:{mapdir}/relay_domains",
            f"transport_maps = hash:{mapdir}/transport",
            "defer_transports = ondemand",
            f"fast_flush_domains = hash:{mapdir}/relay_domains",
            f"relay_recipient_maps = hash:{mapdir}/relay_recipients",
            "milter_default_action = tempfail",
            "enable_long_queue_ids = yes",
            "smtpd_etrn_restrictions = check_policy_service inet:127.0.0.1:"
            f"{stack.cfg.policy_listen.port}, reject",
        ]:
            assert expected in settings, expected
        # the admin's own milter stays, after ours
        milters = [l for l in settings.splitlines() if l.startswith("smtpd_milters")][0]
        assert milters.endswith(", inet:127.0.0.1:8891")
        assert "ondemand" in stack.pf.postconf("-M", "ondemand/unix")
        lookup = stack.pf.run("postmap", "-c", str(stack.pf.config_directory), "-q",
                              "customer.test", f"hash:{mapdir}/transport").stdout.strip()
        assert lookup == f"ondemand:[127.0.0.1]:{stack.sink.port}"

        before = fingerprint(stack.pf)
        second = stack.flushctl("apply").stdout
        assert second.strip() == "nothing to change"
        assert fingerprint(stack.pf) == before
    finally:
        stack.pf.destroy()


def test_apply_reloads_a_running_postfix_and_follows_config_changes():
    stack = fresh_stack()
    try:
        stack.flushctl("apply")
        stack.pf.start()
        write_config(stack.config_path, stack.pf, stack.state_dir,
                     default_domains(stack.sink.port) + '\n[domains."new.test"]\n')
        out = stack.flushctl("apply").stdout
        assert "built map relay_domains" in out
        assert "reloaded postfix" in out
        mapdir = stack.pf.config_directory / "flushctl"
        found = stack.pf.run("postmap", "-c", str(stack.pf.config_directory), "-q", "new.test",
                             f"hash:{mapdir}/relay_domains").stdout.strip()
        assert found == "OK"
    finally:
        stack.pf.destroy()


def test_bad_config_is_named_and_changes_nothing():
    stack = fresh_stack()
    try:
        before = fingerprint(stack.pf)
        stack.config_path.write_text(stack.config_path.read_text()
                                     + '\n[domains."oops.test"]\nquota_messages = "many"\n')
        proc = stack.flushctl("apply", check=False)
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr.startswith(f"Error: {stack.config_path}: ")
        assert 'domains."oops.test".quota_messages' in proc.stderr
        assert fingerprint(stack.pf) == before
    finally:
        stack.pf.destroy()


def test_open_mynetworks_is_refused_before_anything_changes():
    stack = fresh_stack()
    try:
        stack.pf.run("postconf", "-c", str(stack.pf.config_directory), "-e",
                     "mynetworks=0.0.0.0/0")
        before = fingerprint(stack.pf)
        proc = stack.flushctl("apply", check=False)
        assert proc.returncode == 1
        assert "open relay" in proc.stderr
        assert fingerprint(stack.pf) == before
    finally:
        stack.pf.destroy()
