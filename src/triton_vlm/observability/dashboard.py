"""The Grafana dashboard (``deploy/grafana/dashboards/triton-vlm.json``) and ``triton-vlm dashboard-preview``.

No Grafana needed for the preview: it scrapes a server's ``/metrics`` over time (optionally while sending it a
small load), evaluates every panel's PromQL query with :mod:`.promql`, and draws the panels in the dashboard's
grid with matplotlib. The README's docs/dashboard.png is made this way from a tiny-model server.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triton_vlm.observability.promql import Evaluator, metric_names
from triton_vlm.observability.scrape import Recording, record

#: Metrics Triton exports only where it has GPUs (nv_gpu_*); on a CPU host their panels stay empty.
GPU_ONLY_PREFIXES = ("nv_gpu_", "nv_energy_")


def dashboard_path() -> Path:
    """The dashboard JSON in this checkout (or ``$TRITON_VLM_DASHBOARD``)."""
    import os

    explicit = os.environ.get("TRITON_VLM_DASHBOARD")
    if explicit:
        return Path(explicit)
    from triton_vlm.launcher.repository import default_model_repository

    try:
        root = default_model_repository().parent
    except Exception:
        root = Path(__file__).resolve().parents[3]
    return root / "deploy" / "grafana" / "dashboards" / "triton-vlm.json"


def load_dashboard(path: Path | None = None) -> dict[str, Any]:
    return json.loads((path or dashboard_path()).read_text())


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    id: int
    title: str
    kind: str  # timeseries | stat
    unit: str
    grid: dict[str, int]
    targets: tuple[Target, ...]

    def queries(self, variables: dict[str, str]) -> list[tuple[str, str]]:
        return [(substitute(t.expr, variables), t.legend) for t in self.targets]


def panels(dashboard: dict[str, Any]) -> list[Panel]:
    """Every panel with queries, rows expanded."""
    found: list[Panel] = []

    def visit(items: list[dict[str, Any]]) -> None:
        for item in items:
            if item.get("type") == "row":
                visit(item.get("panels", []))
                continue
            targets = tuple(Target(t["expr"], t.get("legendFormat", "")) for t in item.get("targets", [])
                            if t.get("expr"))
            unit = item.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
            found.append(Panel(item["id"], item.get("title", ""), item["type"], unit, item["gridPos"], targets))

    visit(dashboard.get("panels", []))
    return found


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variable interpolation for ``$name`` and ``${name}`` (longest names first)."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return expr


def preview_variables(rate_interval: str = "10s") -> dict[str, str]:
    """What the dashboard's variables stand for in the preview: every model, a fixed rate window."""
    return {"model": ".*", "__rate_interval": rate_interval, "__interval": rate_interval}


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    """Every metric any panel queries (variables filled in as for the preview)."""
    names: set[str] = set()
    for panel in panels(dashboard):
        for expr, _ in panel.queries(preview_variables()):
            names |= metric_names(expr)
    return names


def legend(template: str, labels: tuple[tuple[str, str], ...]) -> str:
    found = dict(labels)
    out = template
    while "{{" in out and "}}" in out:
        start = out.index("{{")
        end = out.index("}}", start)
        out = out[:start] + found.get(out[start + 2:end].strip(), "") + out[end + 2:]
    return out or ",".join(f"{k}={v}" for k, v in labels) or "value"


# -- load while recording -------------------------------------------------------------------------------------
def run_load(http_url: str, grpc_url: str, models: list[str], *, stop: threading.Event, rounds: int = 3,
             max_tokens: int = 12, image: Any = None, log: Callable[[str], None] = lambda _: None) -> int:
    """A small, bounded mixed load: for each round, each model at concurrency 1, 2 and 4 (batched by Triton), and
    token streams to ``llava_stream`` where served. Returns the number of requests sent."""
    from triton_vlm.client import TritonVLMClient

    if image is None:
        from triton_vlm.launcher.repository import default_model_repository

        image = default_model_repository().parent / "test_images" / "sample_image.jpg"
    prompts = {"kosmos2": "<grounding>An image of"}
    sent = 0
    with TritonVLMClient(http_url, grpc_url=grpc_url, timeout=120) as client:
        served = {m["name"] for m in client.list_models()}
        for round_ in range(rounds):
            for concurrency in (1, 2, 4):
                for model in models:
                    if stop.is_set():
                        return sent
                    items = [(image, f"{prompts.get(model, 'What is in this image?')} {i}")
                             for i in range(concurrency * 2)]
                    client.infer_many(model, items, concurrency=concurrency, progress=False, return_exceptions=True,
                                      max_tokens=max_tokens)
                    sent += len(items)
                if "llava_stream" in served and not stop.is_set():
                    for _ in client.stream_pieces("llava", image, "Describe it.", max_tokens=max_tokens * 2):
                        pass
                    sent += 1
            log(f"load round {round_ + 1}/{rounds}: {sent} requests")
            if stop.wait(1.0):
                return sent
    return sent


