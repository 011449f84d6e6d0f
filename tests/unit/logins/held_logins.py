"""For the tests of the helper's login sides (ODMR, the portal): a config in
a temporary state directory, with logins in a real store (root's)."""

import os

import pytest

from flushctl import config
from flushctl.logins import store

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the store is root's: run as root")


class Held:
    """The parts of HeldMail the login requests touch."""

    def __init__(self, cfg):
        self.config = cfg


def held_with(tmp_path, sections: str, logins: dict[str, str]) -> Held:
    cfg = config.parse(f'[state]\ndirectory = "{tmp_path}"\n{sections}',
                       str(tmp_path / "t.toml"))
    for user, password in logins.items():
        store.add_user(cfg.logins_path, user, password)
    return Held(cfg)
