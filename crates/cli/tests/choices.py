"""`n` > 1 through the official `openai` client: chat (streamed and not) and legacy completions give
`n` choices, each its own job with its own seed, billed each; usage sums them."""

import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ["TESSERA_HUB"] + "/v1", api_key=os.environ["TESSERA_KEY"], max_retries=0)
MODEL = "smollm2-135m"
messages = [{"role": "user", "content": "Invent a name for a cat."}]
jobs, cost = [], 0

reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=1.0, seed=11, n=3)
assert [c.index for c in reply.choices] == [0, 1, 2], reply.choices
texts = [c.message.content for c in reply.choices]
assert all(texts), texts
assert len(set(texts)) > 1, f"each choice has its own seed: {texts}"
ext = reply.model_extra["tessera"]
assert len(ext["choices"]) == 3 and ext["cost"] == sum(c["cost"] for c in ext["choices"]), ext
assert len({c["job_id"] for c in ext["choices"]}) == 3, ext
assert len({c["seed"] for c in ext["choices"]}) == 3, ext
assert ext["choices"][0]["seed"] == 11, "choice 0 keeps the request's seed"
jobs += [c["job_id"] for c in ext["choices"]]
cost += ext["cost"]
# The same seed gives the same choices.
again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=1.0, seed=11, n=3)
assert [c.message.content for c in again.choices] == texts
jobs += [c["job_id"] for c in again.model_extra["tessera"]["choices"]]
cost += again.model_extra["tessera"]["cost"]
one = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=1.0, seed=11)
assert one.choices[0].message.content == texts[0], "n = 1 is choice 0"
jobs.append(one.model_extra["tessera"]["job_id"])
cost += one.model_extra["tessera"]["cost"]
assert reply.usage.completion_tokens >= 3, "usage sums the choices"
assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

# Streamed: each choice's deltas carry its index; each ends with its own finish_reason.
stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=1.0, seed=5, n=2,
                                        stream=True, stream_options={"include_usage": True})
streamed, finished, usage = {0: "", 1: ""}, {}, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        streamed[c.index] += c.delta.content or ""
        if c.finish_reason:
            finished[c.index] = c.finish_reason
            ext = chunk.model_extra["tessera"]
            jobs.append(ext["job_id"])
            cost += ext["cost"]
assert set(finished) == {0, 1}, finished
assert all(streamed.values()), streamed
assert usage is not None and usage.completion_tokens >= 2, usage

legacy = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0.9, seed=3, n=2)
assert [c.index for c in legacy.choices] == [0, 1] and all(c.text for c in legacy.choices), legacy.choices
jobs += [c["job_id"] for c in legacy.model_extra["tessera"]["choices"]]
cost += legacy.model_extra["tessera"]["cost"]

assert len(set(jobs)) == len(jobs) == 11, jobs
print(json.dumps({"jobs": len(jobs), "cost": cost, "texts": texts}))
