"""Tiny random-weight checkpoints for development and tests, built offline (``python -m omnigate_tiny``).

Not part of the worker (``omnigate_worker``): the worker serves whatever checkpoint it is given; this
package builds the small ones ``make models`` writes into ``models/``: ``build.py`` runs the builds (one
folder per family, stamped, renamed into place), ``builders.py`` holds the shared pieces and most families,
``qwen3_omni.py`` and ``voxtral.py`` the larger ones."""
