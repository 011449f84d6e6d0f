"""What the Postfix instance must look like for our config (pure).

Reads the data in ``postfix/settings.toml`` and the current values of the
instance, and says which main.cf parameters, which master.cf entry and
which map files must change.  No I/O beyond reading that data file.
"""

from __future__ import annotations

import ipaddress
import re
import os
import tomllib
from dataclasses import dataclass
from importlib import resources

from flushctl.heldmail import holdtag
from flushctl.config import Config
from flushctl.names import forwarded, too_wide
from flushctl.mta.routing import transport_entries


class SettingsError(Exception):
    """The instance cannot be made safe without the admin's decision."""


def load_data() -> dict:
    text = resources.files("postfix").joinpath("settings.toml").read_text()
    return tomllib.loads(text)


def map_dir(config: Config) -> str:
    return os.path.join(config.config_directory, "flushctl")


def intake_table(config: Config) -> str:
    """The header_checks table every message passes at intake."""
    return os.path.join(map_dir(config), "intake")


def split_list(value: str) -> list[str]:
    """Split a Postfix list value (commas and/or white space; ``{...}`` kept whole)."""
    tokens, current, depth = [], [], 0
    for ch in value:
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        if depth == 0 and (ch == "," or ch.isspace()):
            if current:
                tokens.append("".join(current))
                current = []
            continue
        current.append(ch)
    if current:
        tokens.append("".join(current))
    return tokens


def merge_list(ours: list[str], current: str, previous_ours: set[str]) -> str:
    """Our entries first, then the admin's, without our stale ones or repeats."""
    mine = set(ours) | previous_ours
    rest = [t for t in split_list(current) if t not in mine]
    seen, merged = set(), []
    for token in ours + rest:
        if token not in seen:
            seen.add(token)
            merged.append(token)
    return ", ".join(merged)


def milter_spec(config: Config, queue_directory: str, chrooted: bool,
                daemon: str = "smtpd") -> str:
    """The milter socket as ``daemon`` must name it (inside its chroot, if any):
    smtpd for smtpd_milters, cleanup for non_smtpd_milters."""
    listen = config.milter_listen
    if listen.kind == "inet" or not chrooted:
        return listen.milter_spec
    queue = os.path.normpath(queue_directory)
    if os.path.commonpath([queue, listen.path]) != queue:
        raise SettingsError(
            f"{config.path}: milter.listen: {daemon} runs chrooted in {queue}, so the milter "
            f"socket must be under it (for example unix:{queue}/flushctl/milter.sock)")
    return "unix:" + listen.path[len(queue):]


def policy_spec(config: Config, queue_directory: str) -> str:
    """The policy socket as check_policy_service names it: a unix socket
    relative to the queue directory (where smtpd runs, chrooted or not),
    ``unix:private/NAME``; or inet:HOST:PORT."""
    listen = config.policy_listen
    if listen.kind == "inet":
        return listen.milter_spec
    queue = os.path.normpath(queue_directory)
    if os.path.commonpath([queue, listen.path]) != queue or listen.path == queue:
        raise SettingsError(
            f"{config.path}: gateway.policy_listen: smtpd reaches unix sockets under "
            f"{queue} only (for example unix:{queue}/private/flushctl-policy)")
    return "unix:" + os.path.relpath(listen.path, queue)


# Maps built with postmap; the others are regexp tables read as they are.
HASH_MAPS = ("relay_domains", "flush_domains", "transport", "relay_recipients")


def render_maps(config: Config, requeue_uid: int | None = None) -> dict[str, str]:
    """Map source files (name -> text) for the configured domains.

    Also the two regexp tables behind our headers, ``intake`` and
    ``strip_hold`` (their rules: ``holdtag``; ``requeue_uid``: the
    mail_owner's uid, whose requeue trace header intake drops).
    """
    relay, flush, transport, recipients, any_user = [], [], [], [], []
    for name in sorted(config.domains):
        dom = config.domains[name]
        relay.append(f"{name}\tOK\n")
        # ETRN: the domain, and the form a peer forwards it in
        flush.extend([f"{name}\tOK\n", f"{forwarded(name)}\tOK\n"])
        transport.extend(f"{key}\t{value}\n" for key, value in transport_entries(
            dom, config.transport_name, config.odmr.relay_port if config.odmr else 0))
        if dom.recipients is None:
            any_user.append(f"/@(.+\\.)?{re.escape(name)}$/\tOK\n")
        else:
            recipients.extend(f"{local}@{name}\tOK\n" for local in sorted(dom.recipients))
    header = "# Written by flushctl apply from {}; do not edit.\n".format(config.path)
    return {
        "relay_domains": header + "".join(relay),
        "flush_domains": header + "".join(flush),
        "transport": header + "".join(transport),
        "relay_recipients": header + "".join(recipients),
        "relay_recipient_domains": header + "".join(any_user),
        "intake": header + holdtag.intake_rules(requeue_uid),
        "strip_hold": header + holdtag.strip_rules(),
    }


