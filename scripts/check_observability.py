"""Valet's Prometheus rules, Grafana dashboard and README metric table, offline:

  k8s/prometheus-rule.yaml   (PrometheusRule: recording rules + alerts)
  k8s/grafana-dashboard.json (Grafana dashboard)
  README.md                  (the metric table under "Observability")

Every metric and label is checked against the contract the code exports
(`valet metrics`, src/metrics_contract.rs): names, label names, and label values
where the code bounds them. Every PromQL expression is parsed and followed
(promql_shape.py). Beyond that: the PrometheusRule shape; every rule has `record`
or `alert` and `expr`; durations are valid; alerts have a severity and
summary/description whose {{ }} templates use known variables and functions, and
only labels the alert's expression keeps; recording rules are defined before
their use within a group; `by`/`on` labels exist. The alerts go through
`promtool check rules` and `promtool test rules` (alert_tests.py), and every alert
must have tests. For the dashboard: uid, title, template variables, unique panel
ids, gridPos inside 24 columns and not overlapping, targets with expr and refId,
datasource ${datasource}, and every expr parses once Grafana variables ($route,
$__rate_interval, ...) are substituted.

Usage: check_observability.py REPO VALET PROMTOOL. Exits non-zero with a line
per problem.
"""

import json
import os
import re
import sys
import tempfile

import yaml

import alert_tests
import metric_contract
from metric_contract import SCRAPE_LABELS
from promql_shape import UNKNOWN, Shape, check_expr, self_test

REPO, VALET, PROMTOOL = sys.argv[1:4]
RULES_FILE = "k8s/prometheus-rule.yaml"
DASHBOARD_FILE = "k8s/grafana-dashboard.json"
README_FILE = "README.md"

problems = []


def fail(where, msg):
    line = f"{where}: {msg}"
    if line not in problems:
        problems.append(line)


def fatal(msg):
    print(f"check-observability: {msg}", file=sys.stderr)
    sys.exit(1)


# --------------------------------------------------------- alert templates
TEMPLATE_FUNCS = {
    "humanize",
    "humanize1024",
    "humanizeDuration",
    "humanizePercentage",
    "humanizeTimestamp",
    "printf",
    "title",
    "toUpper",
    "toLower",
    "reReplaceAll",
    "match",
    "stripPort",
    "stripDomain",
    "first",
    "label",
    "value",
    "query",
    "sortByLabel",
    "safeHtml",
    "args",
    "tableLink",
    "graphLink",
    "strvalue",
    "externalURL",
    "pathPrefix",
    "urlQueryEscape",
    "toTime",
    "parseDuration",
    "len",
    "index",
    "and",
    "or",
    "not",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
}
TEMPLATE_KEYWORDS = {"if", "else", "end", "with", "range", "define", "template", "block"}
TOKEN = re.compile(
    r'\s*(?:("(?:[^"\\]|\\.)*"|`[^`]*`)|(\$labels\.([A-Za-z_][A-Za-z0-9_]*))|'
    r"(\$externalLabels\.[A-Za-z_][A-Za-z0-9_]*)|(\$value|\$externalURL|\$labels|\$)|"
    r"(\.[A-Za-z_][A-Za-z0-9_.]*|\.)|(-?[0-9][0-9.eE+-]*)|([A-Za-z_][A-Za-z0-9_]*)|([|()])|(:?=))"
)


def check_template(where, text, label_shape):
    if not isinstance(text, str):
        fail(where, "must be a string")
        return
    depth = 0
    pos = 0
    while True:
        start = text.find("{{", pos)
        stray = text.find("}}", pos)
        if stray != -1 and (start == -1 or stray < start):
            fail(where, f"'}}}}' without '{{{{' at offset {stray}")
            return
        if start == -1:
            break
        end = text.find("}}", start + 2)
        if end == -1:
            fail(where, f"'{{{{' at offset {start} is never closed")
            return
        action = text[start + 2 : end].strip()
        action = action.removeprefix("-").removesuffix("-").strip()
        pos = end + 2
        if action.startswith("/*"):
            continue
        i = 0
        while i < len(action):
            m = TOKEN.match(action, i)
            if not m or m.end() == i:
                fail(where, f"cannot read template action {{{{ {action} }}}} near {action[i:]!r}")
                break
            i = m.end()
            if m.group(3):
                label = m.group(3)
                if label_shape is not None and not label_shape.has(label, SCRAPE_LABELS):
                    have = ", ".join(
                        sorted(label_shape.labels | (SCRAPE_LABELS if label_shape.open else set()))
                    )
                    fail(
                        where,
                        f"uses $labels.{label}, but the alert's series carry only: {have or 'no labels'}",
                    )
            elif m.group(8):
                word = m.group(8)
                if word in TEMPLATE_KEYWORDS:
                    if word in ("if", "with", "range", "define", "block"):
                        depth += 1
                    elif word == "end":
                        depth -= 1
                elif word not in TEMPLATE_FUNCS and word not in ("true", "false", "nil"):
                    fail(where, f"unknown template function {word!r} in {{{{ {action} }}}}")
    if depth != 0:
        fail(where, "unbalanced {{ if/with/range }} ... {{ end }}")


