"""The engine: loads a model through transformers' standard path and runs its requests.

``base.py`` is the interface the scheduler and the server use; ``transformers_engine.py`` the real engine;
``loading.py`` the model, processor, device and dtype; ``inputs.py`` the chat template and the processor's
tensors; ``sampling.py`` a request's parameters as transformers takes them; ``streaming.py`` text out as
deltas; ``batching.py`` (dynamic cache) and ``slots.py`` (KV-cache slots, CUDA graphs; ``decoders.py`` says
what they need of a decoder) batched decoding. What a model family adds lives in ``omnigate_worker.families``.
"""
