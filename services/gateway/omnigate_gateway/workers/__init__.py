"""The worker pool: the workers a gateway calls (``pool.py``: targets, health, choice, ejection, and the
retries of a call on another worker) and their gRPC channels (``channels.py``)."""
