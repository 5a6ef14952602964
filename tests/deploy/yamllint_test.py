"""`yamllint --strict` (repository .yamllint) passes on every YAML file in
deploy/, and the Grafana dashboard is valid JSON with a query on every panel."""

import json
import os

import deploy_testlib as t


def main():
    yamllint = t.require_tool("yamllint", "yamllint")
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(t.DEPLOY)
                   for f in names if f.endswith((".yaml", ".yml")))
    t.check(len(files) >= 10, "deploy/ holds the manifests (found %d YAML files)" % len(files))
    result = t.run([yamllint, "--strict", "--format", "parsable",
                    "--config-file", os.path.join(t.REPO, ".yamllint")] + files)
    t.check(result.returncode == 0, "yamllint --strict:\n" + result.stdout + result.stderr)

    path = os.path.join(t.DEPLOY, "grafana", "mergeguard-dashboard.json")
    try:
        with open(path) as f:
            dashboard = json.load(f)
    except ValueError as error:
        t.fail("%s is not JSON: %s" % (path, error))
        t.finish()
    panels = [p for p in dashboard.get("panels", []) if p.get("type") != "row"]
    t.check(len(panels) >= 10, "dashboard has its panels")
    ids = [p.get("id") for p in dashboard["panels"]]
    t.check(len(ids) == len(set(ids)), "dashboard panel ids are unique")
    for panel in panels:
        exprs = [target.get("expr") for target in panel.get("targets", [])]
        t.check(exprs and all(exprs), "panel %r has a query" % panel.get("title"))
        t.check("gridPos" in panel, "panel %r is placed" % panel.get("title"))
    t.finish()


if __name__ == "__main__":
    main()
