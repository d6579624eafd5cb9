"""The alert rules through promtool: `promtool check rules` on the PrometheusRule's
groups, and `promtool test rules` on the unit tests in tests/alerts/, where every
alert must have a case that fires it and a case that must not.

promtool reads plain rule files, so spec.groups is written to a temporary
prometheus-rule.rules.yaml, and the tests are copied beside it (their
`rule_files` name it). The promtool processes run in the background while the
caller does its own checks: `start` then `finish`.
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

TESTS_DIR = "tests/alerts"
RULES_NAME = "prometheus-rule.rules.yaml"


def start(promtool, groups, repo, tmp):
    """Writes the rule file and starts promtool on it and on every test file.
    Returns the running (description, process) pairs, the test files, and the
    stamp to write once they pass (None when a stamp says they already did)."""
    tmp = Path(tmp)
    # JSON is YAML, and takes the loader's dict subclass as it is.
    rules = json.dumps({"groups": groups}, indent=1)
    (tmp / RULES_NAME).write_text(rules, encoding="utf-8")
    tests = sorted((Path(repo) / TESTS_DIR).glob("*.test.yaml"))
    # promtool's verdict depends only on the rules, the tests and promtool: a stamp
    # of them skips it (seconds of CPU) when nothing changed since it passed.
    digest = hashlib.sha256(rules.encode())
    for t in tests:
        digest.update(t.name.encode() + b"\0" + t.read_bytes())
    st = os.stat(promtool)
    digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    stamp = (Path(repo) / ".tools" / "promtool.passed", digest.hexdigest())
    try:
        if stamp[0].read_text(encoding="utf-8") == stamp[1]:
            return [], tests, None
    except OSError:
        pass
    runs = []

    def run(what, *args):
        p = subprocess.Popen(
            [promtool, *args],
            cwd=tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        runs.append((what, p))

    run("promtool check rules", "check", "rules", RULES_NAME)
    for t in tests:
        shutil.copy(t, tmp / t.name)
        run(f"promtool test rules {TESTS_DIR}/{t.name}", "test", "rules", t.name)
    return runs, tests, stamp


def finish(runs, stamp, report):
    ok = True
    for what, p in runs:
        out, _ = p.communicate(timeout=300)
        if p.returncode != 0:
            ok = False
            report(what, f"failed:\n{out.strip()}")
    if ok and stamp is not None:
        path, value = stamp
        path.parent.mkdir(exist_ok=True)
        path.write_text(value, encoding="utf-8")


def coverage(alert_names, tests, report):
    """Every alert needs a case where it fires and one where it must not. Returns
    (firing cases, quiet cases) over all alerts."""
    fires = dict.fromkeys(alert_names, 0)
    quiet = dict.fromkeys(alert_names, 0)
    for path in tests:
        where = f"{TESTS_DIR}/{path.name}"
        with path.open(encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        if doc.get("rule_files") != [RULES_NAME]:
            report(where, f"rule_files must be [{RULES_NAME}]")
        for test in doc.get("tests") or []:
            for case in test.get("alert_rule_test") or []:
                name = case.get("alertname")
                if name not in fires:
                    report(where, f"test {test.get('name')!r}: no alert named {name!r}")
                elif case.get("exp_alerts"):
                    fires[name] += 1
                else:
                    quiet[name] += 1
    for name in alert_names:
        if not fires[name]:
            report(TESTS_DIR, f"alert {name} has no test case that fires it")
        if not quiet[name]:
            report(TESTS_DIR, f"alert {name} has no test case where it must stay quiet")
    return sum(fires.values()), sum(quiet.values())
