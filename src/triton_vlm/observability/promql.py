"""A small PromQL evaluator over a :class:`~triton_vlm.observability.scrape.Recording`, for the dashboard preview.

It parses with ``promql-parser`` (the Rust parser Prometheus' own grammar is ported to) and evaluates the subset
the triton-vlm dashboard uses: selectors with ``= != =~ !~`` matchers, ``rate``/``increase``/``irate`` over a
range, ``histogram_quantile``, ``clamp_min``/``clamp_max``, ``sum``/``avg``/``min``/``max``/``count`` with
``by``/``without``, arithmetic between vectors (one-to-one, optionally ``on``/``ignoring``) and with numbers.

Differences from Prometheus, all harmless for a preview: ``rate`` is the slope between the first and last
sample in the window (Prometheus also extrapolates to the window's edges), and an instant selector looks back
at most 5 minutes, as Prometheus does, but without staleness markers.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from triton_vlm.observability.scrape import Labels, Recording

Vector = dict[Labels, float]
LOOKBACK = 300.0

_BINARY: dict[str, Callable[[float, float], float]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul,
    "/": lambda a, b: a / b if b else (math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)),
    "^": operator.pow,
}


class PromQLError(ValueError):
    """A query outside the supported subset, or not PromQL at all."""


def parse(query: str) -> Any:
    try:
        import promql_parser
    except ImportError as exc:  # pragma: no cover - promql-parser comes with the test and dashboard extras
        raise PromQLError("the dashboard preview needs promql-parser: pip install 'triton-vlm[dashboard]'") from exc
    try:
        return promql_parser.parse(query)
    except Exception as exc:  # the parser raises its own error types
        raise PromQLError(f"cannot parse {query!r}: {exc}") from None


def metric_names(query: str) -> set[str]:
    """Every metric name a query selects."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        kind = type(node).__name__
        if kind == "VectorSelector":
            names.add(node.name)
        elif kind == "MatrixSelector":
            walk(node.vector_selector)
        elif kind == "Call":
            for arg in node.args:
                walk(arg)
        elif kind in ("AggregateExpr", "ParenExpr", "UnaryExpr"):
            walk(node.expr)
        elif kind == "BinaryExpr":
            walk(node.lhs)
            walk(node.rhs)

    walk(parse(query))
    return names


