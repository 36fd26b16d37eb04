"""The HTTP API's routes, one module per endpoint group, each an ``APIRouter`` of module-level handlers:
``completions`` (``POST /v1/chat/completions``, ``POST /v1/completions``), ``images``
(``POST /v1/images/generations``), ``audio`` (``POST /v1/audio/speech``, ``POST /v1/audio/transcriptions``),
``models`` (``GET /v1/models``, ``GET /v1/models/{id}``) and ``health``
(``GET /health``, ``/health/readiness``, ``/health/liveness``). Every GET route answers HEAD too (same status and headers, no body)."""
