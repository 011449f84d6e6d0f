"""Read commands that need no Postfix: their --json output."""

import json

from click.testing import CliRunner

from flushctl.cli.main import main


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout


def test_check_config_json_says_ok_and_names_the_domains(tmp_path):
    path = tmp_path / "flushctl.toml"
    path.write_text('[domains."b.example"]\n[domains."a.example"]\n')
    code, out = run("--config", str(path), "check-config", "--json")
    assert code == 0
    assert json.loads(out) == {"path": str(path), "ok": True,
                               "domains": ["a.example", "b.example"]}


def test_check_config_json_says_what_is_wrong_and_exits_1(tmp_path):
    path = tmp_path / "flushctl.toml"
    path.write_text('[gateway]\nfinger_listen = "79"\n')
    code, out = run("--config", str(path), "check-config", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False and "gateway.finger_listen" in data["error"]
    # and without --json: the error on stderr, nothing on stdout
    code, out = run("--config", str(path), "check-config")
    assert code == 1 and out == ""
