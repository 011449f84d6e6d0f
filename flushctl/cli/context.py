"""What every command acts on: the config, loaded once, and the library of held mail."""

from __future__ import annotations

import json
import sqlite3

import click

from flushctl import config as config_mod
from flushctl import names
from flushctl.cli.errors import CliError
from flushctl.config import Domain, UnknownDomain


class Context:
    def __init__(self, config_path: str | None):
        self.path = config_mod.resolve_path(config_path)
        self._config = None
        self._heldmail = None

    @property
    def config(self) -> config_mod.Config:
        if self._config is None:
            try:
                self._config = config_mod.load(self.path)
            except config_mod.ConfigError as exc:
                raise CliError(str(exc)) from None
        return self._config

    @property
    def heldmail(self):
        if self._heldmail is None:
            from flushctl.heldmail.library import HeldMail
            try:
                self._heldmail = HeldMail(self.config)
            except (OSError, sqlite3.Error) as exc:
                raise CliError(f"cannot open the ledger in {self.config.state_directory}: {exc}")
        return self._heldmail

    def domain(self, name: str) -> Domain:
        """The configured domain the admin named, validated once: the value
        the library is given."""
        try:
            return self.config.domain(name)
        except UnknownDomain as exc:
            raise CliError(str(exc)) from None

    def domain_or_removed(self, name: str) -> str:
        """A configured domain, or a removed one whose mail is still held."""
        try:
            return self.config.domain(name).name
        except UnknownDomain as exc:
            try:
                key = names.domain(name)
            except ValueError:
                raise CliError(str(exc)) from None
            if key in self.heldmail.removed_domains():
                return key
            raise CliError(str(exc)) from None


pass_ctx = click.make_pass_decorator(Context)


def json_rows(rows: list) -> str:
    """A JSON array with one row per line: the C encoder writes each row (the
    pretty-printer is pure Python, seconds for 100,000 domains), and a
    reader still sees one row per line."""
    if not rows:
        return "[]"
    encode = row_encoder()
    return json_lines(encode(row) for row in rows)


def json_lines(texts) -> str:
    """A JSON array of values already encoded, one per line."""
    body = ",\n".join("  " + text for text in texts)
    return "[\n" + body + "\n]" if body else "[]"


def string_encoder():
    """``json.dumps`` of one string as ``row_encoder`` writes strings (ASCII,
    escaped), in C where the json module has it."""
    from json import encoder
    return encoder.encode_basestring_ascii


def row_encoder():
    """``json.dumps`` for one row, with one C encoder made for all of them
    (``json.dumps`` makes one per call: most of its cost for a small row).
    The encoder's maker is the json module's own, not public: where it is
    missing or called differently, ``json.dumps`` itself."""
    from json import encoder
    try:
        make = encoder.c_make_encoder(None, json.JSONEncoder().default,
                                      encoder.encode_basestring_ascii, None, ": ", ", ",
                                      False, False, True)
    except TypeError:   # None (no C encoder) or another signature
        return json.dumps
    return lambda row: "".join(make(row, 0))
