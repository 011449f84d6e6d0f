"""Validation of the names that may reach a Postfix command line.

Pure functions: a domain or a queue id either comes out normalised or a
``ValueError`` says what is wrong with it.  Nothing that starts with ``-``
or carries a shell metacharacter gets through.
"""

from __future__ import annotations

# The "idna" codec and the "punycode" codec it uses, loaded now:
# str.encode("idna") below and every getaddrinfo of a name need them, and
# a daemon that has given up root may not be able to read the
# interpreter's library when it first asks.
import encodings.idna  # noqa: F401
import encodings.punycode  # noqa: F401
import re

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_NAME = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}")   # two labels or more
# Short ids are upper-case hex; long ids use Postfix's 52-letter safe alphabet
# (digits and consonants) with a 'z' between time and inode number.


def domain(value: str) -> str:
    """Return ``value`` as a lower-case domain name, or raise ValueError."""
    if not isinstance(value, str):
        raise ValueError("a domain must be a string")
    name = value.strip().lower().rstrip(".")
    if not name:
        raise ValueError("empty domain name")
    if len(name) > 253:
        raise ValueError(f"domain name too long: {value[:40]!r}...")
    if "." not in name:
        raise ValueError(f"not a fully qualified domain name: {value!r}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid domain name: {value!r}")
    if name.rpartition(".")[2].isdigit():
        raise ValueError(f"invalid domain name (numeric top-level label): {value!r}")
    return name


def wire_domain(value: str) -> str:
    """A domain from the network (finger, ETRN): case-insensitive, IDNA-aware.

    ``#`` and ``@`` prefixes (RFC 1985 ETRN forms) are stripped.  A name in
    Unicode is turned into its ASCII (A-label) form before validation.
    """
    if not isinstance(value, str):
        raise ValueError("a domain must be a string")
    name = value.strip()
    if name[:1] in ("#", "@"):
        name = name[1:]
    if not name or len(name) > 255:
        raise ValueError("bad domain length")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"not a valid international domain name: {value!r}") from None
    return domain(name)


def queue_id(value: str) -> str:
    """Return ``value`` if it is a Postfix queue id, or raise ValueError."""
    if not isinstance(value, str) or not is_queue_id(value):
        raise ValueError(f"not a Postfix queue id: {value!r}")
    return value


def is_queue_id(value: str) -> bool:
    """Letters and digits, 6 to 32 of them (string methods: a million
    names of a listing in a fifth of the regex's time)."""
    return 6 <= len(value) <= 32 and value.isascii() and value.isalnum()


def address(value: str) -> tuple[str, str]:
    """Split an email address into (local part, domain); domain normalised."""
    addr = value.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    local, sep, dom = addr.rpartition("@")
    if not sep or not local:
        raise ValueError(f"not an address with a domain: {value!r}")
    if any(c.isspace() or c in "<>,;" for c in local):
        raise ValueError(f"invalid local part: {value!r}")
    return local, domain(dom)


# The widest networks that may relay through us, alone or together: any
# wider is an open relay in all but name (0.0.0.0/1 plus 128.0.0.0/1 is
# everyone).  IPv4: a /8, IPv6: a /32.  Private ranges (10/8, 172.16/12,
# 192.168/16, fc00::/7, ...) do not count: nobody on the Internet has them.
WIDEST_RELAY_PREFIX = {4: 8, 6: 32}


def too_wide(networks) -> str:
    """Why a set of relay networks covers too much of the address space,
    naming the network; '' when it does not (pure)."""
    import ipaddress
    by_version: dict[int, list] = {4: [], 6: []}
    for net in networks:
        if net.version == 6 and net.network_address.ipv4_mapped is not None:
            net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/"
                                       f"{max(0, net.prefixlen - 96)}", strict=False)
        if net.is_private and net.prefixlen > 0:
            continue
        widest = WIDEST_RELAY_PREFIX[net.version]
        if net.prefixlen < widest:
            everyone = " (everyone)" if net.prefixlen == 0 else ""
            return (f"{net}{everyone} is wider than a /{widest}: that is an open relay; "
                    f"list the customers' own networks")
        by_version[net.version].append(net)
    for version, nets in by_version.items():
        widest = WIDEST_RELAY_PREFIX[version]
        bits = 32 if version == 4 else 128
        total = sum(n.num_addresses for n in ipaddress.collapse_addresses(nets))
        if total > 2 ** (bits - widest):
            return (f"{', '.join(str(n) for n in nets)} together cover more than a "
                    f"/{widest}: that is an open relay; list the customers' own networks")
    return ""


def split_recipient(value: str) -> tuple[str, str] | None:
    """(local part, domain) of an envelope recipient, leniently, for telling
    whose mail it is: whatever Postfix accepted (a quoted local part with
    spaces, ``_`` in a host name, UTF-8) still names its domain.  The
    domain comes back lower-cased without a trailing dot; None when there
    is no domain (or an address literal)."""
    if not isinstance(value, str):
        return None
    addr = value.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1]
    local, sep, dom = addr.rpartition("@")
    dom = dom.strip().rstrip(".").lower()
    if not sep or not local or not dom or dom.startswith("["):
        return None
    if any(c.isspace() or ord(c) < 32 or c in "<>,;@\\\"" for c in dom):
        return None
    return local, dom


def customer_of(rcpt_domain: str, customers) -> str | None:
    """The configured customer domain that ``rcpt_domain`` belongs to.

    Postfix matches subdomains of relay_domains by default
    (parent_domain_matches_subdomains), so a subdomain belongs to its
    nearest configured parent.
    """
    name = rcpt_domain.lower().rstrip(".")
    while True:
        if name in customers:
            return name
        _, dot, rest = name.partition(".")
        if not dot or "." not in rest:
            return None
        name = rest


# A forwarded ETRN says so itself: ``ETRN _forwarded.customer.example``.
# The receiving gateway releases the domain and never sends that on, so no
# configuration of names and addresses can make peers pass a release
# around.  The mark grants nothing (rights still come from the client's
# address), so a customer who writes it only keeps its release to one
# host.  "_" is no letter of a host name: no customer domain begins so
# (the config refuses it), and Postfix's ETRN takes it (fast_flush_domains
# lists the marked names too).
FORWARDED_LABEL = "_forwarded"


def forwarded(domain: str) -> str:
    """The ETRN argument by which a peer asks for ``domain``."""
    return f"{FORWARDED_LABEL}.{domain}"


def unmark(argument: str) -> tuple[str, bool]:
    """(the domain, whether the ETRN came from a peer's forwarder)."""
    label, dot, rest = argument.partition(".")
    if dot and rest and label.lower() == FORWARDED_LABEL:
        return rest, True
    return argument, False