@dataclass(frozen=True)
class Plan:
    params: dict[str, str]          # main.cf parameters to set (only changes)
    services: list[str]             # master.cf entries to write (only changes)
    remove_services: list[str]      # master.cf services (name/type) we wrote and no longer want
    maps: dict[str, str]            # every map source we own (written if changed)
    ours: list[str]                 # list entries we own, for the next apply
    our_services: list[str]         # master.cf services (name/type) we own, for the next apply


def _fill(template: str, values: dict[str, str]) -> str:
    return template.format(**values)


def postfix_network(net) -> str:
    """An ip_network as mynetworks writes it (IPv6 in brackets)."""
    if net.version == 6:
        return f"[{net.network_address}]/{net.prefixlen}"
    return str(net)


def check_mynetworks(expanded: str, data: dict) -> None:
    """mynetworks may relay anywhere: refuse one that covers everyone, or
    more of the address space than any set of customer networks would
    (names.too_wide: wider than a /8 in IPv4, a /32 in IPv6)."""
    forbidden = {ipaddress.ip_network(n.strip("[]").replace("]", ""), strict=False)
                 for n in data["mynetworks"]["forbidden"]}
    nets = []
    for token in split_list(expanded):
        try:
            net = ipaddress.ip_network(token.replace("[", "").replace("]", ""), strict=False)
        except ValueError:
            continue
        if net in forbidden or net.prefixlen == 0:
            raise SettingsError(
                f"mynetworks contains {token}: that makes an open relay; narrow it first")
        if not net.is_loopback:
            nets.append(net)
    wide = too_wide(nets)
    if wide:
        raise SettingsError(f"mynetworks: {wide}")


def relay_restrictions_ok(expanded: str, data: dict) -> bool:
    rules = data["relay_restrictions"]
    tokens = split_list(expanded)
    for token in tokens:
        if token in rules["must_contain_one_of"]:
            return True
        if token in rules["never_before_it"]:
            return False
    return False


def sasl_config_directory(config: Config) -> str:
    """Where Cyrus SASL reads SASL_PATH.conf: Debian's Postfix always reads
    CONFIG_DIRECTORY/sasl; other builds follow cyrus_sasl_config_path."""
    return os.path.join(config.config_directory, "sasl")


def service_key(entry: str) -> str:
    """``name/type`` of a master.cf entry."""
    return "/".join(entry.split()[:2])


def wanted_services(config: Config, data: dict, values: dict[str, str],
                    smtpd_chrooted: bool) -> list[str]:
    """Every master.cf entry we want, as one line each (``-o`` options included)."""
    entries = [_fill(data["service"]["entry"], values)]
    sub = config.submission
    if sub is not None:
        subvalues = {"listen": sub.listen, "chroot": "y" if smtpd_chrooted else "n",
                     "sasl_type": sub.sasl_type,
                     "sasl_path": sub.sasl_path,
                     "sasl_config_directory": sasl_config_directory(config),
                     "tls_cert_file": sub.tls_cert_file, "tls_key_file": sub.tls_key_file}
        spec = data["submission"]
        entries.append(" ".join([_fill(spec["entry"], subvalues)]
                                + [f"-o {_fill(o, subvalues)}" for o in spec["options"]]))
    if odmr_enabled(config):
        spec = data["odmr"]
        entries.append(" ".join([_fill(spec["entry"], values)]
                                + [f"-o {_fill(o, values)}" for o in spec["options"]]))
    return entries


def odmr_enabled(config: Config) -> bool:
    return config.odmr is not None and bool(config.domains_where("odmr"))


