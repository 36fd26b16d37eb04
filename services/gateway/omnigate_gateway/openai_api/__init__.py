"""The OpenAI-compatible HTTP front door.

- ``app.py`` builds the FastAPI app (routes, exception handlers, middleware) around ``GatewayCore``;
  ``server.py`` serves it (socket, uvicorn with h11 guards, TLS following the certificate files).
- ``routes/``: one module per endpoint group (``completions``, ``images``, ``audio``, ``models``,
  ``health``), handlers on an ``APIRouter``; ``dependencies.py`` gives them the core, the settings and the
  request's ``Call``.
- ``protocol.py``: OpenAI's request bodies (pydantic); ``requests.py``: a request as the public
  ``GenerateRequest``; ``responses.py``: the core's events as OpenAI's answers and stream chunks;
  ``encoding.py``: WAV, speech and image encoding; ``streaming.py``: one generation, answered whole or as
  SSE.
- ``errors.py`` is **where an error becomes an HTTP code** (``http_error``) and holds the app's exception
  handlers; ``middleware.py`` (request ids, the declared body size) and ``refusals.py`` (the count and
  access line of a request refused before the core) wrap the request path.
"""
