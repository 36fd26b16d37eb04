"""Speech output, pipelined across requests (Qwen2.5-Omni): ``pipeline.py`` ties the stages, ``talker.py``
builds the talker's prompt and decodes every request's talker in one batch, ``vocoder.py`` turns codes into
audio on its own thread (and CUDA stream)."""
