"""Media ingestion: a request's media fetched (``fetch.py``, guarded by ``policy.py`` and ``resolver.py``),
cached (``cache.py``), recognised from its bytes (``sniff.py``), decoded (``audio.py``: resampled;
``image.py``; ``video.py``: sampled at the requested fps, with its audio track) and resized
(``resize.py``), under limits (``limits.py``) and cancellation (``cancellation.py``); ``ingest.py`` runs
it for one request."""
