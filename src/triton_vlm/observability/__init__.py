"""Observability helpers: read Triton's Prometheus metrics, evaluate the dashboard's queries, report status.

- :mod:`.scrape`: parse the Prometheus text format, scrape ``:8002/metrics`` once or over time.
- :mod:`.promql`: a small PromQL evaluator for the queries of ``deploy/grafana/dashboards/triton-vlm.json``.
- :mod:`.dashboard`: the dashboard's panels, and ``triton-vlm dashboard-preview`` (render them with matplotlib).
- :mod:`.status`: ``triton-vlm status`` (server, models, readiness, instance kinds, loaded weights).
"""