# --------------------------------------------------------------- YAML loader
class LineDict(dict):
    line = 0


class Loader(yaml.SafeLoader):
    pass


def _construct_map(loader, node):
    data = LineDict()
    data.line = node.start_mark.line + 1
    yield data
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            fail(f"{RULES_FILE}:{key_node.start_mark.line + 1}", f"duplicate key {key!r}")
        seen.add(key)
    data.update(loader.construct_mapping(node))


Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)

DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
RECORD_NAME = re.compile(r"^valet:[a-z0-9_]+:[a-z0-9_]+$")
ALERT_NAME = re.compile(r"^Valet[A-Z][A-Za-z0-9]*$")
SEVERITIES = {"critical", "warning", "info"}
RULE_KEYS = {"record", "alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
GROUP_KEYS = {
    "name",
    "interval",
    "rules",
    "limit",
    "query_offset",
    "labels",
    "partial_response_strategy",
}


def check_duration(where, value):
    if not isinstance(value, str) or not DURATION.match(value):
        fail(where, f"{value!r} is not a Prometheus duration (e.g. 5m, 1h30m)")


def check_rules(contract):
    path = os.path.join(REPO, RULES_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.load(fh, Loader=Loader)
    except (OSError, yaml.YAMLError) as e:
        fail(RULES_FILE, f"cannot read YAML: {e}")
        return 0, 0, {}, [], []
    if not isinstance(doc, dict):
        fail(RULES_FILE, "not a YAML mapping")
        return 0, 0, {}, [], []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(RULES_FILE, "apiVersion must be monitoring.coreos.com/v1")
    if doc.get("kind") != "PrometheusRule":
        fail(RULES_FILE, "kind must be PrometheusRule")
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        fail(RULES_FILE, "metadata.name is required")
    groups = (doc.get("spec") or {}).get("groups") if isinstance(doc.get("spec"), dict) else None
    if not isinstance(groups, list) or not groups:
        fail(RULES_FILE, "spec.groups must be a non-empty list")
        return 0, 0, {}, [], []

    # Every recording rule first, so that a rule may use one from another group.
    all_records = {}
    for group in groups:
        for rule in (group.get("rules") or []) if isinstance(group, dict) else []:
            if isinstance(rule, dict) and isinstance(rule.get("record"), str):
                all_records.setdefault(rule["record"], None)

    records = {}  # record name -> Shape, filled in file order
    defined = set()
    alert_names = set()
    group_names = set()
    n_rules = n_exprs = 0
    for gi, group in enumerate(groups):
        gwhere = f"{RULES_FILE}:{getattr(group, 'line', '?')} group #{gi + 1}"
        if not isinstance(group, dict):
            fail(gwhere, "a group must be a mapping")
            continue
        name = group.get("name")
        if not isinstance(name, str) or not name:
            fail(gwhere, "group needs a name")
        elif name in group_names:
            fail(gwhere, f"duplicate group name {name!r}")
        else:
            group_names.add(name)
            gwhere = f"{RULES_FILE}:{group.line} group {name}"
        for key in set(group) - GROUP_KEYS:
            fail(gwhere, f"unknown key {key!r}")
        if "interval" in group:
            check_duration(gwhere + " interval", group["interval"])
        rules = group.get("rules")
        if not isinstance(rules, list) or not rules:
            fail(gwhere, "rules must be a non-empty list")
            continue
        in_group = {r.get("record") for r in rules if isinstance(r, dict)}
        for ri, rule in enumerate(rules):
            n_rules += 1
            where = f"{RULES_FILE}:{getattr(rule, 'line', '?')} rule #{ri + 1} of {name}"
            if not isinstance(rule, dict):
                fail(where, "a rule must be a mapping")
                continue
            is_record, is_alert = "record" in rule, "alert" in rule
            if is_record == is_alert:
                fail(where, "a rule needs exactly one of `record` or `alert`")
                continue
            title = rule.get("record") if is_record else rule.get("alert")
            if is_record and isinstance(title, str) and title not in records:
                records[title] = UNKNOWN()  # replaced below once its expr is known
            where = f"{RULES_FILE}:{rule.line} {'record' if is_record else 'alert'} {title}"
            for key in set(rule) - RULE_KEYS:
                fail(where, f"unknown key {key!r}")
            if "expr" not in rule:
                fail(where, "missing `expr`")
                continue
            for key in ("labels", "annotations"):
                value = rule.get(key, {})
                if not isinstance(value, dict):
                    fail(where, f"{key} must be a mapping")
                    continue
                for k, v in value.items():
                    if not isinstance(k, str) or not LABEL_NAME.match(k):
                        fail(where, f"{key}: {k!r} is not a valid name")
                    if not isinstance(v, str):
                        fail(where, f"{key}.{k} must be a string (quote it)")

            # Recording rules defined later in the same group would be read one
            # evaluation late; elsewhere they are fine.
            visible = dict(records)
            if is_record and title not in defined:
                visible.pop(title, None)  # a rule cannot read itself
            for r in all_records:
                if r not in visible and r not in in_group:
                    visible[r] = UNKNOWN()
            n_exprs += 1
            shape = check_expr(where, rule["expr"], visible, contract, fail)
            if shape is not None and shape.vtype not in (
                ("vector", "scalar") if is_record else ("vector",)
            ):
                fail(
                    where,
                    f"expr returns a {shape.vtype}; {'a recording rule' if is_record else 'an alert'} needs an instant vector",
                )

            if is_record:
                if not isinstance(title, str) or not RECORD_NAME.match(title):
                    fail(
                        where,
                        "record name must be valet:<what>:<operation> (level:metric:operations)",
                    )
                for key in ("for", "keep_firing_for", "annotations"):
                    if key in rule:
                        fail(where, f"a recording rule cannot have `{key}`")
                if title in defined:
                    fail(where, f"recording rule {title} defined twice")
                defined.add(title)
                if shape is not None:
                    labels = set(shape.labels) | set((rule.get("labels") or {}).keys())
                    records[title] = Shape("vector", labels, shape.open, shape.unknown)
            else:
                if not isinstance(title, str) or not ALERT_NAME.match(title):
                    fail(where, "alert name must be CamelCase starting with Valet")
                if title in alert_names:
                    fail(where, "alert defined twice")
                alert_names.add(title)
                if "for" in rule:
                    check_duration(where + " for", rule["for"])
                if "keep_firing_for" in rule:
                    check_duration(where + " keep_firing_for", rule["keep_firing_for"])
                labels = rule.get("labels") or {}
                if labels.get("severity") not in SEVERITIES:
                    fail(where, f"labels.severity must be one of {', '.join(sorted(SEVERITIES))}")
                annotations = rule.get("annotations") or {}
                for key in ("summary", "description"):
                    if not annotations.get(key):
                        fail(where, f"annotations.{key} is required")
                for key, value in list(annotations.items()) + list(labels.items()):
                    check_template(f"{where} {key}", value, shape)
    return n_rules, n_exprs, records, groups, sorted(alert_names)


# ----------------------------------------------------------------- dashboard
GRAFANA_BUILTINS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
    "__interval_ms": "60000",
    "__range_ms": "3600000",
    "__range_s": "3600",
    "__rate_interval_ms": "300000",
}
VAR_REF = re.compile(
    r"\$\{([A-Za-z0-9_]+)(?::[A-Za-z0-9_]+)?\}|\[\[([A-Za-z0-9_]+)(?::[A-Za-z0-9_]+)?\]\]|\$([A-Za-z0-9_]+)"
)
LEGEND_REF = re.compile(r"\{\{\s*([^}]*?)\s*\}\}")


def substitute(where, expr, variables):
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        if name in variables:
            return variables[name]
        fail(where, f"uses ${name}, which is neither a Grafana built-in nor a template variable")
        return "x"

    return VAR_REF.sub(repl, expr)


def is_ds_ref(value):
    if isinstance(value, dict):
        value = value.get("uid")
    return value in ("${datasource}", "$datasource")


def check_dashboard(records, contract):
    path = os.path.join(REPO, DASHBOARD_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            dash = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        fail(DASHBOARD_FILE, f"cannot read JSON: {e}")
        return 0, 0
    if not isinstance(dash, dict):
        fail(DASHBOARD_FILE, "not a JSON object")
        return 0, 0
    if dash.get("uid") != "valet":
        fail(DASHBOARD_FILE, 'uid must be "valet"')
    if dash.get("title") != "Valet":
        fail(DASHBOARD_FILE, 'title must be "Valet"')
    sv = dash.get("schemaVersion")
    if not isinstance(sv, int) or not 36 <= sv <= 41:
        fail(DASHBOARD_FILE, f"schemaVersion {sv!r}: expected about 39")

    variables = {}
    templ = (dash.get("templating") or {}).get("list")
    if not isinstance(templ, list):
        fail(DASHBOARD_FILE, "templating.list is missing")
        templ = []
    by_name = {}
    for var in templ:
        if not isinstance(var, dict) or not var.get("name"):
            fail(DASHBOARD_FILE, "a template variable without a name")
            continue
        if var["name"] in by_name:
            fail(DASHBOARD_FILE, f"template variable {var['name']} defined twice")
        by_name[var["name"]] = var
        # A stand-in value that keeps the expression valid wherever the variable goes.
        variables[var["name"]] = {"interval": "5m", "datasource": "x"}.get(
            var.get("type"), "placeholder"
        )
    ds = by_name.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail(
            DASHBOARD_FILE,
            "needs a template variable `datasource` of type datasource for prometheus",
        )
    route = by_name.get("route")
    if not route or route.get("type") != "query":
        fail(DASHBOARD_FILE, "needs a query template variable `route`")
    else:
        q = route.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if not isinstance(q, str) or not re.fullmatch(
            r"\s*label_values\(\s*valet_check_total\s*,\s*route\s*\)\s*", q
        ):
            fail(
                DASHBOARD_FILE,
                f"variable route must query label_values(valet_check_total, route), not {q!r}",
            )
        if not is_ds_ref(route.get("datasource")):
            fail(DASHBOARD_FILE, "variable route must use the ${datasource} data source")

    panels = []

    def collect(items, parent):
        if not isinstance(items, list):
            fail(DASHBOARD_FILE, f"{parent}panels must be a list")
            return
        for p in items:
            if not isinstance(p, dict):
                fail(DASHBOARD_FILE, f"{parent}a panel is not an object")
                continue
            panels.append(p)
            if p.get("type") == "row" and p.get("panels"):
                collect(p["panels"], f"row {p.get('title')!r}: ")

    collect(dash.get("panels"), "")
    if not panels:
        fail(DASHBOARD_FILE, "no panels")

    ids = {}
    boxes = []
    n_exprs = 0
    n_panels = 0
    for p in panels:
        pid = p.get("id")
        where = f"{DASHBOARD_FILE} panel {pid} {p.get('title')!r}"
        if not isinstance(pid, int):
            fail(where, "needs an integer id")
        elif pid in ids:
            fail(where, f"id {pid} also used by panel {ids[pid]!r}")
        else:
            ids[pid] = p.get("title")
        if not p.get("title"):
            fail(where, "needs a title")
        gp = p.get("gridPos")
        if not isinstance(gp, dict) or not all(
            isinstance(gp.get(k), int) for k in ("h", "w", "x", "y")
        ):
            fail(where, "needs gridPos with integer h, w, x, y")
        else:
            if gp["w"] <= 0 or gp["h"] <= 0 or gp["x"] < 0 or gp["y"] < 0 or gp["x"] + gp["w"] > 24:
                fail(where, f"gridPos {gp} is outside the 24-column grid")
            for other, ob in boxes:
                if (
                    gp["x"] < ob["x"] + ob["w"]
                    and ob["x"] < gp["x"] + gp["w"]
                    and gp["y"] < ob["y"] + ob["h"]
                    and ob["y"] < gp["y"] + gp["h"]
                ):
                    fail(where, f"gridPos overlaps panel {other!r}")
            boxes.append((p.get("title"), gp))
        if p.get("type") == "row":
            continue
        n_panels += 1
        if not is_ds_ref(p.get("datasource")):
            fail(where, "datasource must reference ${datasource}")
        targets = p.get("targets")
        if not isinstance(targets, list) or not targets:
            fail(where, "needs targets")
            continue
        refids = set()
        for t in targets:
            if not isinstance(t, dict):
                fail(where, "a target is not an object")
                continue
            ref = t.get("refId")
            twhere = f"{where} target {ref}"
            if not isinstance(ref, str) or not ref:
                fail(twhere, "needs a refId")
            elif ref in refids:
                fail(twhere, "duplicate refId")
            refids.add(ref)
            if "datasource" in t and not is_ds_ref(t["datasource"]):
                fail(twhere, "datasource must reference ${datasource}")
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                fail(twhere, "needs an expr")
                continue
            n_exprs += 1
            shape = check_expr(twhere, substitute(twhere, expr, variables), records, contract, fail)
            if shape is not None and shape.vtype not in ("vector", "scalar"):
                fail(
                    twhere,
                    f"expr returns a {shape.vtype}; Grafana needs an instant vector or scalar",
                )
            legend = t.get("legendFormat") or ""
            if shape is not None and legend not in ("__auto",):
                for label in LEGEND_REF.findall(legend):
                    if not shape.has(label, SCRAPE_LABELS):
                        fail(
                            twhere,
                            f"legend uses {{{{{label}}}}} but the series carry only: "
                            f"{', '.join(sorted(shape.labels)) or 'no labels'}",
                        )
    return n_panels, n_exprs


# -------------------------------------------------------------- README table
README_ROW = re.compile(r"^\| `(valet_[a-z0-9_]+)` \| ([^|]*) \|")
LABEL_REF = re.compile(r"`([a-z_]+)(?:=[^`]*)?`(?: \(([a-z_]+(?:/[a-z_]+)+)\))?")


def check_readme(contract):
    """The metric table of README's Observability section lists every metric of
    the contract, each with its labels, and value lists that match the code's."""
    path = os.path.join(REPO, README_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        fail(README_FILE, f"cannot read: {e}")
        return 0
    section = text.partition("\n## Observability\n")[2].partition("\n## ")[0]
    rows = {}
    for n, line in enumerate(section.splitlines()):
        m = README_ROW.match(line)
        if m:
            if m.group(1) in rows:
                fail(README_FILE, f"Observability: {m.group(1)} listed twice")
            rows[m.group(1)] = (n, m.group(2))
    where = f"{README_FILE} (Observability table)"
    for name in sorted(set(contract.metrics) - set(rows)):
        fail(where, f"{name} is missing (`valet metrics` lists it)")
    for name in sorted(set(rows) - set(contract.metrics)):
        fail(where, f"{name} is not a metric Valet exports (`valet metrics`)")
    for name, (_, cell) in rows.items():
        metric = contract.metrics.get(name)
        if metric is None:
            continue
        labels = {lab["name"]: lab for lab in metric["labels"]}
        named = {}
        for m in LABEL_REF.finditer(cell):
            named.setdefault(m.group(1), m.group(2))
        for label, lab in labels.items():
            if label not in named:
                fail(where, f"{name}: label `{label}` is not listed")
                continue
            values = named[label]
            bounded = values is not None and lab["values"] is not None
            if bounded and set(values.split("/")) != set(lab["values"]):
                fail(
                    where,
                    f"{name}{{{label}}}: README says {values}, the code {'/'.join(lab['values'])}",
                )
        for label, values in named.items():
            if label not in labels and values is not None:
                fail(where, f"{name}: README lists values of `{label}`, not one of its labels")
        if not labels and cell.strip() not in ("–", "-"):
            fail(where, f"{name} has no labels: the labels cell should be –")
    return len(rows)


def main():
    why = self_test()
    if why:
        fatal(why)
    try:
        contract = metric_contract.load(VALET)
    except RuntimeError as e:
        fatal(str(e))
    with tempfile.TemporaryDirectory(prefix="check-observability-") as tmp:
        n_rules, n_rule_exprs, records, groups, alerts = check_rules(contract)
        runs, tests, stamp = [], [], None
        if groups:
            runs, tests, stamp = alert_tests.start(PROMTOOL, groups, REPO, tmp)
        # While promtool runs: the dashboard (which may use the recording rules too)
        # and README.
        n_panels, n_dash_exprs = check_dashboard(records, contract)
        n_readme = check_readme(contract)
        n_fire, n_quiet = alert_tests.coverage(alerts, tests, fail)
        alert_tests.finish(runs, stamp if not problems else None, fail)
    if problems:
        for p in problems:
            print(f"check-observability: {p}", file=sys.stderr)
        print(f"check-observability: {len(problems)} problem(s)", file=sys.stderr)
        sys.exit(1)
    cached = " (unchanged since it passed)" if groups and not runs else ""
    print(
        f"observability: {n_rules} rules, {n_panels} panels, "
        f"{n_rule_exprs + n_dash_exprs} expressions OK against {len(contract.metrics)} "
        f"metrics of `valet metrics`; {len(alerts)} alerts pass promtool{cached} with "
        f"{n_fire} firing and {n_quiet} quiet test cases; README table lists {n_readme} metrics"
    )


main()
