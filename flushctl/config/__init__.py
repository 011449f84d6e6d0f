"""The flushctl configuration: one TOML file, validated once into frozen objects.

``load(path)`` either returns a ``Config`` or raises ``ConfigError`` whose
text is ``FILE: KEY: what is wrong``.  Nothing else in the program reads
the file.  This package's public face: the objects are in ``model``, the
field parsers in ``fields``, the reading of the file in ``parser``.
"""

from flushctl.config.fields import login_name, relay_text
from flushctl.config.model import (DEFAULT_PATH, ENV_VAR, METRICS_LISTEN, ODMR_PORT,
                                   POLICY_LISTEN, SASL_PATHS, Cluster, Config, ConfigError,
                                   Domain, GatewaySettings, HostPort, Listen, Network,
                                   NotifySettings,
                                   OdmrSettings, Peer, PortalSettings, Relay, Submission,
                                   UnknownDomain)
from flushctl.config.parser import load, parse, resolve_path

__all__ = [
    "DEFAULT_PATH", "ENV_VAR", "METRICS_LISTEN", "ODMR_PORT", "POLICY_LISTEN", "SASL_PATHS",
    "Cluster", "Config", "ConfigError", "Domain", "GatewaySettings", "HostPort", "Listen",
    "Network", "NotifySettings", "OdmrSettings", "Peer", "PortalSettings", "Relay", "Submission", "UnknownDomain",
    "load", "login_name", "parse", "relay_text", "resolve_path",
]
