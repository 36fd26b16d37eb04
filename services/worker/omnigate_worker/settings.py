"""Worker settings (environment variables prefixed ``OMNIGATE_WORKER_``, or command-line flags)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from omnigate.service_settings import ServiceSettings

DEFAULT_MODEL = "models/tiny-qwen2.5-omni"


class WorkerSettings(ServiceSettings):
    """Everything the worker can be told. Built once in ``main()`` and passed down."""

    model_config = SettingsConfigDict(env_prefix="OMNIGATE_WORKER_", extra="ignore", cli_kebab_case=True)

    model: str = Field(DEFAULT_MODEL, description="Hugging Face model id or local path to load.")
    device: str = Field(
        "auto",
        description="Torch device: 'auto' (the machine's accelerator as transformers finds it: CUDA, MPS, XPU, ...; "
        "else cpu), 'cpu', 'cuda:0', 'mps', 'xpu:0'.",
    )
    dtype: str = Field(
        "auto",
        description="'auto' (bfloat16 on CUDA, XPU and NPU, float16 on MPS, float32 on CPU), 'float32', 'bfloat16', "
        "'float16'.",
    )
    attn_implementation: str = Field(
        "auto",
        description="'auto' (flash_attention_2 when flash_attn imports on CUDA, else sdpa), 'sdpa', 'eager', ...",
    )
    torch_threads: int = Field(
        0,
        description="Torch intra-op threads; 0 = auto (half the cores on CPU, leaving room for preprocessing; torch's default on CUDA).",
    )
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own code.")
    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(50061, description="gRPC port (0 = let the OS choose; the chosen port is logged).")
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus metrics endpoint.")
    metrics_port: int = Field(9401, description="Prometheus metrics port (0 = OS-chosen, -1 = disabled).")
    reflection: bool = Field(True, description="Serve gRPC server reflection.")
    max_new_tokens_limit: int = Field(
        4096, description="Upper bound accepted for a request's max_new_tokens."
    )
    max_talker_tokens: int = Field(
        4096, description="Upper bound on speech codec tokens per request (Qwen2.5-Omni talker)."
    )
    talker_tokens_per_text_token: int = Field(
        8, description="Speech codec tokens allowed per generated text token (bounds speech length)."
    )
    max_request_media_bytes: int = Field(
        512 * 1024 * 1024, description="Upper bound on the raw decoded media bytes of one request."
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024,
        description="Largest single gRPC message accepted or sent (media travels in chunks; the request's text "
        "in one message). At least the gateway's max_message_bytes, so a long prompt meets the prompt-token "
        "limit, not a transport limit.",
    )
    tls_cert_file: str | None = Field(
        None, description="PEM certificate (chain) of the gRPC port; set with tls_key_file to serve TLS."
    )
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str | None = Field(
        None, description="PEM CA(s) that client (gateway) certificates must chain to; set = mutual TLS."
    )
    health_port: int = Field(
        -1,
        description="Port of an extra plaintext server answering only grpc.health.v1 (Kubernetes gRPC probes "
        "cannot speak TLS); -1 = none, 0 = OS-chosen.",
    )
    max_batch_size: int = Field(32, description="Requests decoding together in one batch (1 = no batching).")
    max_batch_wait_ms: float = Field(
        2.0, description="When idle, how long the first request waits for others to start with it."
    )
    max_prompt_tokens: int = Field(
        32768,
        description="Prompt tokens (after media expansion) above which a request is refused before it runs.",
    )
    max_batch_tokens: int = Field(
        131072, description="Prompt tokens of all requests in a batch together; more waits for room."
    )
    decode_runner: str = Field(
        "auto",
        description="'slots' (preallocated KV-cache slots, CUDA graphs on CUDA), 'dynamic' (transformers' "
        "DynamicCache, merged and re-padded per join), or 'auto' (slots when the model's decoder supports them).",
    )
    kv_cache_memory_fraction: float = Field(
        0.9,
        gt=0,
        le=1,
        description="CUDA: share of the GPU's memory the worker may fill (weights, KV-cache slots and activations), "
        "like vLLM's gpu_memory_utilization; the KV-cache slots get what is left after the weights and the "
        "activation reserve.",
    )
    activation_reserve_fraction: float = Field(
        0.08,
        ge=0,
        lt=1,
        description="CUDA: share of the GPU's memory kept free for prefill activations and the media encoders.",
    )
    kv_cache_bytes: int = Field(
        0,
        ge=0,
        description="Bytes of KV-cache slots; 0 = from kv_cache_memory_fraction on CUDA, a quarter of the "
        "machine's memory on CPU (CPU slots are reserved, not touched, until used).",
    )
    kv_slot_tokens: int = Field(
        0,
        ge=0,
        description="Tokens one request may hold in the KV cache (prompt + max_new_tokens); 0 = "
        "max_prompt_tokens + max_new_tokens_limit, lowered to fit max_batch_size slots in the budget. A batchable "
        "request that needs more is refused.",
    )
    cuda_graphs: bool = Field(
        True,
        description="Capture the slot runner's decode step as CUDA graphs, one per batch-size and "
        "context-length bucket, and replay them (CUDA only; eager elsewhere).",
    )
    sdpa_backends: str = Field(
        "auto",
        description="SDPA kernels the decode step may use, comma-separated from flash, efficient, cudnn, math; "
        "'auto' = flash,efficient on CUDA (cuDNN builds a new plan for every new sequence length) and torch's "
        "choice on CPU.",
    )
    prefill_tokens_per_step: int = Field(
        2048,
        ge=1,
        description="Prompt tokens prefilled between two decode steps (joiners and chunks of long prompts), so a "
        "long prompt does not stall the rows already decoding.",
    )
    preprocess_threads: int = Field(1, description="Threads running chat templates and processors.")
    max_preprocess_s: float = Field(
        30.0,
        gt=0,
        description="Longest one request's chat template and processor may take; a request over it is refused "
        "(RESOURCE_EXHAUSTED) and the requests queued behind it go on.",
    )
    max_messages: int = Field(1024, ge=1, description="Messages in one request's conversation.")
    max_content_parts: int = Field(
        4096, ge=1, description="Content parts (text and media) in one request, all messages together."
    )
    trim_audio_padding: bool = Field(
        True,
        description="Pad audio features only to the audio's length, not the feature extractor's 300 s (same output, less CPU).",
    )
    max_queue: int = Field(64, description="Requests waiting to run before new ones get RESOURCE_EXHAUSTED.")
    queue_retry_after_s: float = Field(
        1.0, description="Retry delay suggested to callers refused by a full queue."
    )
    stream_speech: bool = Field(
        True,
        description="Send speech chunk by chunk while it is generated: the speech pipeline (thinker, batched "
        "talker and vocoder stages, speech/pipeline.py) where the slot runner serves the model, else generate() "
        "with a streamer (a second vocoder pass at the end). false: one waveform at the end, one request "
        "at a time.",
    )
    speech_chunk_codes: int = Field(
        25, description="Speech codec codes per streamed chunk (25 = 0.5 s for Qwen2.5-Omni)."
    )
    speech_context_codes: int = Field(
        25, ge=0, description="Codes of left context vocoded with each chunk, for continuity."
    )
    speech_lookahead_codes: int = Field(
        8,
        ge=0,
        description="Codes after a chunk vocoded with it (and cut off), so its end matches an unstreamed "
        "synthesis; each chunk waits for them (8 = 0.16 s of audio).",
    )
    speech_max_streams: int = Field(
        8, ge=1, description="Speech requests whose talkers decode together (the talker's KV-cache slots)."
    )
    talker_do_sample: bool = Field(
        True,
        description="The talker samples codes with generate()'s talker defaults (top-k 40, top-p 0.8, "
        "temperature 0.9); false: greedy.",
    )
    vocoder_steps: int = Field(
        10,
        ge=1,
        description="ODE steps of the vocoder's DiT per chunk (generate() uses 10; fewer is faster and "
        "changes the audio: measure before lowering it).",
    )
    vocoder_cuda_graphs: bool = Field(
        True,
        description="On CUDA, capture the vocoder's DiT ODE solve as a CUDA graph per chunk shape (checked "
        "against the eager solve at capture; eager where capture fails).",
    )
    vocoder_max_batch: int = Field(
        16, ge=1, description="Speech chunks of different requests vocoded in one call at most."
    )
    audio_chunk_seconds: float = Field(0.5, description="Seconds of speech per streamed audio chunk.")
    warmup: bool = Field(True, description="Run one tiny generation before reporting SERVING.")
    grace_period_s: float = Field(30.0, description="On SIGTERM, seconds to let in-flight requests finish.")
    keepalive_time_s: float = Field(
        30.0, gt=0, description="Seconds between keepalive pings to gateways (detects dead connections)."
    )
    keepalive_timeout_s: float = Field(
        10.0, gt=0, description="Seconds without a ping reply after which a gateway connection is dropped."
    )
    keepalive_min_ping_interval_s: float = Field(
        5.0,
        gt=0,
        description="Shortest interval between a gateway's keepalive pings that is accepted (faster pingers "
        "are disconnected); keep it at or below OMNIGATE_GATEWAY_WORKER_KEEPALIVE_TIME_S.",
    )
