#!/usr/bin/env bash
# Validate Valet's Prometheus rules and Grafana dashboard offline:
#   k8s/prometheus-rule.yaml   (PrometheusRule: recording rules + alerts)
#   k8s/grafana-dashboard.json (Grafana dashboard)
#
# Every PromQL expression is parsed with `promql-parser` from PyPI: Python bindings
# to the Rust crate of the same name (GreptimeDB), a port of Prometheus's own
# parser that also runs its checks (argument types, unknown functions, where
# offset/@ may go, range vs instant vectors). Before trusting it, the script makes
# sure it rejects a few broken expressions.
#
# Beyond parsing, it checks: the PrometheusRule shape; every rule has `record` or
# `alert` and `expr`; durations are valid; alerts have a severity and
# summary/description whose {{ }} templates use known variables and functions, and
# only labels the alert's expression keeps; every metric is one of Valet's (or `up`, or a recording rule
# defined in the file, before its use within a group) and is still emitted by src/;
# label names exist on the metric and known label values (decision, reason, result,
# trigger) are spelled right; `by`/`on` labels exist. For the dashboard: uid, title,
# template variables, unique panel ids, gridPos inside 24 columns and not
# overlapping, targets with expr and refId, datasource ${datasource}, and every expr
# parses once Grafana variables ($route, $__rate_interval, ...) are substituted.
#
# Tools go to $REPO/.tools/obs-venv (a venv; PyPI only). Idempotent: a warm run
# makes no network access. Exits non-zero with a message per problem.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$REPO/.tools"
VENV="$TOOLS/obs-venv"
# Pinned: a new parser release must not change the verdict silently.
REQUIREMENTS=(promql-parser==0.12.0 PyYAML==6.0.4)

log() { echo "check-observability: $*" >&2; }

# shellcheck source=lib/venv.sh
. "$REPO/scripts/lib/venv.sh"
ensure_venv "$VENV" check-observability "${REQUIREMENTS[@]}"

exec "$VENV/bin/python" - "$REPO" <<'PYTHON'
import json
import os
import re
import sys

try:
    import promql_parser as pq
    import yaml
except ImportError as e:
    print(f"check-observability: {e}; delete .tools/obs-venv and run again", file=sys.stderr)
    sys.exit(1)

REPO = sys.argv[1]
RULES_FILE = "k8s/prometheus-rule.yaml"
DASHBOARD_FILE = "k8s/grafana-dashboard.json"

problems = []


def fail(where, msg):
    line = f"{where}: {msg}"
    if line not in problems:
        problems.append(line)


