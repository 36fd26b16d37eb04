"""The test harness, shared by tests and benchmarks: starting services (``stack``), making media
(``media_factory``) and serving it (``media_server``), certificates (``certs``), a real Prometheus
(``prometheus_server``) and the chart's queries (``chart_queries``), waiting for events (``waiting``), the
encoder probe (``encoder_probe``), requests through a real engine in-process (``engine_runs``), and the
fakes named as such, for tests about control flow (``fake_gateway``: the public API; ``fake_workers``: the
gateway's worker pool; ``fake_engine``: the worker's engine; ``hostile_server``: a misbehaving media host).

Import it as ``tests.support.<module>`` from the repository root: pytest puts the root on ``sys.path``
(``tests`` is a package), and benchmarks run as ``python -m bench.<name>`` from the root."""
