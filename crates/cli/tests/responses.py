"""`POST /v1/responses` through the official `openai` client: text out, JSON under a schema, a stream
of the Responses API's typed events, and stateful parameters refused by name."""

import json
import os

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["TESSERA_HUB"] + "/v1", api_key=os.environ["TESSERA_KEY"], max_retries=0)
MODEL = "smollm2-135m"

plain = client.responses.create(model=MODEL, input="What is the capital of France?", max_output_tokens=24, temperature=0)
assert plain.object == "response" and plain.status in ("completed", "incomplete"), plain
assert plain.output_text, plain
assert plain.output[0].type == "message" and plain.output[0].role == "assistant"
assert plain.usage.input_tokens > 0 and plain.usage.output_tokens > 0
assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
assert plain.model_extra["tessera"]["job_id"]

schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
          "required": ["city", "country"], "additionalProperties": False}
structured = client.responses.create(
    model=MODEL, instructions="Answer in JSON.", input=[{"role": "user", "content": "Name a city and its country."}],
    max_output_tokens=96, temperature=0, text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
)
assert structured.output_text.startswith("{"), structured.output_text
value = None
if structured.status == "completed":
    value = json.loads(structured.output_text)
    assert set(value) == {"city", "country"} and all(isinstance(v, str) for v in value.values()), value
else:
    assert structured.incomplete_details.reason == "max_output_tokens", structured

# Streaming: typed events in order, deltas that add up to the final text.
events, deltas, final = [], "", None
for event in client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=16, temperature=0, stream=True):
    events.append(event.type)
    if event.type == "response.output_text.delta":
        deltas += event.delta
    if event.type in ("response.completed", "response.incomplete"):
        final = event.response
assert events[:2] == ["response.created", "response.in_progress"], events
assert "response.output_text.delta" in events and events[-1] in ("response.completed", "response.incomplete"), events
assert final is not None and final.output_text == deltas, (final, deltas)
greedy = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=16, temperature=0)
assert greedy.output_text == deltas, "streamed and not streamed agree"

for params in [{"previous_response_id": "resp_1"}, {"background": True}]:
    try:
        client.responses.create(model=MODEL, input="x", max_output_tokens=4, **params)
        raise SystemExit(f"must be refused: {params}")
    except openai.BadRequestError as e:
        assert e.code == "unsupported_parameter" and e.param == next(iter(params)), e.body

print(json.dumps({"text": plain.output_text, "json": value, "events": len(events)}))
