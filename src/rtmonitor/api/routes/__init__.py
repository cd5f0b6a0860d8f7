"""The HTTP routes, one router per concern: metrics (JSON pages and Prometheus scrapes),
live (Server-Sent Events), ops (health, readiness, self-metrics) and the dashboard."""
