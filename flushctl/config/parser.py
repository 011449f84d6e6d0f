"""Reading the config file: find it, read it, and parse its tables into a ``Config``.

``load(path)`` either returns a ``Config`` or raises ``ConfigError`` whose
text is ``FILE: KEY: what is wrong``.  Nothing else in the program reads
the file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib

import rtoml

from flushctl import names
from flushctl.bulk import collector_paused
from flushctl.config import compiled
from flushctl.config.domains import _domain
from flushctl.config.fields import (_Section, _host_port, _host_ports, _is_ip, _listen,
                                    _networks, _policy_listen, _user, split_host_port)
from flushctl.config.customers import _check_notify, _notify, _portal
from flushctl.config.model import (DEFAULT_PATH, ENV_VAR, METRICS_LISTEN, ODMR_PORT, SASL_PATHS,
                                   Cluster, Config, ConfigError, Domain, GatewaySettings,
                                   HostPort, OdmrSettings, Peer, Submission)


def resolve_path(option: str | None) -> str:
    """--config, else $FLUSHCTL_CONFIG, else the default path."""
    return option or os.environ.get(ENV_VAR) or DEFAULT_PATH


def _submission(path: str, data: dict) -> Submission | None:
    if "submission" not in data:
        return None
    sec = _Section(path, "submission", data["submission"])
    sec.check_keys({"listen", "sasl_type", "sasl_path", "tls_cert_file", "tls_key_file"})
    listen = sec.get("listen", str, "submission")
    match = re.fullmatch(r"(?:(\[?[0-9A-Fa-f.:]+\]?|localhost):)?(\d{1,5}|submission)", listen)
    if not match or (match.group(2).isdigit() and not 0 < int(match.group(2)) < 65536):
        sec.fail("listen", f'must be "submission", "PORT" or "HOST:PORT", not {listen!r}')
    sasl_type = sec.get("sasl_type", str, "cyrus")
    if sasl_type not in SASL_PATHS:
        sec.fail("sasl_type", f'must be "cyrus" or "dovecot", not {sasl_type!r}')
    sasl_path = sec.get("sasl_path", str, SASL_PATHS[sasl_type])
    if not re.fullmatch(r"[A-Za-z0-9_./:-]{1,200}", sasl_path):
        sec.fail("sasl_path", f"not a SASL path Postfix can use: {sasl_path!r}")
    return Submission(
        listen=listen,
        sasl_type=sasl_type,
        sasl_path=sasl_path,
        tls_cert_file=sec.absolute_path("tls_cert_file", "", required=True),
        tls_key_file=sec.absolute_path("tls_key_file", "", required=True),
    )


def _cluster(path: str, data: dict) -> Cluster | None:
    if "cluster" not in data:
        return None
    sec = _Section(path, "cluster", data["cluster"])
    sec.check_keys({"peers", "finger_port", "source", "retry_for", "helo"})
    peers = []
    for item in sec.get("peers", list, required=True):
        text = str(item)
        host, port, _ = split_host_port(sec, "peers", text,
                                        '"HOST", "HOST:PORT" or "[IPv6]:PORT"', 25)
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            try:
                host = names.domain(host)
            except ValueError as exc:
                sec.fail("peers", str(exc))
        peer = Peer(host, port)
        if peer in peers:
            sec.fail("peers", f"{text} is listed twice")
        peers.append(peer)
    if not peers:
        sec.fail("peers", "an empty list: leave [cluster] out for a single MX host")
    finger_port = sec.positive("finger_port", int, 79)
    if finger_port > 65535:
        sec.fail("finger_port", f"port out of range: {finger_port}")
    source = sec.get("source", str)
    if source is not None:
        try:
            source = str(ipaddress.ip_address(source))
        except ValueError:
            sec.fail("source", f"must be an IP address of this host, not {source!r}")
    retry_for = sec.positive("retry_for", float, 7200.0)
    helo = sec.get("helo", str)
    if helo is not None:
        try:
            helo = names.domain(helo)
        except ValueError as exc:
            sec.fail("helo", str(exc))
    return Cluster(peers=tuple(peers), finger_port=finger_port, source=source,
                   retry_for=float(retry_for), helo=helo)


def _relay_port(sec, default: int) -> int:
    port = sec.positive("relay_port", int, default)
    if port >= 1024:
        sec.fail("relay_port", f"must be below 1024 (a port only root may bind), not {port}")
    return port


def _odmr(path: str, data: dict) -> OdmrSettings | None:
    if "odmr" not in data:
        return None
    sec = _Section(path, "odmr", data["odmr"])
    sec.check_keys({"listen", "tls_listen", "user", "relay_port", "tls_cert_file",
                    "tls_key_file", "session_timeout", "idle_timeout", "auth_failures",
                    "auth_delay", "max_sessions"})
    default = OdmrSettings()
    listen = _host_ports(sec, "listen", default.listen, ODMR_PORT)
    tls_listen = _host_ports(sec, "tls_listen", (), None)
    if not listen and not tls_listen:
        sec.fail("listen", "no address to listen on: leave [odmr] out for no ODMR")
    for hp in tls_listen:
        if hp in listen:
            sec.fail("tls_listen", f"{hp} is in listen too")
    cert = sec.absolute_path("tls_cert_file", "") if "tls_cert_file" in sec.table else None
    key = sec.absolute_path("tls_key_file", "") if "tls_key_file" in sec.table else None
    if (cert is None) != (key is None):
        sec.fail("tls_key_file" if key is None else "tls_cert_file",
                 "give tls_cert_file and tls_key_file both, or neither")
    if tls_listen and cert is None:
        sec.fail("tls_listen", "implicit TLS needs tls_cert_file and tls_key_file")
    return OdmrSettings(
        listen=listen,
        tls_listen=tls_listen,
        user=_user(sec, default.user, "the ODMR daemon talks to customers before they log "
                   "in: name an unprivileged user"),
        relay_port=_relay_port(sec, default.relay_port),
        tls_cert_file=cert,
        tls_key_file=key,
        session_timeout=float(sec.positive("session_timeout", float, default.session_timeout)),
        idle_timeout=float(sec.positive("idle_timeout", float, default.idle_timeout)),
        auth_failures=sec.positive("auth_failures", int, default.auth_failures),
        auth_delay=float(sec.not_negative("auth_delay", float, default.auth_delay)),
        max_sessions=sec.positive("max_sessions", int, default.max_sessions),
    )


def _check_odmr(path: str, domains: dict[str, Domain], odmr: OdmrSettings | None) -> None:
    """A domain whose mail goes out over ODMR only: someone may log in for
    it, and nothing else delivers it."""
    for name, dom in domains.items():
        if not dom.odmr:
            continue
        where = f'{path}: domains."{name}".odmr'
        if odmr is None:
            raise ConfigError(f"{where}: there is no [odmr] section to serve it")
        if not dom.users:
            raise ConfigError(f"{where}: name its users: no one could take its mail")
        if dom.relay is not None:
            raise ConfigError(f"{where}: its mail goes out over ODMR only; "
                              "drop relay (or odmr)")
        if dom.hosts:
            raise ConfigError(f"{where}: its mail goes out over ODMR only; "
                              "drop hosts (or odmr)")
        if dom.relay_editable:
            raise ConfigError(f"{where}: its mail goes out over ODMR only; "
                              "drop relay_editable (or odmr)")


def _check_relay_editable(path: str, domains: dict[str, Domain], cluster) -> None:
    """A relay a customer sets in the portal is this host's alone: on a
    cluster the other MX hosts would keep sending their part to the old one."""
    editable = sorted(n for n, d in domains.items() if d.relay_editable)
    if editable and cluster is not None:
        raise ConfigError(f'{path}: domains."{editable[0]}".relay_editable: a relay changed '
                          "in the portal would reach this host only, and the cluster's "
                          "other MX hosts would send their part to the old one; set relay "
                          "in the config of every host instead")


def _toml(text: str, path: str) -> dict:
    """The TOML document, read by rtoml (a provider's 100,000 domains: 0.17 s,
    against 1.05 s with tomllib, paid by every command).  tomllib reads
    what rtoml refuses (a float too large for a double, which TOML reads
    as infinity), and its verdict and message stand; it also reads text
    with carriage returns (rtoml keeps them in multi-line strings) or a
    byte order mark (rtoml skips it, TOML does not allow it).  rtoml also
    takes a few things of TOML 1.1 that tomllib refuses (escapes such as
    ``\\e``, a trailing comma in an inline table)."""
    if "\r" not in text and not text.startswith("\ufeff"):
        try:
            return rtoml.loads(text)
        except rtoml.TomlParsingError:
            pass
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def parse(text: str, path: str = "<config>") -> Config:
    """Validate the TOML ``text``; ``path`` is used in error messages."""
    with collector_paused():
        return _parse(text, path)


def _parse(text: str, path: str) -> Config:
    data = _toml(text, path)
    top = _Section(path, "", data)
    top.check_keys({"postfix", "state", "milter", "gateway", "poller", "helper", "relay",
                    "submission", "cluster", "metrics", "odmr", "portal", "notify",
                    "domains"})
    he = _Section(path, "helper", data.get("helper", {}))
    he.check_keys({"socket", "group"})
    helper_socket = he.absolute_path("socket", "/run/flushctl/helper.sock")
    helper_group = he.get("group", str, "flushctl")
    if not re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}", helper_group):
        he.fail("group", f"not a group name: {helper_group!r}")
    me = _Section(path, "metrics", data.get("metrics", {}))
    me.check_keys({"listen"})
    metrics_listen = None
    if me.get("listen", str, METRICS_LISTEN) != "":
        metrics_listen = _host_port(me, "listen", METRICS_LISTEN)
    rl = _Section(path, "relay", data.get("relay", {}))
    rl.check_keys({"networks"})
    relay_networks = _networks(rl, "networks")
    wide = names.too_wide(relay_networks)
    if wide:
        rl.fail("networks", wide)
    pf = _Section(path, "postfix", data.get("postfix", {}))
    pf.check_keys({"config_directory", "transport"})
    st = _Section(path, "state", data.get("state", {}))
    st.check_keys({"directory"})
    mi = _Section(path, "milter", data.get("milter", {}))
    mi.check_keys({"listen", "user"})
    milter_user = _user(mi, "flushctl-milter",
                        'the milter reads every message: name an unprivileged user, '
                        'or "" to keep it root')
    gw = _Section(path, "gateway", data.get("gateway", {}))
    gw.check_keys({"finger_listen", "policy_listen", "release_window", "max_connections",
                   "idle_timeout", "rate_burst", "rate_per_minute", "user"})
    gateway_user = _user(gw, "nobody", 'the network side must not run as root; name an '
                         'unprivileged user, or "" for one process')
    po = _Section(path, "poller", data.get("poller", {}))
    po.check_keys({"interval", "probe_timeout", "concurrency", "own_hosts", "nameservers",
                   "user"})
    poller_user = _user(po, "nobody", "the poller talks to customers' servers and serves "
                        'metrics: name an unprivileged user, or "" for one process')
    own_hosts = []
    for item in po.get("own_hosts", list, []):
        try:
            own_hosts.append(names.domain(str(item)))
        except ValueError as exc:
            po.fail("own_hosts", str(exc))
    nameservers = []
    for item in po.get("nameservers", list, []):
        spec = str(item)   # not ``text``: the file's text is the digest's, below
        host, port, _ = split_host_port(po, "nameservers", spec,
                                        "an IP address (with optional :port)", 53)
        if not _is_ip(host):
            po.fail("nameservers", f"not an IP address (with optional :port): {spec!r}")
        nameservers.append(HostPort(host, port))

    transport = pf.get("transport", str, "ondemand")
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,30}", transport):
        pf.fail("transport", f"must be a master.cf service name like ondemand, not {transport!r}")

    domains_table = data.get("domains", {})
    if not isinstance(domains_table, dict):
        raise ConfigError(f"{path}: domains: must be a table of domains")
    domains = {}
    for name, table in domains_table.items():
        dom = _domain(path, name, table)
        domains[dom.name] = dom
    odmr = _odmr(path, data)
    _check_odmr(path, domains, odmr)
    notify = _notify(path, data)
    _check_notify(path, domains, notify)
    cluster = _cluster(path, data)
    _check_relay_editable(path, domains, cluster)
    if notify.webhook_secret_file is None and any(d.notify_webhook for d in domains.values()):
        raise ConfigError(f"{path}: notify: webhook_secret_file: needed to sign the webhooks "
                          "that domains name (notify_webhook)")
    return Config(
        path=path,
        config_directory=pf.absolute_path("config_directory", "/etc/postfix"),
        state_directory=st.absolute_path("directory", "/var/lib/flushctl"),
        milter_listen=_listen(mi, "listen", "unix:/var/spool/postfix/flushctl/milter.sock"),
        milter_user=milter_user,
        finger_listen=_host_port(gw, "finger_listen", "0.0.0.0:79"),
        policy_listen=_policy_listen(gw),
        poller_interval=po.positive("interval", int, 60),
        poller_user=poller_user,
        gateway=GatewaySettings(
            release_window=gw.positive("release_window", float, 60.0),
            max_connections=gw.positive("max_connections", int, 512),
            idle_timeout=gw.positive("idle_timeout", float, 10.0),
            rate_burst=gw.positive("rate_burst", int, 30),
            rate_per_minute=gw.positive("rate_per_minute", float, 60.0),
            user=gateway_user,
        ),
        probe_timeout=po.positive("probe_timeout", float, 10.0),
        poller_concurrency=po.positive("concurrency", int, 100),
        own_hosts=tuple(own_hosts),
        nameservers=tuple(nameservers),
        relay_networks=tuple(relay_networks),
        transport_name=transport,
        domains=domains,
        submission=_submission(path, data),
        cluster=cluster,
        metrics_listen=metrics_listen,
        helper_socket=helper_socket,
        helper_group=helper_group,
        odmr=odmr,
        portal=_portal(path, data),
        notify=notify,
        digest=_digest(text),
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load(path: str, compiled_copy: bool = True) -> Config:
    """The config of the file at ``path``: its compiled copy when that was
    made from this very text by this very code, else parsed (and the copy
    made, when this process owns the file).  ``compiled_copy=False``
    parses, and leaves nothing beside the file (check-config)."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read()
        # as text mode reads it: universal newlines
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (give --config PATH or set {ENV_VAR})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    config = compiled.read(path, st, _digest(text)) if compiled_copy else None
    if config is None:
        config = parse(text, path)
        if compiled_copy:
            compiled.write(path, st, config)
    return config
