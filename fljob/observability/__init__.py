"""Observability outside the trainer: the series catalogue, Grafana dashboards, alert rules.

Nothing here imports torch: `fljob dashboard` and the alert generator run anywhere.
"""
