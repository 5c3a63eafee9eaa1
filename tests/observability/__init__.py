"""Tests of the observability stack: Grafana dashboard, Prometheus config, compose, Dockerfile.

No Docker engine runs on the test machines, so the stack is verified in parts: the files are
checked by the real tools that read them (`promtool`, `docker-compose config`), and the dashboard's
queries are run by a real Prometheus scraping a real broker under load.
"""
