"""The workers a gateway calls: where they are (``targets.py``), one worker's channel, health and ejection
state (``client.py``), the set of them and the choice of one (``pool.py``), one request's call to a worker,
**where a retry happens** (``call.py``), and the gRPC channels (``channels.py``)."""
