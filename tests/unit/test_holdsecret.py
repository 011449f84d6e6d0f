"""flushctl.holdsecret: the secret survives a lost state directory."""

import os

from flushctl import config, holdsecret, settings


def test_saved_secret_is_read_back_private(tmp_path):
    holdsecret.save(str(tmp_path), "ab" * 16)
    assert holdsecret.stored(str(tmp_path)) == "ab" * 16
    assert os.stat(tmp_path / holdsecret.FILENAME).st_mode & 0o077 == 0


def test_missing_state_falls_back_to_the_table_apply_wrote(tmp_path):
    cfg = config.parse(f'[postfix]\nconfig_directory = "{tmp_path}"\n'
                       '[domains."customer.example"]\n', "t.toml")
    secret = holdsecret.new()
    table = tmp_path / "hold_tagged"
    table.write_text(settings.render_maps(cfg, secret)["hold_tagged"])
    assert holdsecret.stored(str(tmp_path / "state")) == ""
    assert holdsecret.in_table(str(table)) == secret
    assert holdsecret.read(str(tmp_path / "state"), str(table)) == secret


def test_no_secret_anywhere_is_empty(tmp_path):
    assert holdsecret.read(str(tmp_path / "state"), str(tmp_path / "nothing")) == ""


def test_new_secrets_differ_and_are_hex():
    a, b = holdsecret.new(), holdsecret.new()
    assert a != b
    int(a, 16)
    assert len(a) == 32
