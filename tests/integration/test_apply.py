"""`flushctl apply` on a real Postfix instance."""

import hashlib

from conftest import Sink, Stack, default_domains, write_config
from instance import PostfixInstance


def fingerprint(pf):
    """Every file of the instance's config directory but the maps' lock
    (apply takes it before it looks at anything: no setting of Postfix's)."""
    from flushctl.mta.relay_change import LOCK
    etc = pf.config_directory
    files = sorted(p for p in etc.rglob("*") if p.is_file() and p.name != LOCK)
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
            f"fast_flush_domains = hash:{mapdir}/flush_domains",
            f"relay_recipient_maps = hash:{mapdir}/relay_recipients",
            "milter_default_action = tempfail",
            "enable_long_queue_ids = yes",
            "smtpd_etrn_restrictions = check_policy_service unix:private/flushctl-policy, "
            "reject",
        ]:
            assert expected in settings, expected
        # the admin's own milter stays, after ours
        milters = [l for l in settings.splitlines() if l.startswith("smtpd_milters")][0]
        assert milters.endswith(", inet:127.0.0.1:8891")
        # and local submissions meet ours too, never held up by it
        assert f"non_smtpd_milters = {{ unix:{stack.cfg.milter_listen.path}, " \
            "default_action=accept }" in settings
        assert f"header_checks = regexp:{mapdir}/intake" in settings
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


def _state_fingerprint(stack):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in stack.state_dir.iterdir() if p.is_file()}


class InjectedFault(OSError):
    pass


def test_apply_fails_whole_at_every_failure_point(monkeypatch):
    """Every file move and every Postfix command apply makes is failed in
    turn, on a running instance: each time the config directory, the maps and
    our state are exactly as before and Postfix runs the old settings; the
    run that meets no fault applies everything."""
    import os
    import shutil

    from flushctl import config as config_mod

    from flushctl.mta import apply as apply_mod
    from flushctl.mta.commands import Postfix

    stack = fresh_stack()
    stack.pf.start()
    try:
        cfg = config_mod.load(str(stack.config_path))
        real = {"replace": os.replace, "link": os.link, "copy2": shutil.copy2,
                "_run": Postfix._run}
        calls = {"n": 0, "fail_at": 0, "failed": None}

        def faulty(name):
            def call(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == calls["fail_at"]:
                    what = args[1][0].rsplit("/", 1)[-1] + " " + args[1][-1] \
                        if name == "_run" else f"{name} {args[-1]}"
                    calls["failed"] = what
                    raise InjectedFault(f"injected fault at call {calls['n']}: {what}")
                return real[name](*args, **kwargs)
            return call

        monkeypatch.setattr(os, "replace", faulty("replace"))
        monkeypatch.setattr(os, "link", faulty("link"))
        monkeypatch.setattr(shutil, "copy2", faulty("copy2"))
        monkeypatch.setattr(Postfix, "_run", faulty("_run"))

        before, state_before = fingerprint(stack.pf), _state_fingerprint(stack)
        points = []
        for k in range(1, 200):
            calls.update(n=0, fail_at=k, failed=None)
            try:
                report = apply_mod.apply(cfg)
            except Exception as exc:  # noqa: BLE001 - the fault may surface as any error
                assert calls["failed"], f"apply failed with no fault injected: {exc}"
                assert "injected fault" in str(exc), exc
                points.append(calls["failed"])
                assert fingerprint(stack.pf) == before, f"half-applied after {calls['failed']}"
                assert _state_fingerprint(stack) == state_before, calls["failed"]
                assert stack.pf.run("postfix", "-c", str(stack.pf.config_directory),
                                    "status", check=False).returncode == 0, calls["failed"]
                continue
            assert calls["failed"] is None
            break
        else:
            raise AssertionError("apply never got through")
        monkeypatch.undo()
        print(f"apply failed at each of {len(points)} points, nothing changed each time: "
              + ", ".join(points))
        assert len(points) > 20 and any("reload" in p for p in points)
        assert any("main.cf" in p for p in points) and any(".db" in p for p in points)
        # the run without a fault applied it all, and Postfix runs it
        assert report.reloaded and "relay_domains" in report.changed_params
        assert "defer_transports = ondemand" in stack.pf.postconf("-n")
        assert not [p for p in stack.pf.config_directory.rglob("*")
                    if p.name.endswith((".flushctl-old", ".flushctl-new"))]
        stack.pf.run("postfix", "-c", str(stack.pf.config_directory), "status")
    finally:
        stack.pf.destroy()