class Evaluator:
    """Evaluates queries at the times of a recording (or any time within it)."""

    def __init__(self, recording: Recording) -> None:
        self.recording = recording
        # name -> labels -> [(t, value)] in time order
        self._series: dict[str, dict[Labels, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
        for t, scrape in zip(recording.times, recording.scrapes, strict=True):
            for sample in scrape:
                self._series[sample.name][sample.labels].append((t, sample.value))

    def range_query(self, query: str, times: list[float] | None = None) -> dict[Labels, list[float]]:
        """The query at each of ``times`` (default: every scrape): labels -> values (NaN where absent)."""
        times = self.recording.times if times is None else times
        node = parse(query)
        out: dict[Labels, list[float]] = {}
        for i, t in enumerate(times):
            for labels, value in self._vector(node, t).items():
                out.setdefault(labels, [math.nan] * len(times))[i] = value
        return out

    def instant(self, query: str, t: float | None = None) -> Vector:
        return self._vector(parse(query), self.recording.times[-1] if t is None else t)

    # -- evaluation ---------------------------------------------------------------------------------------
    def _vector(self, node: Any, t: float) -> Vector:
        value = self._eval(node, t)
        if isinstance(value, float):
            raise PromQLError(f"expected an instant vector, got the number {value}: {node}")
        return value

    def _number(self, node: Any, t: float) -> float:
        value = self._eval(node, t)
        if not isinstance(value, float):
            raise PromQLError(f"expected a number, got an instant vector: {node}")
        return value

    def _eval(self, node: Any, t: float) -> Vector | float:
        kind = type(node).__name__
        if kind == "NumberLiteral":
            return float(node.val)
        if kind == "ParenExpr":
            return self._eval(node.expr, t)
        if kind == "UnaryExpr":
            value = self._eval(node.expr, t)
            return -value if isinstance(value, float) else {k: -v for k, v in value.items()}
        if kind == "VectorSelector":
            return self._select(node, t)
        if kind == "Call":
            return self._call(node, t)
        if kind == "AggregateExpr":
            return self._aggregate(node, t)
        if kind == "BinaryExpr":
            return self._binary(node, t)
        raise PromQLError(f"unsupported expression {kind}: {node}")

    def _matching(self, selector: Any) -> dict[Labels, list[tuple[float, float]]]:
        series = self._series.get(selector.name, {})
        tests = []
        for matcher in selector.matchers.matchers:
            op = str(matcher.op)
            tests.append((matcher.name, _label_test(op, matcher.value), op.startswith("MatchOp.Not")))

        def keep(labels: Labels) -> bool:
            found = dict(labels)
            return all(test(found.get(name, "")) != negate for name, test, negate in tests)

        return {labels: points for labels, points in series.items() if keep(labels)}

    def _select(self, selector: Any, t: float) -> Vector:
        out: Vector = {}
        for labels, points in self._matching(selector).items():
            latest = [v for ts, v in points if t - LOOKBACK < ts <= t]
            if latest:
                out[labels] = latest[-1]
        return out

    def _window(self, matrix: Any, t: float) -> dict[Labels, list[tuple[float, float]]]:
        width = matrix.range.total_seconds()
        return {labels: [(ts, v) for ts, v in points if t - width < ts <= t]
                for labels, points in self._matching(matrix.vector_selector).items()}

    def _call(self, node: Any, t: float) -> Vector:
        name = node.func.name
        if name in ("rate", "increase", "irate"):
            (matrix,) = node.args
            if type(matrix).__name__ != "MatrixSelector":
                raise PromQLError(f"{name}() needs a range selector")
            out: Vector = {}
            for labels, points in self._window(matrix, t).items():
                if name == "irate":
                    points = points[-2:]
                if len(points) < 2:
                    continue
                increase = sum(b - a if b >= a else b for (_, a), (_, b) in itertools.pairwise(points))
                seconds = points[-1][0] - points[0][0]
                if seconds <= 0:
                    continue
                per_second = increase / seconds
                out[_drop_name(labels)] = (per_second * matrix.range.total_seconds() if name == "increase"
                                           else per_second)
            return out
        if name == "histogram_quantile":
            return _histogram_quantile(self._number(node.args[0], t), self._vector(node.args[1], t))
        if name in ("clamp_min", "clamp_max"):
            vector, bound = self._vector(node.args[0], t), self._number(node.args[1], t)
            pick = max if name == "clamp_min" else min
            return {_drop_name(k): pick(v, bound) for k, v in vector.items()}
        raise PromQLError(f"unsupported function {name}()")

    def _aggregate(self, node: Any, t: float) -> Vector:
        vector = self._vector(node.expr, t)
        modifier = node.modifier
        labels = set(modifier.labels) if modifier is not None else set()
        without = modifier is not None and str(modifier.type).endswith("Without")
        groups: dict[Labels, list[float]] = defaultdict(list)
        for key, value in vector.items():
            kept = tuple((k, v) for k, v in key
                         if k != "__name__" and ((k not in labels) if without else (k in labels)))
            groups[kept].append(value)
        op = str(node.op)
        reduce: dict[str, Callable[[list[float]], float]] = {
            "sum": math.fsum, "avg": lambda xs: math.fsum(xs) / len(xs), "min": min, "max": max,
            "count": lambda xs: float(len(xs)),
        }
        if op not in reduce:
            raise PromQLError(f"unsupported aggregation {op}")
        return {key: reduce[op](values) for key, values in groups.items()}

    def _binary(self, node: Any, t: float) -> Vector | float:
        op = str(node.op)
        if op not in _BINARY:
            raise PromQLError(f"unsupported operator {op}")
        fn = _BINARY[op]
        lhs, rhs = self._eval(node.lhs, t), self._eval(node.rhs, t)
        if isinstance(lhs, float):
            return fn(lhs, rhs) if isinstance(rhs, float) else {_drop_name(k): fn(lhs, v) for k, v in rhs.items()}
        if isinstance(rhs, float):
            return {_drop_name(k): fn(v, rhs) for k, v in lhs.items()}
        matching = node.modifier.matching if node.modifier is not None else None

        def signature(labels: Labels) -> Labels:
            labels = _drop_name(labels)
            if matching is None:
                return labels
            names = set(matching.labels)
            include = str(matching.type).endswith("Include")
            return tuple((k, v) for k, v in labels if (k in names) == include)

        right = {signature(k): v for k, v in rhs.items()}
        out: Vector = {}
        for key, value in lhs.items():
            other = right.get(signature(key))
            if other is not None:  # one-to-one: the result keeps the matched labels (Prometheus' rule)
                out[signature(key)] = fn(value, other)
        return out


def _drop_name(labels: Labels) -> Labels:
    return tuple((k, v) for k, v in labels if k != "__name__")


def _histogram_quantile(phi: float, vector: Vector) -> Vector:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket where the rank falls."""
    groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for labels, value in vector.items():
        le = dict(labels).get("le")
        if le is None:
            continue
        bound = math.inf if le in ("+Inf", "Inf", "inf") else float(le)
        groups[tuple((k, v) for k, v in labels if k != "le")].append((bound, value))
    out: Vector = {}
    for key, buckets in groups.items():
        buckets.sort()
        if not buckets or buckets[-1][0] != math.inf:
            continue
        total = buckets[-1][1]
        if total <= 0 or math.isnan(total):
            out[key] = math.nan
            continue
        if phi < 0 or phi > 1:
            out[key] = -math.inf if phi < 0 else math.inf
            continue
        rank = phi * total
        previous_bound, previous_count = 0.0, 0.0
        for bound, count in buckets:
            if count >= rank:
                if bound == math.inf:
                    out[key] = buckets[-2][0] if len(buckets) > 1 else math.nan
                elif count == previous_count:
                    out[key] = bound
                else:
                    lower = previous_bound if previous_bound > 0 or bound <= 0 else 0.0
                    out[key] = lower + (bound - lower) * (rank - previous_count) / (count - previous_count)
                break
            previous_bound, previous_count = bound, count
    return out


def _label_test(op: str, value: str) -> Callable[[str], bool]:
    """What a label matcher checks of a label's value: equality, or a full regex match for ``=~``/``!~``
    (negation is applied by the caller)."""
    if op.endswith("Re"):
        pattern = re.compile(f"(?:{value})")
        return lambda found: pattern.fullmatch(found) is not None
    return lambda found: found == value
