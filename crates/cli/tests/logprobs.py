"""Log-probabilities through the official `openai` client, on chat (streamed and not) and legacy
completions: present, consistent with the text (the listed tokens concatenate to it), at most 0,
alternatives sorted and holding the chosen token whenever it is likely enough to be among them;
out-of-range requests are 400s naming the parameter."""

import json
import math
import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["TESSERA_HUB"] + "/v1", api_key=os.environ["TESSERA_KEY"], max_retries=0)
MODEL = "smollm2-135m"
EPS = 1e-6


def check_position(token, logprob, top, k):
    """One position: value range, alternatives sorted and complete, the chosen token among them
    when its probability is at least the least likely alternative's."""
    assert logprob <= 0 and math.isfinite(logprob), (token, logprob)
    assert len(top) == k, (len(top), k)
    values = [alt["logprob"] if isinstance(alt, dict) else alt for alt in top]
    assert all(v <= 0 for v in values), values
    assert values == sorted(values, reverse=True), values
    if k and logprob >= values[-1] + EPS:
        names = [alt["token"] for alt in top]
        assert token in names, (token, names)
        assert abs(values[names.index(token)] - logprob) < 1e-5


def check_chat(content, text, k, greedy):
    assert content, "logprobs are present"
    assert "".join(e["token"] for e in content) == text, ([e["token"] for e in content], text)
    for e in content:
        assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"], e
        top = e["top_logprobs"]
        check_position(e["token"], e["logprob"], top, k)
        if greedy and k:
            # Greedy decoding picks the most likely token.
            assert top[0]["token"] == e["token"] or abs(top[0]["logprob"] - e["logprob"]) < 1e-5, e


positions = 0
messages = [{"role": "user", "content": "Name three colors of the rainbow."}]
for temperature, k in [(0, 5), (0.8, 3), (1.0, 0)]:
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=temperature, seed=7,
        logprobs=True, top_logprobs=k,
    )
    choice = reply.choices[0]
    content = choice.logprobs.model_dump()["content"]
    check_chat(content, choice.message.content, k, temperature == 0)
    positions += len(content)

# Streamed: each chunk's logprobs list the tokens whose text it carries.
stream = client.chat.completions.create(
    model=MODEL, messages=messages, max_tokens=24, temperature=0, logprobs=True, top_logprobs=2, stream=True,
)
text, streamed = "", []
for chunk in stream:
    if not chunk.choices:
        continue
    delta = chunk.choices[0].delta
    text += delta.content or ""
    if chunk.choices[0].logprobs is not None:
        streamed += chunk.choices[0].logprobs.model_dump()["content"] or []
check_chat(streamed, text, 2, True)
positions += len(streamed)
greedy = client.chat.completions.create(
    model=MODEL, messages=messages, max_tokens=24, temperature=0, logprobs=True, top_logprobs=2,
)
assert greedy.choices[0].message.content == text, "greedy streamed and not streamed agree"
assert [e.logprob for e in greedy.choices[0].logprobs.content] == [e["logprob"] for e in streamed]

# Legacy completions: `logprobs` is the number of alternatives.
legacy = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, logprobs=3)
lp = legacy.choices[0].logprobs
assert "".join(lp.tokens) == legacy.choices[0].text, (lp.tokens, legacy.choices[0].text)
assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
for token, value, top, offset in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
    assert value <= 0, value
    assert legacy.choices[0].text[offset:].startswith(token)
    # A dict by token text: alternatives with the same text collapse.
    assert 1 <= len(top) <= 3 and max(top.values()) >= value - 1e-5, (top, value)
positions += len(lp.tokens)

refused = {}
for params in [{"logprobs": True, "top_logprobs": 50}, {"top_logprobs": 3}]:
    try:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **params)
        raise SystemExit(f"must be refused: {params}")
    except openai.BadRequestError as e:
        assert e.param == "top_logprobs", e.body
        refused[json.dumps(params)] = e.code
try:
    client.completions.create(model=MODEL, prompt="x", max_tokens=4, logprobs=6)
    raise SystemExit("logprobs 6 must be refused")
except openai.BadRequestError as e:
    assert e.param == "logprobs", e.body

print(json.dumps({"positions": positions, "refused": refused}))
