"""A running stack for tests and benchmarks: a private Postfix instance,
our config applied to it, our daemons, and smtp-sink as the customer.

Everything binds to loopback on free ports and lives in temporary
directories; ``Stack.destroy`` stops what it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from instance import PostfixInstance, free_port  # noqa: E402

FLUSHCTL = [sys.executable, "-m", "flushctl"]
ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "ansible/roles/flushctl/templates/units"


def unit_privileges(daemon: str) -> tuple[str | None, str]:
    """The daemon's systemd drop-in: (its User=, or None for root; its
    CapabilityBoundingSet in setpriv's words)."""
    user, caps = None, []
    for line in (UNITS / f"{daemon}.conf.j2").read_text().splitlines():
        if line.startswith("User="):
            user = line.split("=", 1)[1]
        elif line.startswith("CapabilityBoundingSet="):
            caps = line.split("=", 1)[1].split()   # the last assignment wins
    return user, ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in caps])


def daemon_command(daemon: str) -> list[str]:
    """`flushctl DAEMON` as its unit runs it: its capabilities only, no new
    privileges.  A daemon whose unit names a User= (the poller) starts
    here as root with only the capabilities to become that user at once,
    which it does before anything else: this machine's Python lives where
    only root may read, so an interpreter cannot start as that user."""
    user, caps = unit_privileges(daemon)
    if user is not None:
        assert caps in ("-all", "-all,+net_bind_service"), \
            f"{daemon}: a User= unit keeps no capability but the one to bind a port"
        caps += ",+setuid,+setgid"
    return ["setpriv", "--no-new-privs", "--bounding-set", caps, "--inh-caps", "-all",
            *FLUSHCTL, daemon]


def wait_until(predicate, timeout=20.0, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _stop(proc: subprocess.Popen | None, sig=signal.SIGTERM) -> None:
    if proc and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 0.5):
            return True
    except OSError:
        return False


def _connectable(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))
        return True
    except OSError:
        return False