def fatal(msg):
    print(f"check-observability: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------- the contract
# Valet's metrics (design.md, src/telemetry.rs) and the labels each one carries.
# A histogram is exposed as its _bucket/_sum/_count series.
CONTRACT = {
    "valet_check_total": {"decision", "reason", "route"},
    "valet_check_duration_seconds_bucket": {"le"},
    "valet_check_duration_seconds_sum": set(),
    "valet_check_duration_seconds_count": set(),
    "valet_jwks_refresh_total": {"provider", "result", "trigger"},
    "valet_jwks_keys": {"provider"},
    "valet_jwks_age_seconds": {"provider"},
    "valet_jwks_last_success_timestamp_seconds": {"provider"},
    "valet_policy_reload_total": {"result"},
    "valet_policy_last_reload_success_timestamp_seconds": set(),
    "valet_build_info": {"version"},
    "valet_introspection_requests_total": {"provider", "result"},
    "valet_introspection_duration_seconds_bucket": {"provider", "le"},
    "valet_introspection_duration_seconds_sum": {"provider"},
    "valet_introspection_duration_seconds_count": {"provider"},
    "valet_introspection_cache_total": {"provider", "result"},
    "valet_introspection_circuit_open": {"provider"},
    "valet_dpop_replay_evictions_total": set(),
    "valet_dpop_replay_full_total": set(),
    "valet_dpop_replay_entries": set(),
    "valet_jwks_unknown_kid_waiters_full_total": {"provider"},
    "valet_revocation_entries": set(),
    "valet_revocation_reload_total": {"result"},
    "valet_revocation_last_reload_successful": set(),
    "up": set(),
}
HISTOGRAMS = {"valet_check_duration_seconds", "valet_introspection_duration_seconds"}
# Every scraped series has job and instance; the others depend on the scrape config.
SCRAPE_LABELS = {"job", "instance"}
TARGET_LABELS = SCRAPE_LABELS | {"namespace", "pod", "container", "service", "endpoint", "node"}

REASONS = {
    "anonymous", "verified", "no_route", "missing_token", "malformed_token",
    "malformed_request", "unsupported_algorithm", "unknown_key", "bad_signature",
    "expired", "not_yet_valid", "issuer_not_allowed", "audience_not_allowed",
    "insufficient_scope", "claim_mismatch", "keys_unavailable", "overloaded",
    "revoked", "binding_mismatch", "unbound_token", "invalid_dpop_proof",
    "inactive_token", "introspection_unavailable", "dpop_replay_full",
}
LABEL_VALUES = {
    "decision": {"allow", "deny"},
    "reason": REASONS,
    "trigger": {"startup", "interval", "unknown_kid", "file_change"},
}
RESULT_VALUES = {
    "valet_jwks_refresh_total": {"success", "not_modified", "error"},
    "valet_policy_reload_total": {"success", "error"},
    "valet_revocation_reload_total": {"success", "error"},
    "valet_introspection_cache_total": {"hit", "miss"},
    "valet_introspection_requests_total": {
        "active", "inactive", "timeout", "unreachable", "status", "bad_response", "circuit_open",
        "busy",
    },
}


def base_metric(name):
    for h in HISTOGRAMS:
        if name in (h + "_bucket", h + "_sum", h + "_count"):
            return h
    return name


def src_metric_names():
    """String literals in src/ that look like Valet metric names (None without src/)."""
    src = os.path.join(REPO, "src")
    if not os.path.isdir(src):
        return None
    found = set()
    for root, _, files in os.walk(src):
        for f in files:
            if f.endswith(".rs"):
                with open(os.path.join(root, f), encoding="utf-8") as fh:
                    found.update(re.findall(r'"(valet_[a-z0-9_]+)"', fh.read()))
    return found


# ------------------------------------------------------------- PromQL helpers
def parse(expr):
    try:
        return pq.parse(expr), None
    except Exception as e:  # the parser raises ValueError with Prometheus's message
        return None, str(e) or type(e).__name__


def self_test():
    """Refuse to vouch for anything if the parser does not reject broken PromQL."""
    broken = [
        "sum(rate(valet_check_total[5m])",             # unclosed parenthesis
        "rate(valet_check_total)",                      # instant vector where a range is due
        'valet_check_total{decision="deny"',            # unclosed selector
        "sum by (route) valet_check_total",             # aggregation without parentheses
        "valet_check_total[5x]",                        # bad duration
        "nosuchfunction(valet_check_total)",            # unknown function
        "valet_check_total and 1",                      # set operator on a scalar
    ]
    for expr in broken:
        ast, _ = parse(expr)
        if ast is not None:
            fatal(f"the PromQL parser accepted the broken expression {expr!r}; not trusting it")
    ast, err = parse('sum by (route) (rate(valet_check_total{decision="deny"}[5m])) > 0')
    if ast is None:
        fatal(f"the PromQL parser rejected a valid expression: {err}")


class Shape:
    """What an expression returns: value type and the labels each series surely has.
    `open` means the series may have more labels than `labels` (e.g. target labels);
    `unknown` that nothing is known (after an error already reported): no label
    checks, so that one mistake gives one message."""

    def __init__(self, vtype, labels=(), open_=False, unknown=False):
        self.vtype = vtype
        self.labels = set(labels)
        self.open = open_ or unknown
        self.unknown = unknown

    def has(self, label, extra=frozenset()):
        return self.unknown or label in self.labels or (self.open and label in extra)


def UNKNOWN(vtype="vector"):
    return Shape(vtype, (), True, True)


AGG_KEEP_LABELS = {"topk", "bottomk", "limitk", "limit_ratio"}


class Analyzer:
    """Walks a parsed expression: checks metric names, label names and values, and
    infers the result's shape. `records` maps recording rule names to their Shape."""

    def __init__(self, where, records, src_names):
        self.where = where
        self.records = records
        self.src_names = src_names
        self.metrics = set()

    def err(self, msg):
        fail(self.where, msg)

    def known_label(self, shape, label):
        return shape.has(label, TARGET_LABELS)

    def selector(self, vs):
        name = vs.name
        matchers = list(vs.matchers.matchers)
        for group in vs.matchers.or_matchers or []:
            matchers.extend(group)
        for m in matchers:
            if m.name == "__name__":
                if m.op == pq.MatchOp.Equal and name is None:
                    name = m.value
                elif m.op != pq.MatchOp.Equal:
                    self.err(f"metric name matched by regex or negation ({m}): cannot check it against the contract")
        if name is None:
            self.err(f"selector {vs} has no metric name")
            return UNKNOWN()
        self.metrics.add(name)
        if name in self.records:
            shape = self.records[name]
        elif name in CONTRACT:
            if self.src_names is not None and name != "up" and base_metric(name) not in self.src_names:
                self.err(f"metric {name} is in the contract but src/ no longer emits {base_metric(name)}")
            shape = Shape("vector", CONTRACT[name] | SCRAPE_LABELS, True)
        elif name in HISTOGRAMS:
            self.err(f"{name} is a histogram: use {name}_bucket, _sum or _count")
            return UNKNOWN()
        else:
            self.err(f"unknown metric {name} (not a Valet metric, `up`, or a recording rule defined above)")
            return UNKNOWN()
        for m in matchers:
            if m.name == "__name__":
                continue
            if not self.known_label(shape, m.name):
                self.err(f"{name} has no label {m.name!r} (it has {', '.join(sorted(shape.labels)) or 'none'})")
            allowed = RESULT_VALUES.get(name) if m.name == "result" else LABEL_VALUES.get(m.name)
            if m.name == "result" and allowed is None:
                allowed = set().union(*RESULT_VALUES.values())
            if allowed is None:
                continue
            if m.op in (pq.MatchOp.Equal, pq.MatchOp.NotEqual):
                values = [m.value]
            elif re.fullmatch(r"[a-z_]+(\|[a-z_]+)*", m.value):
                values = m.value.split("|")
            else:
                values = []  # a real regex: nothing to spell-check
            for v in values:
                if v not in allowed:
                    self.err(f"{name}{{{m.name}}} is never {v!r} (known: {', '.join(sorted(allowed))})")
        return shape

    def grouping(self, shape, labels, what, operand="the operand"):
        for label in labels:
            if not self.known_label(shape, label):
                self.err(f"`{what} ({', '.join(labels)})`: {label!r} is not a label of "
                         f"{operand} (it has {', '.join(sorted(shape.labels)) or 'none'})")

    def shape(self, node):
        if isinstance(node, pq.NumberLiteral):
            return Shape("scalar")
        if isinstance(node, pq.StringLiteral):
            return Shape("string")
        if isinstance(node, pq.VectorSelector):
            return self.selector(node)
        if isinstance(node, pq.MatrixSelector):
            s = self.selector(node.vector_selector)
            return Shape("matrix", s.labels, s.open, s.unknown)
        if isinstance(node, pq.SubqueryExpr):
            s = self.shape(node.expr)
            return Shape("matrix", s.labels, s.open, s.unknown)
        if isinstance(node, (pq.ParenExpr, pq.UnaryExpr)):
            return self.shape(node.expr)
        if isinstance(node, pq.Call):
            return self.call(node)
        if isinstance(node, pq.AggregateExpr):
            return self.aggregate(node)
        if isinstance(node, pq.BinaryExpr):
            return self.binary(node)
        self.err(f"unexpected expression node {type(node).__name__}")
        return UNKNOWN()

    def call(self, node):
        name = node.func.name
        args = [self.shape(a) for a in node.args]
        rt = node.func.return_type
        rtype = next(n for v, n in ((pq.ValueType.Vector, "vector"), (pq.ValueType.Scalar, "scalar"),
                                    (pq.ValueType.Matrix, "matrix"), (pq.ValueType.String, "string")) if rt == v)
        if rtype != "vector":
            return Shape(rtype)
        if name in ("vector",):
            return Shape("vector")
        if name in ("absent", "absent_over_time"):
            return Shape("vector")
        series = [s for s in args if s.vtype in ("vector", "matrix")]
        if not series:
            return Shape("vector")
        s = series[0]
        labels, open_ = set(s.labels), s.open
        if name.startswith("histogram_") and name != "histogram_count" and name != "histogram_sum":
            labels.discard("le")
        if name in ("label_replace", "label_join") and len(node.args) > 1 and isinstance(node.args[1], pq.StringLiteral):
            labels.add(node.args[1].val)
        return Shape("vector", labels, open_, s.unknown)

    def aggregate(self, node):
        op = str(node.op)
        if node.param is not None:
            self.shape(node.param)
        s = self.shape(node.expr)
        mod = node.modifier
        if mod is not None:
            kind = "by" if mod.type == pq.AggModifierType.By else "without"
            self.grouping(s, mod.labels, f"{op} {kind}")
        if op in AGG_KEEP_LABELS:
            return Shape("vector", s.labels, s.open, s.unknown)
        unknown = False
        if mod is None:
            labels, open_ = set(), False
        elif mod.type == pq.AggModifierType.By:
            labels, open_ = set(mod.labels), False
        else:
            labels, open_, unknown = s.labels - set(mod.labels), s.open, s.unknown
        if op == "count_values" and isinstance(node.param, pq.StringLiteral):
            labels.add(node.param.val)
        return Shape("vector", labels, open_, unknown)

    def binary(self, node):
        op = str(node.op)
        lhs, rhs = self.shape(node.lhs), self.shape(node.rhs)
        if lhs.vtype == "scalar" and rhs.vtype == "scalar":
            return Shape("scalar")
        if lhs.vtype == "scalar":
            return Shape("vector", rhs.labels, rhs.open, rhs.unknown)
        if rhs.vtype == "scalar":
            return Shape("vector", lhs.labels, lhs.open, lhs.unknown)
        if lhs.unknown or rhs.unknown:
            return UNKNOWN()
        mod = node.modifier
        matching = mod.matching if mod is not None else None
        if matching is not None and matching.type == pq.LabelModifierType.Include:
            self.grouping(lhs, matching.labels, f"{op} on", "the left operand")
            self.grouping(rhs, matching.labels, f"{op} on", "the right operand")
        if op in ("and", "unless"):
            return Shape("vector", lhs.labels, lhs.open)
        if op == "or":
            return Shape("vector", lhs.labels & rhs.labels, lhs.open or rhs.open)
        card = mod.card if mod is not None else pq.VectorMatchCardinality.OneToOne
        include = set(mod.group_labels or []) if mod is not None else set()
        if card == pq.VectorMatchCardinality.ManyToOne:
            return Shape("vector", lhs.labels | include, lhs.open)
        if card == pq.VectorMatchCardinality.OneToMany:
            return Shape("vector", rhs.labels | include, rhs.open)
        if matching is not None and matching.type == pq.LabelModifierType.Include:
            return Shape("vector", set(matching.labels), False)
        if matching is not None:
            return Shape("vector", lhs.labels - set(matching.labels), lhs.open)
        return Shape("vector", lhs.labels, lhs.open)


def check_expr(where, expr, records, src_names):
    """Parse and analyze one expression; returns its Shape or None."""
    if not isinstance(expr, str) or not expr.strip():
        fail(where, "expr is missing or empty")
        return None
    ast, err = parse(expr)
    if ast is None:
        one_line = " ".join(expr.split())
        fail(where, f"PromQL does not parse: {err}\n    in: {one_line}")
        return None
    analyzer = Analyzer(where, records, src_names)
    return analyzer.shape(ast)


# --------------------------------------------------------- alert templates
TEMPLATE_FUNCS = {
    "humanize", "humanize1024", "humanizeDuration", "humanizePercentage",
    "humanizeTimestamp", "printf", "title", "toUpper", "toLower", "reReplaceAll",
    "match", "stripPort", "stripDomain", "first", "label", "value", "query",
    "sortByLabel", "safeHtml", "args", "tableLink", "graphLink", "strvalue",
    "externalURL", "pathPrefix", "urlQueryEscape", "toTime", "parseDuration",
    "len", "index", "and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge",
}
TEMPLATE_KEYWORDS = {"if", "else", "end", "with", "range", "define", "template", "block"}
TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*"|`[^`]*`)|(\$labels\.([A-Za-z_][A-Za-z0-9_]*))|'
                   r'(\$externalLabels\.[A-Za-z_][A-Za-z0-9_]*)|(\$value|\$externalURL|\$labels|\$)|'
                   r'(\.[A-Za-z_][A-Za-z0-9_.]*|\.)|(-?[0-9][0-9.eE+-]*)|([A-Za-z_][A-Za-z0-9_]*)|([|()])|(:?=))')


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
        action = text[start + 2:end].strip()
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
                    have = ", ".join(sorted(label_shape.labels | (SCRAPE_LABELS if label_shape.open else set())))
                    fail(where, f"uses $labels.{label}, but the alert's series carry only: {have or 'no labels'}")
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
GROUP_KEYS = {"name", "interval", "rules", "limit", "query_offset", "labels", "partial_response_strategy"}


