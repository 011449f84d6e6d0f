"""`flushctl apply`: make the Postfix instance serve the configured domains.

Order of work, so that nothing half-done ever goes live:
1. read the instance and compute the plan (pure, ``settings.plan``);
2. stage main.cf and master.cf in a scratch copy of the config directory,
   apply the changes there and run ``postfix check`` on the copy;
3. only then build the maps under temporary names (postmap), and move
   maps, main.cf, master.cf and our applied.json into place, each old file
   kept aside under a hard link;
4. reload Postfix if it runs.
If any step of 3 or 4 fails, every old file is put back (and Postfix
reloaded with them if the new ones had been loaded): an apply happens
whole or not at all. A killed apply is completed by the next one, which
starts from what it finds.
A second apply with the same config finds nothing to change.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace

from flushctl.heldmail import holdtag

from flushctl.mta import settings
from flushctl.config import Config
from flushctl.mta.commands import Postfix, PostfixError
from flushctl.mta import relays
from flushctl.mta.milter_access import prepare_milter
from flushctl.mta.relay_change import RelayChangeError, applied, maps_lock, stage_digest
from flushctl.mta.removed_domains import held_removed, refuse_removed, settle_removed

STATE_FILE = "applied.json"
MANAGED = ("queue_directory", "mynetworks", "smtpd_relay_restrictions")


class ApplyError(Exception):
    pass


@dataclass
class ApplyReport:
    changed_params: dict[str, str] = field(default_factory=dict)
    services: list[str] = field(default_factory=list)
    removed_services: list[str] = field(default_factory=list)
    maps: list[str] = field(default_factory=list)
    reloaded: bool = False
    dry_run: bool = False
    removed_domains: list[str] = field(default_factory=list)   # what became of their mail

    @property
    def changed(self) -> bool:
        return bool(self.changed_params or self.services or self.removed_services or self.maps)

    def lines(self) -> list[str]:
        verb = "would set" if self.dry_run else "set"
        out = [f"{verb} {k} = {v}" for k, v in self.changed_params.items()]
        out += [f"{'would write' if self.dry_run else 'wrote'} master.cf: {entry}"
                for entry in self.services]
        out += [f"{'would remove' if self.dry_run else 'removed'} master.cf: {key}"
                for key in self.removed_services]
        out += [f"{'would build' if self.dry_run else 'built'} map {m}" for m in self.maps]
        if self.reloaded:
            out.append("reloaded postfix")
        out += self.removed_domains
        return out or ["nothing to change"]


def _mail_owner_uid(pf: Postfix) -> int | None:
    """The uid that owns queue files (and so requeued mail in maildrop)."""
    import pwd
    try:
        return pwd.getpwnam(pf.get("mail_owner")["mail_owner"]).pw_uid
    except (KeyError, PostfixError):
        return None


def _smtpd_chrooted(services: dict[str, str]) -> bool:
    """Whether any smtpd (listening itself, or behind postscreen as a ``pass``
    service) is chrooted: then smtpd_milters must name the socket relative
    to the queue directory."""
    for entry in services.values():
        fields = entry.split()
        if fields[1] in ("inet", "pass") and fields[7] == "smtpd" and fields[4] == "y":
            return True
    return False


def _cleanup_chrooted(services: dict[str, str]) -> bool:
    """Whether the cleanup service (which connects to non_smtpd_milters) is chrooted."""
    entry = services.get("cleanup/unix", "").split()
    return len(entry) > 4 and entry[4] == "y"


def _applied(config: Config) -> dict:
    try:
        with open(os.path.join(config.state_directory, STATE_FILE)) as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return {}


def _previous(config: Config) -> tuple[set[str], frozenset[str]]:
    """What the last apply owned: list entries, and master.cf services."""
    data = _applied(config)
    return set(data.get("ours", [])), frozenset(data.get("services", []))


def _write_ours(config: Config, plan: settings.Plan, kept: list[str]) -> str:
    """applied.json's new text under a temporary name; returns that name."""
    os.makedirs(config.state_directory, mode=0o750, exist_ok=True)
    # a new name of its own (O_EXCL): the milter's group may write this
    # directory, and a fixed name could be its link to a file of root's
    fd, tmp = tempfile.mkstemp(prefix=STATE_FILE + ".", suffix=".tmp",
                               dir=config.state_directory)
    with os.fdopen(fd, "w") as fh:
        json.dump({"ours": plan.ours, "services": plan.our_services,
                   "kept_removed": sorted(kept)}, fh)
    return tmp


def _save_ours(config: Config, plan: settings.Plan, kept: list[str]) -> None:
    os.replace(_write_ours(config, plan, kept),
               os.path.join(config.state_directory, STATE_FILE))


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _changed_maps(config: Config, maps: dict[str, str]) -> list[str]:
    directory = settings.map_dir(config)
    changed = []
    for name, text in maps.items():
        path = os.path.join(directory, name)
        if _read(path) != text or (name in settings.HASH_MAPS
                                   and not os.path.exists(path + ".db")):
            changed.append(name)
    return changed


