"""The server's configuration file: the README's example is what the loader reads, and a mistake
is refused naming its key (`serve` exits 2 on it). What a real server does with it is in
test_isolation.py (priority ranges, quotas)."""

from __future__ import annotations

import math
import re

import pytest

from services.auth import TenantSettings
from services.cli import _submit_rate, build_parser
from services.server_config import ConfigError, load_server_config
from services.submit_rate import SubmitRate
from tests.services.helpers import ROOT

README_EXAMPLE = re.search(r"`chainrule serve --config server\.yaml`:\n\n  ```yaml\n(.*?)  ```",
                           (ROOT / "README.md").read_text(), re.DOTALL)


def test_the_readmes_example_configures_what_its_comments_say(tmp_path):
    assert README_EXAMPLE is not None
    path = tmp_path / "server.yaml"
    path.write_text(README_EXAMPLE.group(1))
    config = load_server_config(path)
    assert config.tenants == {"alice-token-0123456789": "alice",
                              "bob-token-0123456789ab": "bob"}
    assert config.min_priority == {"alice": 0} and config.max_priority == {"alice": 5}
    assert config.settings["alice"] == TenantSettings(
        weight=2.0, max_running_cpus=8.0, max_queued_jobs=100, max_stored_bytes=10 * 2**30,
        max_streams=4, submit_rate=2.0, submit_burst=20)
    assert config.admins == frozenset({"alice"})  # role: admin; bob's role is user
    assert config.settings["bob"] == TenantSettings()  # no quota, weight 1
    assert config.settings["bob"].max_running_cpus == math.inf


ALICE = "    tokens: [alice-token-0123456789]\n"


@pytest.mark.parametrize("text, message", [
    ("tenant:\n  alice: {}\n", "tenant: unknown key; the file has 'tenants' only"),
    ("tenants: []\n", "tenants: expected a mapping of tenant name to settings"),
    ("tenants:\n  alice:\n    tokens: short\n", "tenants.alice.tokens: expected a list"),
    ("tenants:\n  alice:\n    tokens: [short]\n", "tenants.alice.tokens: a token is at least 16"),
    ("tenants:\n  alice:\n" + ALICE + "  bob:\n" + ALICE,
     "tenants.bob.tokens: a token of tenant alice too"),
    ("tenants:\n  alice:\n" + ALICE + "    wieght: 2\n",
     "tenants.alice.wieght: unknown key; expected one of tokens, weight"),
    ("tenants:\n  alice:\n" + ALICE + "    weight: 0\n",
     "tenants.alice.weight: must be a number > 0, got 0"),
    ("tenants:\n  alice:\n" + ALICE + "    min_priority: 3\n    max_priority: 1\n",
     "tenants.alice.min_priority: must be at most max_priority (1), got 3"),
    ("tenants:\n  alice:\n" + ALICE + "    max_queued_jobs: 1.5\n",
     "tenants.alice.max_queued_jobs: must be a whole number from 1"),
    ("tenants:\n  alice:\n" + ALICE + "    max_stored_bytes: 10 GB of it\n",
     "tenants.alice.max_stored_bytes: must be a size in bytes > 0"),
    ("tenants:\n  alice:\n" + ALICE + "    max_streams: 0\n",
     "tenants.alice.max_streams: must be a whole number from 1 to 1000000, got 0"),
    ("tenants:\n  alice:\n" + ALICE + "    submit_rate: 0\n",
     "tenants.alice.submit_rate: must be a number > 0, got 0"),
    ("tenants:\n  alice:\n" + ALICE + "    submit_burst: 2.5\n",
     "tenants.alice.submit_burst: must be a whole number from 1 to 1000000, got 2.5"),
    ("tenants:\n  alice:\n" + ALICE + "    role: root\n",
     "tenants.alice.role: must be user or admin, got 'root'"),
    ("tenants:\n  al/ice:\n" + ALICE, "tenants.al/ice: a tenant name is 1-64 of"),
    ("tenants: {alice: [\n", "not YAML"),
])
def test_a_mistake_is_refused_naming_its_key(tmp_path, text, message):
    path = tmp_path / "server.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_server_config(path)


def test_serve_exits_2_naming_the_key_of_a_bad_configuration(tmp_path, capsys):
    path = tmp_path / "server.yaml"
    path.write_text("tenants:\n  alice:\n" + ALICE + "    max_running_cpus: -1\n")
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["serve", "--config", str(path)])
    assert exit.value.code == 2
    assert ("argument --config: " + str(path) + ": tenants.alice.max_running_cpus: must be a "
            "number > 0, got -1") in capsys.readouterr().err


def test_serves_default_submit_rate_is_5_a_second_in_bursts_of_50_and_0_lifts_it():
    parser = build_parser()
    assert _submit_rate(parser.parse_args(["serve"])) == SubmitRate(5.0, 50)
    assert _submit_rate(parser.parse_args(["serve", "--submit-rate", "0.5", "--submit-burst",
                                           "4"])) == SubmitRate(0.5, 4)
    assert _submit_rate(parser.parse_args(["serve", "--submit-rate", "0"])).unlimited


def test_serve_exits_2_on_a_negative_submit_rate(capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["serve", "--submit-rate", "-1"])
    assert exit.value.code == 2
    assert "argument --submit-rate: must be a number >= 0 (0: no limit), got -1" in (
        capsys.readouterr().err)
