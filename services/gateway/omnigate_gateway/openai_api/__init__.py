"""The OpenAI-compatible HTTP front door: the FastAPI app and its server (``app.py``), and the conversion
between OpenAI's request and response shapes and Omnigate's, including where an error becomes an HTTP code
(``convert.py``)."""