def check_duration(where, value):
    if not isinstance(value, str) or not DURATION.match(value):
        fail(where, f"{value!r} is not a Prometheus duration (e.g. 5m, 1h30m)")


def check_rules(src_names):
    path = os.path.join(REPO, RULES_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.load(fh, Loader=Loader)
    except (OSError, yaml.YAMLError) as e:
        fail(RULES_FILE, f"cannot read YAML: {e}")
        return 0, 0, {}
    if not isinstance(doc, dict):
        fail(RULES_FILE, "not a YAML mapping")
        return 0, 0, {}
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
        return 0, 0, {}

    # Every recording rule first, so that a rule may use one from another group.
    all_records = {}
    for group in groups:
        for rule in (group.get("rules") or []) if isinstance(group, dict) else []:
            if isinstance(rule, dict) and isinstance(rule.get("record"), str):
                all_records.setdefault(rule["record"], None)

    records = {}          # record name -> Shape, filled in file order
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
            shape = check_expr(where, rule["expr"], visible, src_names)
            if shape is not None and shape.vtype not in (("vector", "scalar") if is_record else ("vector",)):
                fail(where, f"expr returns a {shape.vtype}; {'a recording rule' if is_record else 'an alert'} needs an instant vector")

            if is_record:
                if not isinstance(title, str) or not RECORD_NAME.match(title):
                    fail(where, "record name must be valet:<what>:<operation> (level:metric:operations)")
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
    return n_rules, n_exprs, records


# ----------------------------------------------------------------- dashboard
GRAFANA_BUILTINS = {
    "__rate_interval": "5m", "__interval": "1m", "__range": "1h",
    "__interval_ms": "60000", "__range_ms": "3600000", "__range_s": "3600",
    "__rate_interval_ms": "300000",
}
VAR_REF = re.compile(r"\$\{([A-Za-z0-9_]+)(?::[A-Za-z0-9_]+)?\}|\[\[([A-Za-z0-9_]+)(?::[A-Za-z0-9_]+)?\]\]|\$([A-Za-z0-9_]+)")
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


def check_dashboard(records, src_names):
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
        variables[var["name"]] = {"interval": "5m", "datasource": "x"}.get(var.get("type"), "placeholder")
    ds = by_name.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        fail(DASHBOARD_FILE, "needs a template variable `datasource` of type datasource for prometheus")
    route = by_name.get("route")
    if not route or route.get("type") != "query":
        fail(DASHBOARD_FILE, "needs a query template variable `route`")
    else:
        q = route.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if not isinstance(q, str) or not re.fullmatch(r"\s*label_values\(\s*valet_check_total\s*,\s*route\s*\)\s*", q):
            fail(DASHBOARD_FILE, f"variable route must query label_values(valet_check_total, route), not {q!r}")
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
        if not isinstance(gp, dict) or not all(isinstance(gp.get(k), int) for k in ("h", "w", "x", "y")):
            fail(where, "needs gridPos with integer h, w, x, y")
        else:
            if gp["w"] <= 0 or gp["h"] <= 0 or gp["x"] < 0 or gp["y"] < 0 or gp["x"] + gp["w"] > 24:
                fail(where, f"gridPos {gp} is outside the 24-column grid")
            for other, ob in boxes:
                if (gp["x"] < ob["x"] + ob["w"] and ob["x"] < gp["x"] + gp["w"]
                        and gp["y"] < ob["y"] + ob["h"] and ob["y"] < gp["y"] + gp["h"]):
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
            shape = check_expr(twhere, substitute(twhere, expr, variables), records, src_names)
            if shape is not None and shape.vtype not in ("vector", "scalar"):
                fail(twhere, f"expr returns a {shape.vtype}; Grafana needs an instant vector or scalar")
            legend = t.get("legendFormat") or ""
            if shape is not None and legend not in ("__auto",):
                for label in LEGEND_REF.findall(legend):
                    if not shape.has(label, SCRAPE_LABELS):
                        fail(twhere, f"legend uses {{{{{label}}}}} but the series carry only: "
                                     f"{', '.join(sorted(shape.labels)) or 'no labels'}")
    return n_panels, n_exprs


def main():
    self_test()
    src_names = src_metric_names()
    # The dashboard may use the recording rules too.
    n_rules, n_rule_exprs, records = check_rules(src_names)
    n_panels, n_dash_exprs = check_dashboard(records, src_names)
    if problems:
        for p in problems:
            print(f"check-observability: {p}", file=sys.stderr)
        print(f"check-observability: {len(problems)} problem(s)", file=sys.stderr)
        sys.exit(1)
    print(f"observability: {n_rules} rules, {n_panels} panels, {n_rule_exprs + n_dash_exprs} expressions OK")


main()
PYTHON
