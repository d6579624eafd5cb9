"""PromQL, parsed and followed: which metrics and labels an expression names,
and what it returns (value type and the labels its series surely carry).

Parsing is `promql-parser` from PyPI: Python bindings to the Rust crate of the
same name (GreptimeDB), a port of Prometheus's own parser that also runs its
checks (argument types, unknown functions, where offset/@ may go, range vs
instant vectors). `self_test` makes sure it rejects broken expressions before the
checker trusts it.
"""

import re

import promql_parser as pq

from metric_contract import SCRAPE_LABELS, TARGET_LABELS


def parse(expr):
    try:
        return pq.parse(expr), None
    except ValueError as e:  # with Prometheus's message
        return None, str(e) or type(e).__name__


def self_test():
    """Refuse to vouch for anything if the parser does not reject broken PromQL:
    returns why, or None."""
    broken = [
        "sum(rate(valet_check_total[5m])",  # unclosed parenthesis
        "rate(valet_check_total)",  # instant vector where a range is due
        'valet_check_total{decision="deny"',  # unclosed selector
        "sum by (route) valet_check_total",  # aggregation without parentheses
        "valet_check_total[5x]",  # bad duration
        "nosuchfunction(valet_check_total)",  # unknown function
        "valet_check_total and 1",  # set operator on a scalar
    ]
    for expr in broken:
        ast, _ = parse(expr)
        if ast is not None:
            return f"the PromQL parser accepted the broken expression {expr!r}; not trusting it"
    ast, err = parse('sum by (route) (rate(valet_check_total{decision="deny"}[5m])) > 0')
    if ast is None:
        return f"the PromQL parser rejected a valid expression: {err}"
    return None


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

    def __init__(self, where, records, contract, report):
        self.where = where
        self.records = records
        self.contract = contract
        self.report = report
        self.metrics = set()

    def err(self, msg):
        self.report(self.where, msg)

    def any_values(self, label):
        sets = [
            labels[label]
            for labels in self.contract.series.values()
            if label in labels and labels[label] is not None
        ]
        return set().union(*sets) if sets else None

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
                    self.err(
                        f"metric name matched by regex or negation ({m}): cannot check it against the contract"
                    )
        if name is None:
            self.err(f"selector {vs} has no metric name")
            return UNKNOWN()
        self.metrics.add(name)
        if name in self.records:
            shape = self.records[name]
        elif name in self.contract.series:
            shape = Shape("vector", self.contract.labels(name) | SCRAPE_LABELS, True)
        elif name in self.contract.histograms:
            self.err(f"{name} is a histogram: use {name}_bucket, _sum or _count")
            return UNKNOWN()
        else:
            self.err(
                f"unknown metric {name} (not a Valet metric, `up`, or a recording rule defined above)"
            )
            return UNKNOWN()
        for m in matchers:
            if m.name == "__name__":
                continue
            if not self.known_label(shape, m.name):
                self.err(
                    f"{name} has no label {m.name!r} (it has {', '.join(sorted(shape.labels)) or 'none'})"
                )
            if name in self.contract.series:
                allowed = self.contract.values(name, m.name)
            else:  # a recording rule: any value the label has on a Valet metric
                allowed = self.any_values(m.name)
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
                    self.err(
                        f"{name}{{{m.name}}} is never {v!r} (known: {', '.join(sorted(allowed))})"
                    )
        return shape

    def grouping(self, shape, labels, what, operand="the operand"):
        for label in labels:
            if not self.known_label(shape, label):
                self.err(
                    f"`{what} ({', '.join(labels)})`: {label!r} is not a label of "
                    f"{operand} (it has {', '.join(sorted(shape.labels)) or 'none'})"
                )

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
        rtype = next(
            n
            for v, n in (
                (pq.ValueType.Vector, "vector"),
                (pq.ValueType.Scalar, "scalar"),
                (pq.ValueType.Matrix, "matrix"),
                (pq.ValueType.String, "string"),
            )
            if rt == v
        )
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
        if (
            name in ("label_replace", "label_join")
            and len(node.args) > 1
            and isinstance(node.args[1], pq.StringLiteral)
        ):
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


def check_expr(where, expr, records, contract, report):
    """Parse and analyze one expression; returns its Shape or None."""
    if not isinstance(expr, str) or not expr.strip():
        report(where, "expr is missing or empty")
        return None
    ast, err = parse(expr)
    if ast is None:
        one_line = " ".join(expr.split())
        report(where, f"PromQL does not parse: {err}\n    in: {one_line}")
        return None
    analyzer = Analyzer(where, records, contract, report)
    return analyzer.shape(ast)
