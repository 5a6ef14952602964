"""deploy/prometheus: `promtool check rules` accepts the rules file and
`promtool test rules` shows every alert firing on bad series and silent on
good ones; the generated PrometheusRule is up to date."""

import os

import yaml

import deploy_testlib as t


def main():
    promtool = t.require_tool("promtool", "prometheus")
    directory = os.path.join(t.DEPLOY, "prometheus")
    checked = t.run([promtool, "check", "rules", "mergeguard-rules.yaml"], cwd=directory)
    print(checked.stdout + checked.stderr)
    t.check(checked.returncode == 0, "promtool check rules failed")
    t.check("SUCCESS" in checked.stdout, "promtool found the rules")

    tested = t.run([promtool, "test", "rules", "mergeguard-rules.test.yaml"], cwd=directory)
    print(tested.stdout + tested.stderr)
    t.check(tested.returncode == 0, "promtool test rules failed")

    # Every alert in the rules file is exercised by the unit tests.
    with open(os.path.join(directory, "mergeguard-rules.yaml")) as f:
        alerts = {r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"] if "alert" in r}
    with open(os.path.join(directory, "mergeguard-rules.test.yaml")) as f:
        tests = yaml.safe_load(f)["tests"]
    fired = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    t.check(alerts <= fired, "unit tests show these alerts firing: %s" % sorted(alerts - fired))

    sync = t.run([os.path.join(directory, "sync-prometheusrule"), "--check"])
    t.check(sync.returncode == 0, "deploy/k8s/base/prometheusrule.yaml is stale:\n" + sync.stdout + sync.stderr)
    t.finish()


if __name__ == "__main__":
    main()
