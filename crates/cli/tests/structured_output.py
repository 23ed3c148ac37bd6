"""Structured output through the official `openai` client: every `json_schema` answer parses and
validates against its schema; `json_object` answers are JSON objects; a schema the hub cannot use is
a 400 naming `response_format`."""

import json
import os
import sys

import openai
from openai import OpenAI

client = OpenAI(base_url=os.environ["TESSERA_HUB"] + "/v1", api_key=os.environ["TESSERA_KEY"], max_retries=0)
count = int(os.environ.get("TESSERA_REQUESTS", "20"))

SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
     "required": ["city", "country"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "boolean"}, "confidence": {"type": "number"}},
     "required": ["answer", "confidence"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}}},
     "required": ["colors"], "additionalProperties": False},
]
PROMPTS = [
    "Name a city and its country as JSON.",
    "Invent a person with a name and an age, as JSON.",
    "Is the sky blue? Answer as JSON with your confidence.",
    "List some primary colors as JSON.",
]


def validate(value, schema, path="$"):
    """A small JSON Schema check for the keywords used above."""
    kind = schema.get("type")
    types = {"object": dict, "string": str, "boolean": bool, "array": list}
    if kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), (path, value)
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (path, value)
    else:
        assert isinstance(value, types[kind]), (path, value)
    if "enum" in schema:
        assert value in schema["enum"], (path, value)
    if kind == "object":
        for key in schema.get("required", []):
            assert key in value, (path, key, value)
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"]), (path, value)
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate(value[key], sub, f"{path}.{key}")
    if kind == "array":
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")


finished = 0
for i in range(count):
    schema = SCHEMAS[i % len(SCHEMAS)]
    reply = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=96,
        temperature=0 if i % 2 == 0 else 0.8,
        seed=i,
        response_format={"type": "json_schema", "json_schema": {"name": f"answer_{i % len(SCHEMAS)}", "strict": True, "schema": schema}},
    )
    text = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "length":
        # Out of budget mid-document: the text is a prefix of a valid one; not counted.
        continue
    validate(json.loads(text), schema)
    finished += 1
assert finished >= count * 3 // 4, f"only {finished} of {count} answers finished within the budget"

obj = client.chat.completions.create(
    model="smollm2-135m", messages=[{"role": "user", "content": "Describe Paris in JSON."}], max_tokens=64,
    temperature=0, response_format={"type": "json_object"},
)
text = obj.choices[0].message.content
if obj.choices[0].finish_reason != "length":
    assert isinstance(json.loads(text), dict), text

for bad in [
    {"type": "json_schema", "json_schema": {"name": "bad", "schema": "not a schema"}},
    {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}}},
]:
    try:
        client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "hi"}], max_tokens=8, response_format=bad)
        raise SystemExit(f"an unusable schema must fail: {bad}")
    except openai.BadRequestError as e:
        assert e.code == "invalid_json_schema" and e.param == "response_format", e.body

print(json.dumps({"requests": count, "finished": finished, "json_object": text}))
