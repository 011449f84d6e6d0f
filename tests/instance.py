"""A private Postfix instance for integration tests.

Every instance lives in its own temporary directory (config, queue, data,
log) and listens on its own loopback port, so two runs never share a path
or a port and the system instance is never touched.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SYSTEM_MASTER_CF = Path("/etc/postfix/master.cf")
FALLBACK_MASTER_CF = Path("/usr/share/postfix/master.cf.dist")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free_on(addresses, candidates=None) -> int:
    """A port free on every one of ``addresses`` (the hosts of a cluster
    listen on the same ports), from ``candidates`` (default: free ports of
    127.0.0.1, a hundred tries)."""
    for port in candidates if candidates is not None else (free_port() for _ in range(100)):
        try:
            for address in addresses:
                with socket.socket() as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on every one of {', '.join(addresses)}")


def _private_master_cf(text: str, smtpd_port: int, address: str = "127.0.0.1") -> str:
    """The stock master.cf with no chroot and smtpd on a loopback port."""
    out = []
    for line in text.splitlines():
        if not line or line[0] in "# \t":
            out.append(line)
            continue
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "inet":
            if fields[0] == "smtp":
                fields[0] = f"{address}:{smtpd_port}"
            else:
                continue  # drop every other network listener
        if len(fields) >= 8:
            fields[4] = "n"  # chroot
        out.append(" ".join(fields))
    return "\n".join(out) + "\n"


@dataclass
class PostfixInstance:
    root: Path
    smtpd_port: int
    name: str
    address: str = "127.0.0.1"   # any loopback address: one machine can hold a cluster
    started: bool = False
    extra_main: dict[str, str] = field(default_factory=dict)
    mounts: list[Path] = field(default_factory=list)

    @property
    def config_directory(self) -> Path:
        return self.root / "etc"

    @property
    def queue_directory(self) -> Path:
        return self.root / "spool"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "maillog"

    @classmethod
    def create(cls, extra_main: dict[str, str] | None = None, address: str = "127.0.0.1",
               port: int | None = None) -> "PostfixInstance":
        root = Path(tempfile.mkdtemp(prefix="flushctl-pf-"))
        os.chmod(root, 0o755)
        port = port or free_port()
        inst = cls(root=root, smtpd_port=port, name=f"pftest{port}" + ("" if address == "127.0.0.1" else
                                                       "a" + address.rsplit(".", 1)[-1]),
                   address=address, extra_main=dict(extra_main or {}))
        inst._write_config()
        return inst

    def _write_config(self) -> None:
        etc = self.config_directory
        etc.mkdir()
        (self.root / "log").mkdir()
        data = self.root / "data"
        data.mkdir()
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        self.queue_directory.mkdir()
        # Postfix's stock master.cf, never the system's: the deployment test
        # adds our services there, which a private instance must not inherit
        master_src = FALLBACK_MASTER_CF if FALLBACK_MASTER_CF.exists() else SYSTEM_MASTER_CF
        (etc / "master.cf").write_text(
            _private_master_cf(master_src.read_text(), self.smtpd_port, self.address))
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_directory),
            "data_directory": str(data),
            "multi_instance_name": self.name,
            "syslog_name": self.name,
            "maillog_file_prefixes": f"/var, /dev/stdout, {self.root}",
            "maillog_file": str(self.log_file),
            "myhostname": "mx.provider.test",
            "mydomain": "provider.test",
            "mydestination": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions":
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtputf8_enable": "no",
            "queue_run_delay": "300s",
            "smtp_connect_timeout": "2s",
            "smtp_helo_timeout": "5s",
            "disable_dns_lookups": "yes",
            "smtp_host_lookup": "native",
            "minimal_backoff_time": "300s",
        }
        main.update(self.extra_main)
        (etc / "main.cf").write_text(
            "".join(f"{key} = {value}\n" for key, value in main.items()))

    # -- commands -----------------------------------------------------------
    def run(self, *argv: str, input: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), input=input, text=True,
                              capture_output=True, check=check, timeout=60)

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("postfix", "-c", str(self.config_directory), *args, check=check)

    def postconf(self, *args: str) -> str:
        return self.run("postconf", "-c", str(self.config_directory), *args).stdout

    def start(self) -> None:
        self.postfix("check")
        self.postfix("start")
        self.started = True
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.address, self.smtpd_port), 1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"private postfix did not listen; log:\n{self.log()}")

    def stop(self) -> None:
        if self.started:
            self.postfix("stop", check=False)
            self.started = False

    def destroy(self) -> None:
        self.stop()
        # master may take a moment to let its children go
        for _ in range(50):
            if self.postfix("status", check=False).returncode != 0:
                break
            time.sleep(0.1)
        for path in reversed(self.mounts):
            subprocess.run(["umount", str(path)], check=False, capture_output=True)
        self.mounts.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def mount_small_filesystem(self, path: Path, size_mib: int) -> None:
        """A tmpfs of SIZE at PATH (under this instance's root), unmounted by
        destroy: a file system that can be filled without touching the machine's."""
        path.mkdir(exist_ok=True)
        self.run("mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755",
                 "flushctl-test", str(path))
        self.mounts.append(path)

    def queue(self) -> list[dict]:
        out = self.run("postqueue", "-c", str(self.config_directory), "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""
