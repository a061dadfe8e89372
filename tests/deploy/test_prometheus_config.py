"""promtool on deploy/prometheus: the scrape config and the alert rules are valid, and every
alert has a unit test in which it fires and one in which it stays silent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import DEPLOY

PROMETHEUS = DEPLOY / "prometheus"


def run(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_names() -> list[str]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule["alert"] for group in rules["groups"] for rule in group["rules"]]


def test_scrape_config_is_valid(promtool):
    check = run(promtool, "check", "config", "prometheus.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout


def test_alert_rules_are_valid(promtool):
    check = run(promtool, "check", "rules", "alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in check.stdout


def test_alert_unit_tests_pass(promtool):
    check = run(promtool, "test", "rules", "alerts_test.yml")
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_asked_for_alerts_exist():
    names = set(alert_names())
    for wanted in ("ChainruleTrainingStalled", "ChainruleTrainingLossNaN",
                   "ChainruleTrainingLossDiverging", "ChainruleGradientExploding",
                   "ChainruleGradientVanishing", "ChainruleWorkerLost", "ChainruleQueueBacklog",
                   "ChainruleApiErrorRate"):
        assert wanted in names


def test_every_alert_has_a_firing_case_and_a_silent_case():
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fires, silent = set(), set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    for name in alert_names():
        assert name in fires, f"{name} never fires in alerts_test.yml"
        assert name in silent, f"{name} is never checked silent in alerts_test.yml"


@pytest.mark.parametrize("name", alert_names())
def test_the_unit_tests_catch_a_rule_that_never_or_always_fires(promtool, tmp_path, name):
    """The cases are not vacuous: replacing one rule's condition by `vector(0) > 1` (never)
    must fail its firing case, by `vector(1)` with the case's labels (always) its silent one."""
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path / "alerts_test.yml")
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for condition in ("vector(0) > 1", "vector(1)"):
        for group in rules["groups"]:
            for rule in group["rules"]:
                if rule["alert"] == name:
                    rule["expr"] = condition
                    rule.pop("for", None)
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
        result = run(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
        assert result.returncode != 0, f"{name} with `{condition}` still passes its tests"
        assert name in result.stdout + result.stderr