class Sink:
    """smtp-sink as the customer's mail server; -d keeps what it receives."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="flushctl-sink-"))
        os.chmod(self.dir, 0o1777)   # smtp-sink writes as nobody; sticky: only owners remove
        self.proc = None

    def start(self, refuse: str | None = None, options: tuple[str, ...] = ()):
        """Serve; ``refuse``: "soft" answers every RCPT with 4xx, "hard" with 5xx;
        ``options``: more of smtp-sink's."""
        mode = {None: [], "soft": ["-r", "rcpt"], "hard": ["-f", "rcpt"]}[refuse] + list(options)
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", *mode, "-d", str(self.dir) + "/%M%S.",
             "-h", "customer.test", f"{self.host}:{self.port}", "64"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._listening, 10, what="smtp-sink")
        return self

    def _listening(self):
        try:
            with socket.create_connection((self.host, self.port), 0.5):
                return True
        except OSError:
            return False

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def restart(self, refuse: str | None = None):
        self.stop()
        return self.start(refuse)

    def messages(self) -> list[str]:
        """What the sink has received whole: a file smtp-sink still has open
        is a transaction under way (it writes as the data comes). Listed
        first, then its open files read: a file it closed is never opened
        again, so one listed and not open then is complete."""
        paths = sorted(p for p in Path(os.path.realpath(self.dir)).rglob("*") if p.is_file())
        writing = self._open_files()
        out = []
        for path in paths:
            if str(path) in writing:
                continue
            try:
                out.append(path.read_text(errors="replace"))
            except FileNotFoundError:   # an aborted transaction, removed by smtp-sink
                pass
        return out

    def started(self) -> int:
        """Transactions the sink has taken data for, whole or still being
        written: what a check that nothing was delivered counts (messages()
        leaves out a delivery under way)."""
        return sum(1 for p in Path(os.path.realpath(self.dir)).rglob("*") if p.is_file())

    def _open_files(self) -> set[str]:
        """The files smtp-sink has open. It runs as nobody, so reading its
        fds takes root's CAP_SYS_PTRACE: without it this says so rather
        than see nothing open."""
        if self.proc is None:
            return set()
        fds = f"/proc/{self.proc.pid}/fd"
        out = set()
        try:
            names = os.listdir(fds)
        except (FileNotFoundError, ProcessLookupError):   # it ended: nothing open
            return out
        for fd in names:
            try:
                out.add(os.readlink(f"{fds}/{fd}"))
            except (FileNotFoundError, ProcessLookupError):   # closed meanwhile
                pass
            except PermissionError as exc:
                raise RuntimeError(f"cannot see smtp-sink's open files: {exc}") from None
        return out

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Stack:
    pf: PostfixInstance
    config_path: Path
    state_dir: Path
    sink: Sink
    milter: subprocess.Popen | None = None
    gateway: subprocess.Popen | None = None
    poller: subprocess.Popen | None = None
    helper: subprocess.Popen | None = None
    odmr: subprocess.Popen | None = None
    portal: subprocess.Popen | None = None

    @property
    def cfg(self):
        from flushctl import config
        return config.load(str(self.config_path))

    def _daemon(self, name: str) -> subprocess.Popen:
        """Start `flushctl NAME` in the background, its log in the state directory."""
        env = dict(os.environ, FLUSHCTL_CONFIG=str(self.config_path))
        with open(self.state_dir / f"{name}.log", "ab") as log:
            # its own process group, so a test can kill it with its children
            return subprocess.Popen(daemon_command(name), env=env, stdout=subprocess.DEVNULL,
                                    stderr=log, start_new_session=True)

    def start_helper(self):
        """The release helper (root), which the gateway and the poller ask."""
        if self.helper is not None and self.helper.poll() is None:
            return
        self.helper = self._daemon("helper")
        path = Path(self.cfg.helper_socket)
        wait_until(lambda: _connectable(path) or self.helper.poll() is not None, 15,
                   what="release helper socket")
        assert self.helper.poll() is None, self.daemon_log("helper")

    def stop_helper(self, sig=signal.SIGTERM):
        _stop(self.helper, sig)
        self.helper = None

    def daemon_log(self, name: str) -> str:
        try:
            return (self.state_dir / f"{name}.log").read_text()
        except FileNotFoundError:
            return ""

    def start_poller(self):
        self.start_helper()
        self.poller = self._daemon("poller")

    def stop_poller(self):
        _stop(self.poller)
        self.poller = None

    def _start_announced(self, name: str, timeout: float) -> subprocess.Popen:
        """Start daemon ``name`` (the helper first) and wait for its next
        event=start line; it must still be running then."""
        self.start_helper()
        started = self.daemon_log(name).count("event=start ")
        proc = self._daemon(name)
        setattr(self, name, proc)
        wait_until(lambda: self.daemon_log(name).count("event=start ") > started
                   or proc.poll() is not None, timeout, what=f"{name} started")
        assert proc.poll() is None, self.daemon_log(name)
        return proc

    def start_gateway(self):
        """The gateway, once it serves: the helper binds its listeners (they
        take connections from then on), the gateway says when it accepts."""
        self._start_announced("gateway", 15)
        cfg = self.cfg
        for where in (cfg.finger_listen, cfg.policy_listen):
            if getattr(where, "kind", "inet") == "unix":
                wait_until(lambda: _connectable(Path(where.path)), 15,
                           what=f"gateway on {where}")
            else:
                wait_until(lambda: _tcp_open(where.host, where.port), 15,
                           what=f"gateway on {where}")

    def start_odmr(self):
        """The ODMR daemon, once its ports take connections."""
        self._start_announced("odmr", 20)

    def start_portal(self):
        """The portal (section [portal] in the config), once it takes connections."""
        self._start_announced("portal", 20)
        where = self.cfg.portal.listen
        wait_until(lambda: _tcp_open(where.host, where.port), 15, what="portal listening")

    def stop_portal(self, sig=signal.SIGTERM):
        _stop(self.portal, sig)
        self.portal = None

    @property
    def portal_url(self) -> str:
        where = self.cfg.portal.listen
        return f"http://{where.host}:{where.port}"

    def stop_odmr(self, sig=signal.SIGTERM):
        _stop(self.odmr, sig)
        self.odmr = None

    def stop_gateway(self):
        _stop(self.gateway)
        self.gateway = None

    def finger(self, query: str, *options: str) -> str:
        """The Debian finger client against our gateway.

        The client only speaks to the port /etc/services names for finger,
        so it runs in a private mount namespace where that file says ours.
        """
        services = self.state_dir / "services"
        services.write_text(f"finger\t\t{self.cfg.finger_listen.port}/tcp\n")
        proc = subprocess.run(
            ["unshare", "--mount", "sh", "-c",
             'mount --bind "$0" /etc/services && exec finger "$@"', str(services),
             *options, f"{query}@{self.cfg.finger_listen.host}"],
            capture_output=True, text=True, timeout=60)
        return proc.stdout + proc.stderr

    def gateway_log(self) -> str:
        """The gateway's log, then its release helper's (which releases,
        refuses what the gateway should not have asked, and forwards)."""
        return self.daemon_log("gateway") + self.daemon_log("helper")

    def flushctl(self, *args, check=True, timeout=120, input=None):
        env = dict(os.environ, FLUSHCTL_CONFIG=str(self.config_path))
        proc = subprocess.run([*FLUSHCTL, *args], capture_output=True, text=True,
                              env=env, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"flushctl {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def status(self, domain=None):
        args = ["status", "--json"] + ([domain] if domain else [])
        return json.loads(self.flushctl(*args).stdout)

    def send(self, rcpts, sender="someone@sender.test", subject="test", body="hello\n",
             extra_headers=""):
        msg = (f"From: {sender}\nTo: {', '.join(rcpts)}\nSubject: {subject}\n"
               f"{extra_headers}\n{body}")
        with smtplib.SMTP(self.pf.address, self.pf.smtpd_port, timeout=30) as smtp:
            return smtp.sendmail(sender, rcpts, msg)

    def start_milter(self):
        sock = Path(self.cfg.milter_listen.path)
        self.milter = self._daemon("milter")
        wait_until(lambda: _connectable(sock), 15, what="milter socket")

    def stop_milter(self, sig=signal.SIGTERM):
        _stop(self.milter, sig)
        self.milter = None

    def queue(self):
        return self.pf.queue()

    def metrics_up(self) -> bool:
        """Does the poller's metrics endpoint answer?"""
        try:
            self.scrape()
            return True
        except OSError:
            return False

    def scrape(self) -> dict:
        """The poller's metrics, parsed by prometheus-client's own parser:
        {(sample name, frozenset of label items): value}."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families
        hp = self.cfg.metrics_listen
        with urllib.request.urlopen(f"http://{hp.host}:{hp.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples}

    def dead_daemons(self) -> list[str]:
        return [f"{name} exited {proc.returncode}"
                for name, proc in (("milter", self.milter), ("gateway", self.gateway),
                                   ("poller", self.poller), ("helper", self.helper),
                                   ("odmr", self.odmr), ("portal", self.portal))
                if proc is not None and proc.poll() is not None]

    def destroy(self):
        self.stop_portal()
        self.stop_poller()
        self.stop_odmr()
        self.stop_gateway()
        self.stop_helper()
        self.stop_milter()
        self.sink.cleanup()
        self.pf.destroy()


@dataclass(frozen=True)
class Ports:
    finger_port: int   # the policy service is a unix socket in the instance's private/


def write_config(path: Path, pf: PostfixInstance, state_dir: Path, domains: str,
                 ports: "Ports | None" = None, gateway_extra: str = "",
                 poller_extra: str = "", extra: str = "") -> None:
    """Our config for the instance ``pf``; ``extra``: more sections ([cluster])."""
    ports = ports or Ports(free_port())
    path.write_text(f"""
[postfix]
config_directory = "{pf.config_directory}"
[state]
directory = "{state_dir}"
[milter]
listen = "unix:{state_dir.parent}/milter/milter.sock"
user = "nobody"   # as in production: never root
[gateway]
finger_listen = "{pf.address}:{ports.finger_port}"
policy_listen = "unix:{pf.queue_directory}/private/flushctl-policy"
{gateway_extra}
[poller]
probe_timeout = 2
{poller_extra}
[helper]
socket = "{state_dir.parent}/run/helper.sock"
group = "nogroup"   # nobody's: the daemons' user here
[metrics]
listen = "127.0.0.1:{free_port()}"
{extra}
{domains}
""")


def default_domains(sink_port: int) -> str:
    return f"""
[domains."customer.test"]
relay = "[127.0.0.1]:{sink_port}"

[domains."listed.test"]
relay = "[127.0.0.1]:{sink_port}"
recipients = ["alice@listed.test", "Bob@listed.test"]

[domains."small.test"]
relay = "[127.0.0.1]:{sink_port}"
quota_messages = 2
"""



def build_stack(extra_main=None, domains=None, start_sink=False, milter=True, gateway=False,
                gateway_extra="", poller_extra="", prepare=None, address="127.0.0.1",
                smtpd_port=None, ports=None, extra="") -> "Stack":
    """A running stack; ``extra_main`` tunes the private main.cf,
    ``domains(sink_port)`` gives the [domains] tables, ``prepare(pf)``
    writes files the config names before the first apply; ``address``,
    ``smtpd_port``, ``ports`` (finger, policy) and ``extra`` (more config
    sections; ``@QUEUE@`` in it is the instance's queue directory) make
    one host of a cluster."""
    sink = Sink()
    pf = PostfixInstance.create(extra_main, address=address, port=smtpd_port)
    if prepare:
        try:
            prepare(pf)
        except BaseException:
            pf.destroy()
            raise
    state_dir = pf.root / "state"
    state_dir.mkdir(exist_ok=True)   # prepare may have mounted something there
    config_path = pf.root / "flushctl.toml"
    write_config(config_path, pf, state_dir, (domains or default_domains)(sink.port),
                 ports=ports, gateway_extra=gateway_extra, poller_extra=poller_extra,
                 extra=extra.replace("@QUEUE@", str(pf.queue_directory)))
    stack = Stack(pf=pf, config_path=config_path, state_dir=state_dir, sink=sink)
    try:
        stack.flushctl("apply")
        pf.start()
        if milter:
            stack.start_milter()
        if gateway:
            stack.start_gateway()
        if start_sink:
            sink.start()
    except BaseException:
        stack.destroy()
        raise
    return stack
