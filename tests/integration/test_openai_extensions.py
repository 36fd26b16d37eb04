"""What benchmark clients send, against the real gateway and worker: vLLM's sampling extensions
(``ignore_eos``, ``stream_options.continuous_usage_stats``, ``min_tokens``, ``top_k``, ...), and
``POST /v1/completions`` (text prompts), with the ``openai`` SDK and raw HTTP."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def http(omni_stack):
    with httpx.Client(base_url=f"http://127.0.0.1:{omni_stack.gateway.http_port}", timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(omni_stack) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{omni_stack.gateway.http_port}/v1",
        api_key="x",
        max_retries=0,
        timeout=120,
    )


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _sse(http: httpx.Client, path: str, body: dict) -> list[dict]:
    """The data events of a streamed answer (without the closing [DONE])."""
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


# ---- vLLM's extensions ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_ignore_eos_generates_exactly_max_tokens(http, stream):
    body = {"messages": HI, "max_tokens": 12, "ignore_eos": True}
    if stream:
        chunks = _sse(http, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
        usage, finish = chunks[-1]["usage"], chunks[-2]["choices"][0]["finish_reason"]
    else:
        reply = _ok(http.post("/v1/chat/completions", json=body))
        usage, finish = reply["usage"], reply["choices"][0]["finish_reason"]
    assert usage["completion_tokens"] == 12 and finish == "length"


def test_continuous_usage_stats_puts_a_running_usage_on_every_chunk(http):
    chunks = _sse(
        http,
        "/v1/chat/completions",
        {
            "messages": HI,
            "max_tokens": 8,
            "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    )
    assert all(chunk["usage"] is not None for chunk in chunks), "every chunk carries usage"
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[0] == 0, "a running count"
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert content and content[0]["usage"]["completion_tokens"] >= 1
    finish = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
    assert last["usage"]["prompt_tokens"] > 0
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 8
    assert finish["usage"] == last["usage"], "exact from the finish chunk on"


def test_vllm_sampling_extensions_are_accepted(http):
    reply = _ok(
        http.post(
            "/v1/chat/completions",
            json={
                "messages": HI,
                "max_tokens": 6,
                "min_tokens": 6,
                "top_k": 5,
                "temperature": 0.8,
                "repetition_penalty": 1.05,
                "seed": 123,
                "skip_special_tokens": True,
                "spaces_between_special_tokens": True,
                "include_stop_str_in_output": False,
                "best_of": 1,
                "use_beam_search": False,
                "length_penalty": 1.0,
                "min_p": 0,
                "priority": 0,
                "stop_token_ids": [],
                "add_generation_prompt": True,
            },
        )
    )
    assert reply["usage"]["completion_tokens"] == 6  # min_tokens = max_tokens
    seeded = {"messages": HI, "max_tokens": 6, "top_k": 5, "temperature": 0.8, "seed": 123}
    answers = {
        _ok(http.post("/v1/chat/completions", json=seeded))["choices"][0]["message"]["content"]
        for _ in range(2)
    }
    assert len(answers) == 1, "a seed makes sampling reproducible"
    _ok(
        http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "top_k": -1})
    )  # vLLM's "off"


@pytest.mark.parametrize(
    ("param", "value", "words"),
    [
        ("include_stop_str_in_output", True, "it must be false"),
        ("skip_special_tokens", False, "it must be true"),
        ("best_of", 2, "it must be 1"),
        ("use_beam_search", True, "it must be false"),
        ("min_p", 0.1, "it must be 0"),
        ("stop_token_ids", [151645], "not supported"),
        ("guided_json", {"type": "object"}, "not supported"),
        ("chat_template_kwargs", {"enable_thinking": False}, "not supported"),
        ("echo", True, "/v1/completions"),
    ],
)
def test_vllm_extensions_omnigate_cannot_honour_are_400(http, param, value, words):
    error = _error(http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, param: value}))
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    assert param in error["message"] and words in error["message"]


# ---- /v1/completions ----------------------------------------------------------------------------------


def test_completions_answer_the_prompt_as_chat_does(http):
    prompt = "Count to three."
    completion = _ok(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6}))
    chat = _ok(
        http.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 6}
        )
    )
    assert completion["object"] == "text_completion" and completion["id"].startswith("cmpl-")
    choice = completion["choices"][0]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert choice["text"] == chat["choices"][0]["message"]["content"], "the prompt is one user message"
    assert completion["usage"] == chat["usage"]
    assert completion["model"] == chat["model"]
    listed = _ok(http.post("/v1/completions", json={"prompt": [prompt], "max_tokens": 6}))
    assert listed["choices"][0]["text"] == choice["text"]
    echoed = _ok(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "echo": True}))
    assert echoed["choices"][0]["text"] == prompt + choice["text"]


def test_streamed_completions_with_usage(http, sdk):
    chunks = _sse(
        http,
        "/v1/completions",
        {
            "prompt": "Hi",
            "max_tokens": 5,
            "ignore_eos": True,
            "echo": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert all(c["object"] == "text_completion" for c in chunks)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert texts[0] == "Hi", "echo: the prompt comes first"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    model = sdk.models.list().data[0].id
    stream = sdk.completions.create(
        model=model,
        prompt="Hi",
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    parts = list(stream)
    assert "".join(p.choices[0].text for p in parts if p.choices)
    assert parts[-1].usage.completion_tokens == 4
    reply = sdk.completions.create(model=model, prompt="Hi", max_tokens=3)
    assert reply.choices[0].text and reply.usage.completion_tokens <= 3


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"prompt": ["a", "b"]}, "2 prompts"),
        ({"prompt": [1, 2, 3]}, "token ids"),
        ({"prompt": ""}, "empty"),
        ({}, "missing"),
        ({"prompt": "x", "suffix": "y"}, "not supported"),
        ({"prompt": "x", "logprobs": 1}, "not supported"),
        ({"prompt": "x", "n": 2}, "it must be 1"),
        ({"prompt": "x", "max_tokens": 2**70}, "it must be an integer between 1 and"),
    ],
)
def test_completions_refusals_name_the_parameter(http, body, words):
    error = _error(http.post("/v1/completions", json=body))
    param = next((k for k in body if k != "prompt"), "prompt")
    assert error["param"] == param and words in error["message"], error
