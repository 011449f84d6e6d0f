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


def test_domains_json_shows_logins_and_odmr(tmp_path):
    path = tmp_path / "flushctl.toml"
    path.write_text('[odmr]\n[domains."home.example"]\nodmr = true\nusers = ["cust1"]\n'
                    '[domains."b.example"]\n')
    code, out = run("--config", str(path), "domains", "--json")
    assert code == 0
    rows = {r["domain"]: r for r in json.loads(out)}
    assert rows["home.example"]["users"] == ["cust1"] and rows["home.example"]["odmr"] is True
    assert rows["b.example"]["users"] == [] and rows["b.example"]["odmr"] is False
    code, out = run("--config", str(path), "domains")
    assert "relay=(ODMR)" in out


def test_json_rows_is_the_same_json_one_row_a_line():
    from flushctl.cli.context import json_rows
    rows = [{"domain": "a.example", "messages": 3, "queues": {"hold": 3}, "last_error": None},
            {"domain": "b.example", "messages": 0, "queues": {}, "last_error": "é \"x\"\n"}]
    text = json_rows(rows)
    assert json.loads(text) == rows
    assert text.splitlines()[1:-1] == ["  " + json.dumps(r) + ("," if i == 0 else "")
                                        for i, r in enumerate(rows)]
    assert json.loads(json_rows([])) == []


def test_the_row_encoder_writes_what_json_dumps_writes_and_refuses_what_it_refuses():
    import math

    import pytest

    from flushctl.cli.context import row_encoder
    encode = row_encoder()
    assert encode is not json.dumps          # the one C encoder, on this Python
    for row in [{"a": 1.5, "b": [1, None, True], "c": {"x": "\u2603\ud83d\ude00"}},
                {"f": 1e300, "g": -0.0, "h": math.inf, "i": 10**30, "j": ""}, {}]:
        assert encode(row) == json.dumps(row)
    with pytest.raises(TypeError):
        encode({"a": {1, 2}})