def collect(metrics_url: str, *, seconds: float, interval: float = 1.0, http_url: str | None = None,
            grpc_url: str | None = None, models: list[str] | None = None, rounds: int = 3,
            log: Callable[[str], None] = lambda _: None) -> Recording:
    """Scrape ``metrics_url`` every ``interval`` s; with ``http_url`` (and ``grpc_url``, the same server's gRPC
    address, for the token streams), send :func:`run_load` meanwhile and stop recording a few scrapes after it
    ends (or after ``seconds``)."""
    if http_url is None:
        return record(metrics_url, seconds, interval)
    if grpc_url is None:
        raise ValueError("a load needs the server's gRPC address as well as its HTTP one")
    stop = threading.Event()
    finished = threading.Event()
    failure: list[BaseException] = []

    def load() -> None:
        try:
            run_load(http_url, grpc_url, models or ["llava", "kosmos2", "moondream2"], stop=stop,
                     rounds=rounds, log=log)
        except BaseException as exc:  # reported after the recording
            failure.append(exc)
        finally:
            finished.set()

    tail = [0.0]

    def done() -> bool:
        if finished.is_set() and not tail[0]:
            tail[0] = time.monotonic() + 3 * interval
        return bool(tail[0]) and time.monotonic() >= tail[0]

    thread = threading.Thread(target=load, name="dashboard-load", daemon=True)
    record_started = record(metrics_url, 0, interval)  # one scrape before any load: the panels start idle
    time.sleep(interval)
    thread.start()
    try:
        recording = record(metrics_url, seconds, interval, until=done)
    finally:
        stop.set()
        thread.join(timeout=120)
    if failure:
        raise failure[0]
    offset = interval + (recording.times[0] if recording.times else 0.0)
    merged = Recording(list(record_started.times), list(record_started.scrapes))
    for t, scrape in zip(recording.times, recording.scrapes, strict=True):
        merged.add(t + offset, scrape)
    return merged


# -- rendering ------------------------------------------------------------------------------------------------
@dataclass
class PanelData:
    panel: Panel
    series: list[tuple[str, list[float]]]  # (legend, values at each time)

    @property
    def has_data(self) -> bool:
        return any(any(math.isfinite(v) for v in values) for _, values in self.series)


def evaluate(dashboard: dict[str, Any], recording: Recording, rate_interval: str = "10s") -> list[PanelData]:
    evaluator = Evaluator(recording)
    variables = preview_variables(rate_interval)
    out = []
    for panel in panels(dashboard):
        series = []
        for expr, template in panel.queries(variables):
            for labels, values in sorted(evaluator.range_query(expr).items()):
                series.append((legend(template, labels), values))
        out.append(PanelData(panel, series))
    return out


_UNITS = {"s": ("s", 1.0), "ms": ("ms", 1.0), "bytes": ("GiB", 2.0 ** -30), "percentunit": ("%", 100.0),
          "reqps": ("req/s", 1.0)}

_BACKGROUND, _PANEL, _TEXT, _GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
_COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff780a", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a", "#96d98d",
           "#ffb357"]


def _scale(unit: str, series: list[list[float]]) -> tuple[str, float]:
    """The axis label and factor for a panel's values (one for all its series, as Grafana's axis has)."""
    if unit == "s":
        finite = [v for values in series for v in values if math.isfinite(v)]
        return ("ms", 1000.0) if finite and max(finite) < 1 else ("s", 1.0)
    return _UNITS.get(unit, ("", 1.0))


