"""Drives a Tessera hub with the official `openai` Python client, unchanged but for base_url."""

import json
import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["TESSERA_HUB"] + "/v1", api_key=os.environ["TESSERA_KEY"], max_retries=0)
question = [{"role": "user", "content": "What is the capital of France?"}]

models = [m.id for m in client.models.list()]
assert "smollm2-135m" in models, models

raw = client.chat.completions.with_raw_response.create(model="smollm2-135m", messages=question, max_tokens=12, temperature=0)
reply = raw.parse()
text = reply.choices[0].message.content
assert "Paris" in text, text
assert reply.usage.completion_tokens >= 1 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
cost = int(raw.headers["x-tessera-cost"])
assert reply.model_extra["tessera"]["cost"] == cost

parts, usage, finish = [], None, None
stream = client.chat.completions.create(
    model="smollm2-135m", messages=question, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
)
for chunk in stream:
    if chunk.choices:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert "".join(parts) == text, (parts, text)
assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens
assert finish in ("stop", "length")

completion = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=5, temperature=0)
assert completion.choices[0].text, completion

try:
    client.chat.completions.create(model="gpt-17", messages=question, max_tokens=4)
    raise SystemExit("an unknown model must fail")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e.body
try:
    OpenAI(base_url=os.environ["TESSERA_HUB"] + "/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(
        model="smollm2-135m", messages=question, max_tokens=4
    )
    raise SystemExit("a bad key must fail")
except openai.AuthenticationError as e:
    assert e.code == "invalid_api_key", e.body

print(json.dumps({"text": text, "cost": cost, "streamed_chunks": len(parts)}))
