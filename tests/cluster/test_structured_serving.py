"""Structured outputs and tool calls through the OpenAI SDK, against a real server with the
built-in model: the grammar, not the small model, makes the answers valid."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import openai
import pytest
from conftest import small_config

from fleetlm.cluster.app import build_app
from fleetlm.cluster.config import load_config

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
APP = "structured"
MODEL = "smollm2-135m-instruct"
MAX_MODEL_LEN = 512
TIMEOUT_S = 300.0
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
        "hobbies": {"type": "array", "items": {"enum": ["chess", "tennis", "music", "baking"]},
                    "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 20},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "is_member": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "hobbies", "address", "is_member"],
    "additionalProperties": False,
}
TOPICS = ["a pirate", "a chef", "a child", "an astronaut", "a farmer", "a poet", "a doctor",
          "a robot", "a cat lover", "a student", "a king", "a painter", "a runner", "a baker",
          "a teacher", "a sailor", "a nurse", "a wizard", "a banker", "a gardener"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What will the weather be in Paris this week?"}]


@pytest.fixture(scope="module")
def base_url(http_port):
    from ray import serve

    config = small_config(load_config(CONFIGS / "default.yaml"),
                          engine={"kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 32},
                          model={"max_model_len": MAX_MODEL_LEN})
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield f"http://127.0.0.1:{http_port}/{APP}/v1"
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", timeout=TIMEOUT_S)


def _gather(base_url: str, calls):
    async def run():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused",
                                      timeout=TIMEOUT_S) as client:
            return await asyncio.gather(*(call(client) for call in calls))
    return asyncio.run(run())


def test_json_schema_answers_validate_for_20_prompts_at_temperature_1(base_url):
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def ask(topic):
        return lambda client: client.chat.completions.create(
            model=MODEL, temperature=1.0, max_tokens=200, response_format=response_format,
            messages=[{"role": "user", "content": f"Describe {topic} as a JSON record."}])

    for response in _gather(base_url, [ask(topic) for topic in TOPICS]):
        [choice] = response.choices
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_choice_regex_and_n(client):
    # Free JSON may run past max_tokens (nothing bounds its strings): a greedy, short one.
    greedy = client.chat.completions.create(
        model=MODEL, max_tokens=100, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Return a JSON object with keys name and age "
                                              "for Bob, 30."}])
    assert json.loads(greedy.choices[0].message.content) == {"name": "Bob", "age": 30}
    dog = {"type": "object", "properties": {
        "breed": {"enum": ["poodle", "collie", "pug"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 20}},
        "required": ["breed", "age"], "additionalProperties": False}
    several = client.chat.completions.create(
        model=MODEL, max_tokens=40, temperature=1.0, n=3, seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": "dog", "schema": dog}},
        messages=[{"role": "user", "content": "Describe a dog as JSON."}])
    assert len(several.choices) == 3
    for choice in several.choices:
        jsonschema.validate(json.loads(choice.message.content), dog)
    choice = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5,
                                       extra_body={"guided_choice": ["blue", "green"]})
    assert choice.choices[0].text in ("blue", "green")
    regex = client.chat.completions.create(
        model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "A date?"}],
        extra_body={"structured_outputs": {"regex": "20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert len(regex.choices[0].message.content) == 10


def test_required_tool_choice_returns_a_valid_call(client):
    response = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice="required",
        parallel_tool_calls=False, temperature=1.0, max_tokens=120, seed=3)
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_streamed_tool_call_deltas_reassemble_into_the_same_call(client):
    ask = {"model": MODEL, "messages": ASK_WEATHER, "tools": [WEATHER, TIME], "seed": 11,
           "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
           "temperature": 1.0, "max_tokens": 120}
    whole = client.chat.completions.create(**ask).choices[0]
    [call] = whole.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    name, arguments, finish, num_argument_deltas = None, "", None, 0
    for chunk in client.chat.completions.create(**ask, stream=True):
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or []:
            assert part.index == 0
            name = part.function.name or name
            arguments += part.function.arguments or ""
            num_argument_deltas += bool(part.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert (name, arguments, finish) == (call.function.name, call.function.arguments,
                                         "tool_calls")
    assert num_argument_deltas > 1  # the arguments arrive as they are written


def test_free_greedy_answers_are_unchanged_by_constrained_neighbours(base_url, client):
    prompts = [f"Tell me about {topic}." for topic in TOPICS[:4]]

    def free(prompt):
        return lambda c: c.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=24,
            messages=[{"role": "user", "content": prompt}])

    def constrained(prompt):  # one call of at most ~80 tokens (city: 30 characters at most)
        return lambda c: c.chat.completions.create(
            model=MODEL, temperature=1.0, seed=5, max_tokens=120, tools=[WEATHER],
            tool_choice="required", parallel_tool_calls=False,
            messages=[{"role": "user", "content": prompt}])

    alone = [r.choices[0].message.content for r in _gather(base_url, [free(p) for p in prompts])]
    mixed = _gather(base_url, [f(p) for p in prompts for f in (free, constrained)])
    assert [r.choices[0].message.content for r in mixed[0::2]] == alone
    assert all(len(r.choices[0].message.tool_calls) == 1 for r in mixed[1::2])


@pytest.mark.parametrize(("body", "message"), [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "invalid JSON schema"),
    ({"extra_body": {"guided_regex": "[0-9"}}, "invalid regex"),
    ({"extra_body": {"frobnicate": 1}}, "Unrecognized request argument supplied: frobnicate"),
    ({"logit_bias": {"1": 5}}, "logit_bias is not supported"),
    ({"max_tokens": 600}, "This model's maximum context length is 512 tokens"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
])
def test_bad_requests_are_400s_naming_the_problem(client, body, message):
    with pytest.raises(openai.BadRequestError, match=message.replace(".", r"\.")) as raised:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, **body)
    assert raised.value.status_code == 400
    assert raised.value.body["message"].startswith(message.split(":")[0][:20])