def render(data: list[PanelData], times: list[float], output: Path, *, title: str = "triton-vlm",
           subtitle: str = "") -> Path:
    """Draw the panels in the dashboard's grid (24 columns; a grid unit is ~30 px high in Grafana)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p.panel.grid["y"] + p.panel.grid["h"] for p in data)
    figure = plt.figure(figsize=(18, rows * 0.42 + 1.0), facecolor=_BACKGROUND)
    figure.suptitle(f"{title}" + (f"\n{subtitle}" if subtitle else ""), color=_TEXT, fontsize=13, y=0.995)
    grid = figure.add_gridspec(rows, 24, left=0.035, right=0.99, top=1 - 0.9 / (rows * 0.42 + 1.0), bottom=0.03,
                               hspace=2.2, wspace=0.9)
    span = (times[-1] - times[0]) if times else 0.0
    axis_unit, divisor = ("minutes", 60.0) if span > 300 else ("seconds", 1.0)
    xs = [t / divisor for t in times]
    for item in data:
        g = item.panel.grid
        ax = figure.add_subplot(grid[g["y"]:g["y"] + g["h"], g["x"]:g["x"] + g["w"]])
        ax.set_facecolor(_PANEL)
        for spine in ax.spines.values():
            spine.set_color(_GRID)
        ax.tick_params(colors=_TEXT, labelsize=7)
        ax.set_title(item.panel.title, color=_TEXT, fontsize=9, loc="left")
        if item.panel.kind == "stat":
            _draw_stat(ax, item)
            continue
        unit, factor = _scale(item.panel.unit, [values for _, values in item.series])
        for index, (name, values) in enumerate(item.series):
            ax.plot(xs, [v * factor for v in values], color=_COLORS[index % len(_COLORS)], linewidth=1.4,
                    label=name)
        ax.grid(color=_GRID, linewidth=0.5)
        if len(xs) > 1:
            ax.set_xlim(xs[0], xs[-1])
        if g["y"] + g["h"] == rows:
            ax.set_xlabel(axis_unit, color=_TEXT, fontsize=7)
        if unit:
            ax.set_ylabel(unit, color=_TEXT, fontsize=7)
        if item.has_data:
            ax.legend(fontsize=6, ncol=3, loc="upper left", facecolor=_PANEL, edgecolor=_GRID, labelcolor=_TEXT,
                      framealpha=0.7)
        else:
            ax.text(0.5, 0.5, "no data (GPU hosts only)" if _gpu_only(item) else "no data", color="#8e8e8e",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=80, facecolor=_BACKGROUND)
    plt.close(figure)
    return output


def _gpu_only(item: PanelData) -> bool:
    return any(t.expr.startswith(GPU_ONLY_PREFIXES) for t in item.panel.targets)


def _draw_stat(ax: Any, item: PanelData) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    last = [(name, next((v for v in reversed(values) if math.isfinite(v)), math.nan)) for name, values in item.series]
    if not last:
        ax.text(0.5, 0.5, "no data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
        return
    width = 1.0 / len(last)
    for index, (name, value) in enumerate(last):
        text, color = _stat_text(item.panel, value)
        x = width * (index + 0.5)
        ax.text(x, 0.55, text, color=color, ha="center", va="center", transform=ax.transAxes, fontsize=13,
                fontweight="bold")
        ax.text(x, 0.15, name, color=_TEXT, ha="center", va="center", transform=ax.transAxes, fontsize=7)


def _stat_text(panel: Panel, value: float) -> tuple[str, str]:
    if not math.isfinite(value):
        return "-", "#8e8e8e"
    if panel.title.startswith("Weights loaded"):
        return ("loaded", "#73bf69") if value >= 1 else ("not loaded", "#ff9830")
    if panel.unit == "s":
        return f"{value:.2f} s", "#5794f2"
    return f"{value:g}", "#f2495c" if "failure" in panel.title.lower() and value > 0 else "#73bf69"


def summary(data: list[PanelData], recording: Recording, output: Path) -> dict[str, Any]:
    return {
        "output": str(output),
        "scrapes": len(recording.times),
        "seconds": round(recording.times[-1] - recording.times[0], 2) if recording.times else 0.0,
        "panels": [{"title": d.panel.title, "series": len(d.series), "has_data": d.has_data,
                    "gpu_only": _gpu_only(d)} for d in data],
    }