class _Swap:
    """Files moved into place with the old ones kept aside, all undone on failure.

    Each ``put`` hard-links the current file to ``NAME.flushctl-old`` before
    renaming the new one over it; ``undo`` puts every old file back (and
    removes files that did not exist before); ``commit`` drops the old ones.
    """

    SUFFIX = ".flushctl-old"

    def __init__(self) -> None:
        self.done: list[tuple[str, str | None]] = []

    def put(self, new: str, target: str) -> None:
        backup = None
        if os.path.exists(target):
            backup = target + self.SUFFIX
            if os.path.lexists(backup):
                os.unlink(backup)
            os.link(target, backup)
        self.done.append((target, backup))
        os.replace(new, target)

    def undo(self) -> list[str]:
        """Put the old files back; returns what could not be restored."""
        failed = []
        for target, backup in reversed(self.done):
            try:
                if backup and os.path.exists(target) and os.path.samefile(backup, target):
                    os.unlink(backup)   # never replaced (rename of two links is a no-op)
                elif backup:
                    os.replace(backup, target)
                elif os.path.lexists(target):
                    os.unlink(target)
            except OSError as exc:
                failed.append(f"{target}: {exc}")
        self.done.clear()
        return failed

    def commit(self) -> None:
        for _, backup in self.done:
            if backup and os.path.lexists(backup):
                os.unlink(backup)
        self.done.clear()


def _prepare_maps(pf: Postfix, config: Config, maps: dict[str, str], names: list[str],
                  scratch: list[str]) -> list[tuple[str, str]]:
    """Write and postmap each changed map under a temporary name; nothing live
    changes. Returns (temporary, final) pairs to move into place, .db first."""
    directory = settings.map_dir(config)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    moves = []
    for name in names:
        final = os.path.join(directory, name)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        scratch += [tmp, tmp + ".db"]
        with os.fdopen(fd, "w") as fh:
            fh.write(maps[name])
        os.chmod(tmp, 0o644)
        if name in settings.HASH_MAPS:
            pf.postmap(f"hash:{tmp}")
            moves.append((tmp + ".db", final + ".db"))
        else:
            _chgrp_postfix(tmp, 0o640)
        moves.append((tmp, final))
    return moves


def _forget_hold_secret(config: Config) -> None:
    """Delete the secret and its table; first, check again whose every
    message the ledger counts is (``HeldMail.recheck_owners``).  If that
    check fails, the files stay, and the next apply tries again."""
    paths = [os.path.join(config.state_directory if where == "state"
                          else settings.map_dir(config), name)
             for where, name in holdtag.LEGACY_FILES]
    if not any(os.path.exists(p) for p in paths):
        return
    if os.path.exists(os.path.join(config.state_directory, "ledger.sqlite3")):
        from flushctl.heldmail.library import HeldMail
        HeldMail(config).recheck_owners()
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _chgrp_postfix(path: str, mode: int) -> None:
    try:
        os.chown(path, 0, grp.getgrnam("postfix").gr_gid)
    except (KeyError, PermissionError):
        pass
    os.chmod(path, mode)


def _stage(pf: Postfix, plan: settings.Plan) -> str:
    """Copy main.cf and master.cf, apply the plan to the copy, check it."""
    stage = tempfile.mkdtemp(prefix="flushctl-apply-")
    try:
        for name in ("main.cf", "master.cf"):
            shutil.copy2(os.path.join(pf.config_directory, name), os.path.join(stage, name))
        staged = Postfix(stage, pf.timeout)
        staged.set(plan.params)
        for entry in plan.services:
            staged.set_service(entry)
        for key in plan.remove_services:
            staged.remove_service(key)
        try:
            staged.check()
        except PostfixError as exc:
            raise ApplyError(f"postfix check refused the new settings: {exc}") from None
        return stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _check_submission(config: Config) -> None:
    """What postfix check does not look at: the certificate and key must be there."""
    sub = config.submission
    if sub is None:
        return
    for key, path in (("tls_cert_file", sub.tls_cert_file), ("tls_key_file", sub.tls_key_file)):
        if not os.path.isfile(path):
            raise ApplyError(f"{config.path}: submission.{key}: {path}: no such file")
    conf = os.path.join(settings.sasl_config_directory(config), sub.sasl_path + ".conf")
    if sub.sasl_type == "cyrus" and not os.path.isfile(conf):
        raise ApplyError(f"{config.path}: submission: no Cyrus SASL configuration {conf} "
                         f"(pwcheck_method, mech_list: see the README)")


