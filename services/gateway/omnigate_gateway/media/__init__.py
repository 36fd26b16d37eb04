"""Media ingestion: a request's media fetched (``fetch.py``, guarded by ``url_policy.py`` and ``resolver.py``),
cached (``cache.py``), decoded (``decode.py``: audio resampled, images, video sampled at the requested fps
and its audio track) and resized (``resize.py``), under limits and cancellation (``cancellation.py``);
``ingest.py`` runs it for one request."""
