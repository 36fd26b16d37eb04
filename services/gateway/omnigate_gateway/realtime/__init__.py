"""Realtime duplex conversations, whatever the front door: ``session`` (one connection's conversation:
settings, the user's audio buffer, items, the one running answer, barge-in), ``vad`` (server voice-activity
detection with Silero VAD), ``audio`` (the client's 24 kHz PCM and the model's rates) and ``events`` (the
plain events and objects a front door exchanges with a session). No wire format lives here: the OpenAI
Realtime WebSocket (``openai_api``) translates its JSON events to these, as a gRPC stream would."""