def plan(config: Config, data: dict, raw: dict[str, str], expanded: dict[str, str],
         services: dict[str, str], previous_ours: set[str], smtpd_chrooted: bool,
         previous_services: frozenset[str] = frozenset(),
         requeue_uid: int | None = None, cleanup_chrooted: bool | None = None) -> Plan:
    """Compare what is with what must be.

    ``raw``: main.cf values as written; ``expanded``: the same, expanded
    (for the safety checks); ``services``: ``postconf -M`` entries.
    """
    if cleanup_chrooted is None:
        cleanup_chrooted = smtpd_chrooted
    values = {
        "transport": config.transport_name,
        "map_dir": map_dir(config),
        "milter": milter_spec(config, expanded["queue_directory"], smtpd_chrooted),
        "cleanup_milter": milter_spec(config, expanded["queue_directory"], cleanup_chrooted,
                                      "cleanup"),
        "policy": policy_spec(config, expanded["queue_directory"]),
    }
    check_mynetworks(expanded.get("mynetworks", ""), data)

    want: dict[str, str] = {}
    ours: list[str] = []
    for name, value in data["parameters"].items():
        want[name] = _fill(value, values)
    if odmr_enabled(config):
        want.update(data["odmr"]["parameters"])
    for name, templates in data["lists"].items():
        mine = [_fill(t, values) for t in templates]
        if name in data["odmr"] and odmr_enabled(config):
            mine.insert(0, _fill(data["odmr"][name], values))
        ours.extend(mine)
        want[name] = merge_list(mine, raw.get(name, ""), previous_ours)
    any_lists = any(d.recipients is not None for d in config.domains.values())
    for name, templates in data["conditional_lists"].items():
        mine = [_fill(t, values) for t in templates]
        current = raw.get(name, "")
        if any_lists:
            ours.extend(mine)
            admin_tokens = [t for t in split_list(current) if t not in set(mine) | previous_ours]
            other_relay = [t for t in split_list(raw.get("relay_domains", ""))
                           if t not in set(ours) | previous_ours]
            if not admin_tokens and other_relay:
                raise SettingsError(
                    f"relay_domains also lists {', '.join(other_relay)} and {name} is empty: "
                    f"setting {name} for our recipient lists would refuse all mail for those "
                    f"domains; give them entries in {name} first")
            want[name] = merge_list(mine, current, previous_ours)
        else:
            want[name] = merge_list([], current, previous_ours | set(mine))
    # attached messages' headers: our strip table, then the admin's own checks
    mine = [_fill(t, values) for t in data["nested_header_checks"]["ours"]]
    ours.extend(mine)
    own_hold = set(ours) | previous_ours
    admin_checks = [t for t in split_list(raw.get("header_checks", "")) if t not in own_hold]
    if "nested_header_checks" in raw:
        nested = []
        for token in split_list(raw["nested_header_checks"]):
            if token in ("$header_checks", "${header_checks}", "$(header_checks)"):
                nested.extend(admin_checks)
            elif token not in own_hold:
                nested.append(token)
    else:   # Postfix's default, $header_checks, without our hold table
        nested = admin_checks
    want["nested_header_checks"] = merge_list(mine, ", ".join(nested), previous_ours)
    nets = [postfix_network(n) for n in config.relay_networks]
    ours.extend(nets)
    current = raw.get("mynetworks", "")
    if nets:
        # an unset mynetworks means this host only; keep loopback when we set it
        base = current or "127.0.0.0/8, [::1]/128"
        want["mynetworks"] = merge_list(nets, base, previous_ours)
        check_mynetworks(want["mynetworks"], data)
    elif set(split_list(current)) & previous_ours:
        want["mynetworks"] = merge_list([], current, previous_ours)
    if not relay_restrictions_ok(expanded.get("smtpd_relay_restrictions", ""), data):
        want["smtpd_relay_restrictions"] = data["relay_restrictions"]["value"]

    changes = {k: v for k, v in want.items() if raw.get(k, "") != v}
    entries = wanted_services(config, data, values, smtpd_chrooted)
    keys = [service_key(e) for e in entries]
    for entry in entries[1:]:
        key = service_key(entry)
        if key in services and key not in previous_services:
            raise SettingsError(
                f"master.cf already has a {key} service that flushctl did not write; "
                f"remove it (or give [submission] listen another port)")
    write = [e for e in entries
             if " ".join(services.get(service_key(e), "").split()) != " ".join(e.split())]
    remove = sorted(k for k in previous_services if k not in keys and k in services)
    return Plan(params=changes, services=write, remove_services=remove,
                maps=render_maps(config, requeue_uid), ours=ours, our_services=keys)
