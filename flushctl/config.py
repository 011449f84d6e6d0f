"""The flushctl configuration: one TOML file, validated once into frozen objects.

``load(path)`` either returns a ``Config`` or raises ``ConfigError`` whose
text is ``FILE: KEY: what is wrong``.  Nothing else in the program reads
the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flushctl import names

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_PATH = "/etc/flushctl/flushctl.toml"
ENV_VAR = "FLUSHCTL_CONFIG"


class ConfigError(Exception):
    """A configuration problem, phrased for the admin."""


class UnknownDomain(LookupError):
    """A name that is not a domain this config serves (or no domain name at
    all); its text says which, for the admin or the customer who asked."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown domain"


@dataclass(frozen=True)
class Listen:
    """A listening address: a unix socket path or a TCP host and port."""

    kind: str  # "unix" or "inet"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return self.milter_spec

    @property
    def milter_spec(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"inet:{self.host}:{self.port}"

    @property
    def pymilter_spec(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"inet:{self.port}@{self.host}"


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Relay:
    """A next hop in Postfix syntax: ``[host]:port`` (no MX lookup) or ``host:port``."""

    host: str
    port: int
    mx_lookup: bool

    @property
    def nexthop(self) -> str:
        host = self.host if self.mx_lookup else f"[{self.host}]"
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Domain:
    name: str
    relay: Relay | None = None
    recipients: frozenset[str] | None = None  # lower-cased local parts
    quota_messages: int | None = None
    quota_bytes: int | None = None
    flush_from: tuple[Network, ...] = ()  # empty means anyone
    # hosts under the domain with routes of their own: host -> next hop
    hosts: dict = field(default_factory=dict)
    # seconds after its first 5xx that refused mail goes back to its sender; None: never
    refused_return_after: float | None = None

    def __hash__(self) -> int:
        return hash(self.name)

    def accepts_local_part(self, local: str) -> bool:
        return self.recipients is None or local.lower() in self.recipients


@dataclass(frozen=True)
class GatewaySettings:
    release_window: float = 60.0   # triggers this soon after a release share it
    max_connections: int = 512     # per listener; more are closed at once
    idle_timeout: float = 10.0     # seconds a client may take to send its request
    rate_burst: int = 30           # triggers a client may send at once
    rate_per_minute: float = 60.0  # and then per minute
    user: str = "nobody"           # the network side runs as this user; "" keeps one process


@dataclass(frozen=True)
class Submission:
    """SASL-authenticated submission for customers' outbound mail (optional)."""

    listen: str                 # master.cf service name: "submission", "PORT" or "HOST:PORT"
    sasl_type: str              # "cyrus" or "dovecot"
    sasl_path: str              # smtpd_sasl_path: "smtpd" (cyrus), "private/auth" (dovecot)
    tls_cert_file: str
    tls_key_file: str


SASL_PATHS = {"cyrus": "smtpd", "dovecot": "private/auth"}
METRICS_LISTEN = "127.0.0.1:9469"   # loopback unless configured otherwise


@dataclass(frozen=True)
class Peer:
    """Another backup MX of this cluster: where its Postfix takes ETRN."""

    host: str   # a host name or an IP address
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Cluster:
    """[cluster]: every release here is sent on to the peers as ETRN."""

    peers: tuple[Peer, ...]
    finger_port: int = 79          # the peers' finger port (status --cluster)
    source: str | None = None      # local address for connections to peers
    retry_for: float = 7200.0      # seconds a peer that does not acknowledge is retried
    helo: str | None = None        # EHLO name; default: this host's name


@dataclass(frozen=True)
class Config:
    path: str
    config_directory: str
    state_directory: str
    milter_listen: Listen
    milter_user: str            # the milter runs as this user, never root; "" = root
    finger_listen: HostPort
    policy_listen: Listen       # Postfix's policy service for ETRN: a unix socket in private/
    poller_interval: int
    probe_timeout: float
    poller_concurrency: int
    own_hosts: tuple[str, ...]   # domain names, canonical
    nameservers: tuple[HostPort, ...]  # empty: the system's resolv.conf
    relay_networks: tuple[Network, ...]  # customer networks that may relay outbound mail through us
    gateway: "GatewaySettings"
    transport_name: str
    domains: dict[str, Domain] = field(default_factory=dict)
    submission: Submission | None = None
    cluster: Cluster | None = None
    metrics_listen: HostPort | None = None   # the poller's Prometheus endpoint; None: off
    poller_user: str = "nobody"  # probes and metrics run as this user; "" keeps one process
    helper_socket: str = "/run/flushctl/helper.sock"   # the release helper's unix socket
    helper_group: str = "flushctl"   # its socket's group: the daemons and non-root admins

    def domain(self, name: str) -> Domain:
        """The configured domain ``name``, or ``UnknownDomain`` saying why not."""
        if name in self.domains:  # already in canonical form (the keys are)
            return self.domains[name]
        try:
            key = names.domain(name)
        except ValueError as exc:
            raise UnknownDomain(str(exc)) from None
        if key not in self.domains:
            raise UnknownDomain(f"{key}: not a configured domain (see `flushctl domains`)")
        return self.domains[key]


def resolve_path(option: str | None) -> str:
    """--config, else $FLUSHCTL_CONFIG, else the default path."""
    return option or os.environ.get(ENV_VAR) or DEFAULT_PATH


# -- validation helpers -------------------------------------------------------

class _Section:
    """Typed access to one table of the file, every error naming its key."""

    def __init__(self, path: str, prefix: str, table: Any):
        self.path = path
        self.prefix = prefix
        if not isinstance(table, dict):
            self.fail("", "must be a table")
        self.table = table

    def fail(self, key: str, text: str):
        where = f"{self.prefix}.{key}" if key and self.prefix else (key or self.prefix)
        raise ConfigError(f"{self.path}: {where}: {text}")

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.table:
            if key not in allowed:
                self.fail(key, "unknown key (allowed: " + ", ".join(sorted(allowed)) + ")")

    def get(self, key: str, kind, default=None, required: bool = False):
        if key not in self.table:
            if required:
                self.fail(key, "missing")
            return default
        value = self.table[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            self.fail(key, f"must be an integer, not {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            self.fail(key, f"must be a number, not {value!r}")
        if kind is str and not isinstance(value, str):
            self.fail(key, f"must be a string, not {value!r}")
        if kind is list and not isinstance(value, list):
            self.fail(key, f"must be a list, not {value!r}")
        if kind is dict and not isinstance(value, dict):
            self.fail(key, f"must be a table, not {value!r}")
        return value

    def absolute_path(self, key: str, default: str, required: bool = False) -> str:
        value = self.get(key, str, default, required)
        if not value.startswith("/"):
            self.fail(key, f"must be an absolute path, not {value!r}")
        if any(c in value for c in "\n\0,= \t"):
            self.fail(key, f"must not contain spaces, commas or '=': {value!r}")
        return os.path.normpath(value)

    def positive(self, key: str, kind, default=None, required=False):
        value = self.get(key, kind, default, required)
        if value is not None and value <= 0:
            self.fail(key, f"must be greater than zero, not {value!r}")
        return value


# "[HOST]:PORT" or "[HOST]", "HOST:PORT" or "HOST", or an IPv6 address bare
_HOST_PORT = re.compile(r"\[(?P<inside>[A-Za-z0-9._:-]+)\](?::(?P<port1>\d{1,5}))?"
                        r"|(?P<plain>[A-Za-z0-9._-]+)(?::(?P<port2>\d{1,5}))?"
                        r"|(?P<bare6>[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)")


def split_host_port(section: _Section, key: str, text: str, shape: str,
                    default_port: int | None = None) -> tuple[str, int, bool]:
    """The one parser of a host and a port in this config: ``[HOST]:PORT``,
    ``HOST:PORT``, and with a ``default_port`` also ``[HOST]``, ``HOST`` and
    a bare IPv6 address (with a port, IPv6 goes in brackets).  (host, port,
    bracketed); what the host may be is the caller's rule.  ``shape`` says
    in the error what was expected."""
    match = _HOST_PORT.fullmatch(text.strip())
    if not match:
        section.fail(key, f"must be {shape}, not {text!r}")
    if match.group("bare6") is not None:
        host, digits, bracketed = match.group("bare6"), None, False
        if default_port is None or not _is_ip(host):
            section.fail(key, f"must be {shape}, not {text!r}")
    elif match.group("inside") is not None:
        host, digits, bracketed = match.group("inside"), match.group("port1"), True
    else:
        host, digits, bracketed = match.group("plain"), match.group("port2"), False
    if digits is None and default_port is None:
        section.fail(key, f"must be {shape}, not {text!r}")
    port = default_port if digits is None else int(digits)
    if not 0 < port < 65536:
        section.fail(key, f"port out of range: {port}")
    return host, port, bracketed


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _host_port(section: _Section, key: str, default: str) -> HostPort:
    """A listening address: an IP address (or localhost) and a port."""
    value = section.get(key, str, default)
    host, port, _ = split_host_port(section, key, value, "HOST:PORT")
    if not _is_ip(host) and host != "localhost":
        section.fail(key, f"host must be an IP address, not {host!r}")
    return HostPort(host, port)


def _user(section: "_Section", default: str, why_not_root: str) -> str:
    user = section.get("user", str, default)
    if user and not re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}", user):
        section.fail("user", f"not a user name: {user!r}")
    if user == "root":
        section.fail("user", why_not_root)
    return user


def _listen(section: _Section, key: str, default: str) -> Listen:
    value = section.get(key, str, default)
    if value.startswith("unix:"):
        path = value[5:]
        if not path.startswith("/") or any(c in path for c in " \t\n\0,"):
            section.fail(key, f"unix socket must be an absolute path without spaces: {value!r}")
        return Listen("unix", path=os.path.normpath(path))
    if value.startswith("inet:"):
        hp = _host_port(_Section(section.path, section.prefix, {key: value[5:]}), key, "")
        return Listen("inet", host=hp.host, port=hp.port)
    section.fail(key, f'must be "unix:/PATH" or "inet:HOST:PORT", not {value!r}')


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(section: _Section, key: str) -> float | None:
    """Seconds, or a number with a unit (s, m, h, d, w) as Postfix writes times."""
    if key not in section.table:
        return None
    value = section.table[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?[smhdw]?", value.strip()):
        text = value.strip()
        unit = text[-1] if text[-1] in _UNITS else "s"
        seconds = float(text.rstrip("smhdw")) * _UNITS[unit]
    else:
        section.fail(key, f'must be seconds or a time like "5d", not {value!r}')
    if seconds <= 0:
        section.fail(key, f"must be greater than zero, not {value!r}")
    return seconds


POLICY_LISTEN = "unix:/var/spool/postfix/private/flushctl-policy"


def _policy_listen(section: _Section) -> Listen:
    """``unix:/PATH`` (the default: a socket in Postfix's private/ directory,
    which only Postfix reaches), or ``HOST:PORT`` / ``inet:HOST:PORT`` on
    loopback (any local user can reach that one: see the README)."""
    value = section.get("policy_listen", str, POLICY_LISTEN)
    if value.startswith("unix:"):
        return _listen(section, "policy_listen", POLICY_LISTEN)
    text = value[5:] if value.startswith("inet:") else value
    hp = _host_port(_Section(section.path, section.prefix, {"policy_listen": text}),
                    "policy_listen", "")
    return Listen("inet", host=hp.host, port=hp.port)


def _relay(section: _Section, key: str) -> Relay | None:
    value = section.get(key, str)
    if value is None:
        return None
    host, port, bracketed = split_host_port(section, key, value,
                                            '"[host]:port" or "host:port"', 25)
    is_ip = _is_ip(host)
    if not is_ip:
        try:
            host = names.domain(host)
        except ValueError as exc:
            section.fail(key, str(exc))
    if is_ip and not bracketed:
        section.fail(key, f"an IP address must be written in brackets: [{host}]:{port}")
    return Relay(host=host, port=port, mx_lookup=not bracketed)


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


def _domain(path: str, name: str, table: Any) -> Domain:
    try:
        key = names.domain(name)
    except ValueError as exc:
        raise ConfigError(f'{path}: domains."{name}": {exc}') from None
    if key != name:
        raise ConfigError(f'{path}: domains."{name}": write the domain as "{key}"')
    sec = _Section(path, f'domains."{name}"', table)
    sec.check_keys({"relay", "recipients", "quota_messages", "quota_bytes", "flush_from",
                    "hosts", "refused_return_after"})
    recipients = sec.get("recipients", list)
    rcpt_set = None
    if recipients is not None:
        rcpt_set = set()
        for item in recipients:
            if not isinstance(item, str):
                sec.fail("recipients", f"entries must be strings, not {item!r}")
            try:
                local, dom = names.address(item)
            except ValueError as exc:
                sec.fail("recipients", str(exc))
            if dom != key:
                sec.fail("recipients", f"{item!r} is not an address in {key}")
            rcpt_set.add(local.lower())
        if not rcpt_set:
            sec.fail("recipients", "an empty list would refuse all mail; leave the key out to accept any recipient")
    networks = []
    for item in sec.get("flush_from", list, []):
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            sec.fail("flush_from", f"not an IP network: {item!r}")
    hosts = {}
    table_hosts = sec.get("hosts", dict, {})
    for host, spec in table_hosts.items():
        try:
            name = names.domain(host)
        except ValueError as exc:
            sec.fail("hosts", str(exc))
        if not name.endswith("." + key):
            sec.fail("hosts", f"{host!r} is not a host under {key}")
        if not isinstance(spec, str):
            sec.fail("hosts", f"{host}: the route must be a string like \"[192.0.2.7]:25\"")
        hosts[name] = _relay(_Section(path, f'domains."{key}".hosts', {host: spec}), host)
    return Domain(
        name=key,
        hosts=hosts,
        refused_return_after=_duration(sec, "refused_return_after"),
        relay=_relay(sec, "relay"),
        recipients=frozenset(rcpt_set) if rcpt_set is not None else None,
        quota_messages=sec.positive("quota_messages", int),
        quota_bytes=sec.positive("quota_bytes", int),
        flush_from=tuple(networks),
    )


def parse(text: str, path: str = "<config>") -> Config:
    """Validate the TOML ``text``; ``path`` is used in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    top = _Section(path, "", data)
    top.check_keys({"postfix", "state", "milter", "gateway", "poller", "helper", "relay",
                    "submission", "cluster", "metrics", "domains"})
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
    relay_networks = []
    for item in rl.get("networks", list, []):
        try:
            net = ipaddress.ip_network(str(item), strict=False)
        except ValueError:
            rl.fail("networks", f"not an IP network: {item!r}")
        relay_networks.append(net)
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
        text = str(item)
        host, port, _ = split_host_port(po, "nameservers", text,
                                        "an IP address (with optional :port)", 53)
        if not _is_ip(host):
            po.fail("nameservers", f"not an IP address (with optional :port): {text!r}")
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
        cluster=_cluster(path, data),
        metrics_listen=metrics_listen,
        helper_socket=helper_socket,
        helper_group=helper_group,
    )


def load(path: str) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (give --config PATH or set {ENV_VAR})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, path)
