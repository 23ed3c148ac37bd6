"""Function calling through the official `openai` client, on chat completions and the Responses
API: a named call round trip (call, tool result, final text), `required` calls, streamed call
deltas assembled into arguments that validate, `tool_choice: none` answering in text, and bad
tool requests refused with 400s naming the parameter that move no money.

Environment: TESSERA_HUB, TESSERA_KEY, TESSERA_AGENT (the key's address, for its balance),
TESSERA_MODEL. Prints one JSON line (a report) last."""

import json
import os
import urllib.request

import openai
from openai import OpenAI

HUB = os.environ["TESSERA_HUB"]
MODEL = os.environ["TESSERA_MODEL"]
client = OpenAI(base_url=HUB + "/v1", api_key=os.environ["TESSERA_KEY"], max_retries=0)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 16}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the current time in a timezone.",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def validate(value, schema):
    """The keywords used above."""
    assert isinstance(value, dict), value
    props = schema["properties"]
    assert set(value) <= set(props), value
    for key in schema.get("required", []):
        assert key in value, (key, value)
    for key, v in value.items():
        p = props[key]
        assert isinstance(v, str), (key, v)
        if "enum" in p:
            assert v in p["enum"], (key, v)
        if "maxLength" in p:
            assert len(v) <= p["maxLength"], (key, v)


def balance():
    with urllib.request.urlopen(f"{HUB}/v1/accounts/{os.environ['TESSERA_AGENT']}") as r:
        return json.load(r)["balance"]


def check_calls(message, names):
    assert message.content is None, message
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_"), call
        assert call.function.name in names, call
        validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return message.tool_calls


report = {}

# A named function: exactly one call of it, its arguments under its schema.
r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=NAMED,
                                   max_tokens=60, temperature=0)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls", choice
(call,) = check_calls(choice.message, {"get_weather"})
report["named"] = json.loads(call.function.arguments)

# The result goes back as a `tool` message; the model answers in text.
result = json.dumps({"temperature": 18, "unit": "celsius", "sky": "sunny"})
follow_up = QUESTION + [choice.message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": result}]
r = client.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS, tool_choice="none",
                                   max_tokens=24, temperature=0)
final = r.choices[0]
assert final.message.tool_calls is None, final
assert final.finish_reason in ("stop", "length") and final.message.content, final
report["final"] = final.message.content

# `required`: one or more calls, each of a listed function.
r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
                                   max_tokens=80, temperature=0)
assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
report["required"] = [c.function.name for c in check_calls(r.choices[0].message, set(SCHEMAS))]

# `none`: text, no calls.
r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none",
                                   max_tokens=12, temperature=0)
assert r.choices[0].message.tool_calls is None and r.choices[0].message.content, r.choices[0]
assert r.choices[0].finish_reason in ("stop", "length")

# `auto`: the model chooses; whichever it chose is well-formed.
r = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, max_tokens=60, temperature=0)
auto = r.choices[0]
if auto.finish_reason == "tool_calls":
    check_calls(auto.message, set(SCHEMAS))
else:
    assert auto.message.tool_calls is None and auto.message.content is not None, auto
report["auto"] = auto.finish_reason

# Streaming: the first delta of a call has its index, id, type, name and empty arguments; then
# fragments; the last chunk says `tool_calls`. Greedy, so the same call as unstreamed.
calls, finish = {}, None
for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice=NAMED,
                                            max_tokens=60, temperature=0, stream=True):
    if not chunk.choices:
        continue
    delta = chunk.choices[0].delta
    for d in delta.tool_calls or []:
        if d.index not in calls:
            assert d.id and d.id.startswith("call_") and d.type == "function", d
            assert d.function.name == "get_weather" and d.function.arguments == "", d
            calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
        else:
            assert d.id is None and d.function.name is None, d
            calls[d.index]["arguments"] += d.function.arguments
    finish = chunk.choices[0].finish_reason or finish
assert finish == "tool_calls", finish
assert list(calls) == [0], calls
streamed = json.loads(calls[0]["arguments"])
validate(streamed, WEATHER)
assert streamed == report["named"], (streamed, report["named"])
report["fragments"] = len(calls[0]["arguments"])

# The Responses API: function tools give `function_call` items; their output goes back as
# `function_call_output`.
rtools = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
           "parameters": t["function"]["parameters"]} for t in TOOLS]
resp = client.responses.create(model=MODEL, input=QUESTION[0]["content"], tools=rtools,
                               tool_choice={"type": "function", "name": "get_weather"},
                               max_output_tokens=60, temperature=0)
items = [i for i in resp.output if i.type == "function_call"]
assert len(items) == 1 and items[0].name == "get_weather", resp.output
validate(json.loads(items[0].arguments), WEATHER)
resp = client.responses.create(model=MODEL, tools=rtools, tool_choice="none", max_output_tokens=16, temperature=0,
                               input=[{"role": "user", "content": QUESTION[0]["content"]},
                                      {"type": "function_call", "call_id": items[0].call_id, "name": items[0].name,
                                       "arguments": items[0].arguments},
                                      {"type": "function_call_output", "call_id": items[0].call_id, "output": result}])
assert resp.output_text, resp
events = [e.type for e in client.responses.create(model=MODEL, input=QUESTION[0]["content"], tools=rtools,
                                                  tool_choice="required", parallel_tool_calls=False,
                                                  max_output_tokens=60, temperature=0, stream=True)]
assert "response.function_call_arguments.done" in events and events[-1] == "response.completed", events
report["responses"] = json.loads(items[0].arguments)

# Bad tool requests: 400s naming the parameter, nothing charged.
before = balance()
too_many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(33)]
bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]
refused = []
for kwargs, param in [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": bad_schema}, "tools"),
    ({"tools": too_many}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
]:
    try:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, **kwargs)
        raise AssertionError(f"accepted: {kwargs}")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.param == param, (param, e.body)
        refused.append(param)
assert balance() == before, "a refused tool request moves no money"
report["refused"] = refused

print(json.dumps(report))