def apply(config: Config, dry_run: bool = False, reload: bool = True,
          removed: str | None = None) -> ApplyReport:
    """``removed``: what becomes of the held mail of domains the config no
    longer names (one of removed_domains.REMOVED_ACTIONS); without it such
    mail stops the apply, unless an earlier ``keep`` covers it.  The
    transport map routes each editable domain where its customer chose
    (``relays``); a relay change waits for the apply, and the other way round."""
    if not os.path.isfile(os.path.join(config.config_directory, "main.cf")):
        raise ApplyError(f"{config.config_directory}: no main.cf here "
                         f"(check [postfix] config_directory in {config.path})")
    if dry_run:
        return _apply(config, dry_run, reload, removed)
    try:
        with maps_lock(config):
            return _apply(config, dry_run, reload, removed)
    except RelayChangeError as exc:
        raise ApplyError(str(exc)) from None


def _apply(given: Config, dry_run: bool, reload: bool, removed: str | None) -> ApplyReport:
    try:   # each domain routed where its customer chose, while the choice holds
        config = replace(given, domains=relays.effective(given.domains, relays.read(given)))
    except relays.RelaysError as exc:
        raise ApplyError(str(exc)) from None
    pf = Postfix(config.config_directory)
    data = settings.load_data()
    list_names = list(data["lists"]) + list(data["conditional_lists"]) + \
        list(data["parameters"]) + list(data["odmr"]["parameters"]) + ["nested_header_checks"]
    raw = pf.get_explicit(*list_names, "smtpd_relay_restrictions", "mynetworks")
    expanded = pf.get(*MANAGED)
    services = pf.services()
    _check_submission(config)
    previous_ours, previous_services = _previous(config)
    kept = set(_applied(config).get("kept_removed", []))
    held = {} if dry_run else held_removed(config)
    if removed is None:
        refuse_removed(config, held, kept)
    kept = (kept | set(held)) if removed == "keep" else kept & set(held)
    try:
        plan = settings.plan(config, data, raw, expanded, services, previous_ours,
                             _smtpd_chrooted(services), previous_services,
                             requeue_uid=_mail_owner_uid(pf),
                             cleanup_chrooted=_cleanup_chrooted(services))
    except settings.SettingsError as exc:
        raise ApplyError(str(exc)) from None
    report = ApplyReport(changed_params=dict(plan.params), services=list(plan.services),
                         removed_services=list(plan.remove_services),
                         maps=_changed_maps(config, plan.maps), dry_run=dry_run)
    if not dry_run:
        prepare_milter(config)
    if dry_run or not report.changed:
        if not dry_run:
            _save_ours(config, plan, sorted(kept))
            os.replace(*stage_digest(config))
            applied(given)
            _forget_hold_secret(config)
            settle_removed(config, held, removed, report)
        return report

    stage = _stage(pf, plan) if (plan.params or plan.services or plan.remove_services) else None
    _commit(pf, config, plan, report, stage, reload, sorted(kept))
    applied(given)
    _forget_hold_secret(config)   # only now is no table of the live settings naming it
    settle_removed(config, held, removed, report)
    return report


def _commit(pf: Postfix, config: Config, plan: settings.Plan, report: ApplyReport,
            stage: str | None, reload: bool, kept: list[str]) -> None:
    """Put maps, master.cf, main.cf and applied.json in place and reload, or,
    if any step fails, put every old file back (and reload the old settings
    if the new ones were already loaded): all or nothing."""
    swap = _Swap()
    scratch: list[str] = []
    reloading = False
    try:
        moves = _prepare_maps(pf, config, plan.maps, report.maps, scratch)
        if stage:
            for name in ("master.cf", "main.cf"):
                target = os.path.join(config.config_directory, name)
                scratch.append(target + ".flushctl-new")
                shutil.copy2(os.path.join(stage, name), target + ".flushctl-new")
                moves.append((target + ".flushctl-new", target))
        ours = _write_ours(config, plan, kept)
        scratch.append(ours)
        moves.append((ours, os.path.join(config.state_directory, STATE_FILE)))
        digest = stage_digest(config)   # which config is live: with the rest, or not at all
        scratch.append(digest[0])
        moves.append(digest)
        for new, target in moves:
            swap.put(new, target)
        if reload and pf.running():
            reloading = True
            pf.reload()
            report.reloaded = True
    except BaseException as exc:
        lost = swap.undo()
        if reloading:
            try:
                pf.reload()
            except PostfixError as again:
                lost.append(f"reloading the old settings: {again}")
        if lost:
            raise ApplyError(f"apply failed ({exc}) and could not put everything back: "
                             + "; ".join(lost)) from exc
        if isinstance(exc, (OSError, PostfixError)):
            raise ApplyError(f"apply failed, nothing changed: {exc}") from exc
        raise
    else:
        swap.commit()
    finally:
        for leftover in scratch:
            if os.path.lexists(leftover):
                os.unlink(leftover)
        if stage:
            shutil.rmtree(stage, ignore_errors=True)
