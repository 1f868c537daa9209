"""Read Prometheus' text exposition format (what Triton serves on ``:8002/metrics``)."""

from __future__ import annotations

import math
import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from triton_vlm.errors import ServerUnreachableError

Labels = tuple[tuple[str, str], ...]

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Labels
    value: float

    def label(self, key: str, default: str = "") -> str:
        return dict(self.labels).get(key, default)


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def _value(text: str) -> float:
    lowered = text.lower()
    if lowered in ("+inf", "inf"):
        return math.inf
    if lowered == "-inf":
        return -math.inf
    return float(text)


def parse_metrics(text: str) -> list[Sample]:
    """Every sample line of a scrape; ``# HELP``/``# TYPE`` comments and blank lines are skipped."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        raw = match.group("labels") or ""
        labels = tuple(sorted((k, _unescape(v)) for k, v in _LABEL.findall(raw)))
        samples.append(Sample(match.group("name"), labels, _value(match.group("value"))))
    return samples


def metric_types(text: str) -> dict[str, str]:
    """``# TYPE`` declarations: metric family name -> counter | gauge | histogram | summary | untyped."""
    types = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "#" and parts[1] == "TYPE":
            types[parts[2]] = parts[3]
    return types


def fetch_metrics(url: str, timeout: float = 10.0) -> str:
    """The text of one scrape of ``url`` (e.g. ``http://localhost:8002/metrics``)."""
    if "://" not in url:
        url = f"http://{url}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8", errors="replace")
    except OSError as exc:
        raise ServerUnreachableError(f"cannot read metrics at {url}: {exc}") from None


def value_of(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the one sample named ``name`` whose labels include ``labels``; None if there is none."""
    for sample in samples:
        if sample.name == name and all(sample.label(k) == v for k, v in labels.items()):
            return sample.value
    return None


@dataclass
class Recording:
    """Scrapes over time: ``scrapes[i]`` was taken at ``times[i]`` (seconds since the recording began)."""

    times: list[float] = field(default_factory=list)
    scrapes: list[list[Sample]] = field(default_factory=list)
    #: What was recorded (shown under the preview's title).
    source: str = ""

    def add(self, t: float, samples: list[Sample]) -> None:
        self.times.append(t)
        self.scrapes.append(samples)

    def names(self) -> set[str]:
        return {s.name for scrape in self.scrapes for s in scrape}

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "times": self.times,
                "scrapes": [[[s.name, dict(s.labels), s.value] for s in scrape] for scrape in self.scrapes]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recording:
        return cls(list(data["times"]), [[Sample(n, tuple(sorted(labels.items())), float(v))
                                          for n, labels, v in scrape] for scrape in data["scrapes"]],
                   str(data.get("source", "")))


def record(url: str, seconds: float, interval: float = 1.0, *, until: Callable[[], bool] | None = None,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> Recording:
    """Scrape ``url`` every ``interval`` seconds for ``seconds`` (or until ``until()`` is true, after at least
    two scrapes), like Prometheus would."""
    recording = Recording()
    start = clock()
    while True:
        before = clock() - start
        text = fetch_metrics(url)
        now = clock() - start
        # Stamped mid-scrape: on a busy host a scrape takes a while, and rates over a few seconds notice.
        recording.add((before + now) / 2, parse_metrics(text))
        if now >= seconds or (until is not None and len(recording.times) >= 2 and until()):
            return recording
        sleep(max(0.0, start + len(recording.times) * interval - clock()))
