"""The configuration as typed, frozen objects: the dataclasses, its two errors, its defaults.

Only ``flushctl.config.parser`` builds them; everything else reads them.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

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
    users: tuple[str, ...] = ()   # login names that may release its mail (ODMR)
    odmr: bool = False            # its held mail goes out only over its users' ODMR sessions
    notify: tuple[str, ...] = ()  # addresses told about its held mail (none in a customer domain)
    notify_interval: float | None = None      # None: [notify] interval
    notify_stale_after: float | None = None   # None: [notify] stale_after
    notify_webhook: str | None = None         # an http(s) URL that gets each notice as JSON
    relay_editable: bool = False  # its customer may change ``relay`` in the portal (mta.relays)
    relay_chosen: bool = False    # ``relay`` is its customer's choice (set by mta.relays only)

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
POLICY_LISTEN = "unix:/var/spool/postfix/private/flushctl-policy"


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


ODMR_PORT = 366   # RFC 2645


@dataclass(frozen=True)
class OdmrSettings:
    """[odmr]: On-Demand Mail Relay (RFC 2645): customers log in, say ATRN,
    and take their held mail over the same connection."""

    listen: tuple[HostPort, ...] = (HostPort("0.0.0.0", ODMR_PORT),)
    tls_listen: tuple[HostPort, ...] = ()   # implicit TLS (needs the cert and key)
    user: str = "nobody"                    # the daemon's network side runs as this user
    # where Postfix's odmr transport connects, on one loopback address per
    # ODMR domain (127.A.B.C, from the name): a port only root may bind
    relay_port: int = 367
    tls_cert_file: str | None = None
    tls_key_file: str | None = None         # both or neither
    session_timeout: float = 1800.0         # seconds one session may last at most
    idle_timeout: float = 600.0             # seconds a client may be silent (RFC 2645: 10 min)
    auth_failures: int = 3                  # failed AUTH per address and per user before 421
    auth_delay: float = 2.0                 # seconds each failed AUTH is answered late
    max_sessions: int = 100                 # connections at once


@dataclass(frozen=True)
class NotifySettings:
    """[notify]: how customers hear about their held mail (see ``notify``)."""

    sender: str = ""                  # the envelope sender; "": the null sender, as DSNs
    from_address: str = ""            # the From: header; "": postmaster@ this host's name
    interval: float = 6 * 3600.0      # "mail is being held" at most this often per domain
    stale_after: float = 3 * 86400.0  # "held for long" once mail is this old
    digest_every: float = 86400.0     # a digest this often while mail is held
    check_every: float = 60.0         # seconds between looks at the domains
    webhook_secret_file: str | None = None   # the HMAC key of the webhook's signature
    webhook_timeout: float = 10.0
    webhook_retry_for: float = 86400.0       # a webhook not acknowledged is retried this long


@dataclass(frozen=True)
class PortalSettings:
    """[portal]: the customers' web portal (``flushctl portal``), meant to sit
    behind the provider's HTTPS reverse proxy."""

    listen: HostPort = HostPort("127.0.0.1", 8366)
    user: str = "nobody"                    # it runs as this user, never root
    admins: tuple[str, ...] = ()            # logins that see and steer every domain
    url: str = ""                           # its public address, for links in notices
    secure_cookie: bool = True              # the session cookie only over HTTPS
    session_lifetime: float = 8 * 3600.0    # seconds a login lasts in the browser and the API
    login_failures: int = 5                 # failed logins per client address before a pause
    page_size: int = 50                     # held messages per page
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")   # whose X-Forwarded-For counts
    # where a relay set in the portal may point besides public unicast addresses
    relay_allow: tuple[Network, ...] = ()


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
    odmr: OdmrSettings | None = None   # [odmr]; None: no ODMR
    portal: PortalSettings | None = None   # [portal]; None: no portal
    notify: NotifySettings = field(default_factory=NotifySettings)   # [notify]
    digest: str = ""   # of the file's text: which config an apply made live (applied.json)

    @property
    def logins_path(self) -> str:
        """The customers' logins (``flushctl user``): root's alone."""
        return os.path.join(self.state_directory, "logins")

    def domains_where(self, field: str) -> list[Domain]:
        """The domains whose ``field`` is set (true).  From a compiled
        copy (``config.table``) without building the others: a question
        asked at every start (does any domain let its customer choose its
        relay?) must not build 100,000 domains to answer no."""
        where = getattr(self.domains, "where", None)
        if where is not None:
            return where(field)
        return [dom for dom in self.domains.values() if getattr(dom, field)]

    def domain(self, name: str | Domain) -> Domain:
        """The configured domain ``name``, or ``UnknownDomain`` saying why not.
        A ``Domain`` of this config, validated at the edge, is itself."""
        if isinstance(name, Domain):
            if self.domains.get(name.name) is name:
                return name
            name = name.name
        if name in self.domains:  # already in canonical form (the keys are)
            return self.domains[name]
        try:
            key = names.domain(name)
        except ValueError as exc:
            raise UnknownDomain(str(exc)) from None
        if key not in self.domains:
            raise UnknownDomain(f"{key}: not a configured domain (see `flushctl domains`)")
        return self.domains[key]

