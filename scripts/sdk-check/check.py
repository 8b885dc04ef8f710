"""Structured outputs through the official openai SDK against a herd gateway.

Usage: check.py BASE_URL MODEL. Parses 20 answers into a Pydantic model with
client.chat.completions.parse, and validates 100 json_schema answers (generated schemas with nested
objects, arrays, enums, bounded numbers and required fields), streamed and not, with jsonschema.
Exits non-zero, naming every failure, unless all hold.
"""

import json
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
from pydantic import BaseModel, Field

BASE, MODEL = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=300)


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: int = Field(ge=0, le=50)
    coastal: bool
    climate: Literal["hot", "mild", "cold"]


CITIES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Delhi", "Sydney", "Toronto", "Nairobi",
          "Madrid", "Seoul", "Dakar", "Quito", "Hanoi", "Dublin", "Accra", "Perth", "Vienna", "Bogota"]


def parse_one(city):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": f"Describe the city of {city} as JSON."}],
        response_format=City,
        max_tokens=200,
        seed=1,
    )
    parsed = completion.choices[0].message.parsed
    if not isinstance(parsed, City):
        return f"parse {city}: no City parsed from {completion.choices[0].message.content!r}"
    return None


def schema_of(rng, depth=0):
    """A random schema whose answers are bounded: short strings, small arrays, bounded integers."""
    kinds = ["string", "integer", "boolean", "enum", "number"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(3, 16)}
    if kind == "integer":
        low = rng.randint(-100, 100)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)}
    if kind == "number":
        # multipleOf bounds the digits (a plain number lets a model write decimals until max_tokens);
        # 0.25 is exact in binary, so the validator's float arithmetic agrees.
        return {"type": "number", "minimum": 0, "maximum": rng.randint(1, 100), "multipleOf": 0.25}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cyan", "black", "white"], rng.randint(2, 4))}
    if kind == "array":
        return {"type": "array", "items": schema_of(rng, depth + 1), "minItems": rng.randint(0, 1), "maxItems": rng.randint(2, 3)}
    properties = {f"field_{i}": schema_of(rng, depth + 1) for i in range(rng.randint(1, 4))}
    required = sorted(rng.sample(sorted(properties), rng.randint(1, len(properties))))
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def schema_one(i):
    rng = random.Random(i)
    schema = {"type": "object", "properties": {"item": schema_of(rng)}, "required": ["item"], "additionalProperties": False}
    stream = i % 2 == 1
    args = dict(
        model=MODEL,
        messages=[{"role": "user", "content": f"Fill in record number {i} as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": f"record_{i}", "schema": schema, "strict": True}},
        max_tokens=400,
        seed=i,
    )
    if stream:
        text, finish = "", None
        for chunk in client.chat.completions.create(stream=True, **args):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
    else:
        choice = client.chat.completions.create(**args).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    try:
        jsonschema.validate(json.loads(text), schema)
    except Exception as e:  # noqa: BLE001 - every kind of failure is reported the same way
        return f"schema {i} ({'streamed' if stream else 'whole'}, finish {finish}): {e.__class__.__name__}: {str(e)[:200]} in {text[:300]!r}"
    return None


with ThreadPoolExecutor(8) as pool:
    failures = [f for f in pool.map(parse_one, CITIES) if f]
    failures += [f for f in pool.map(schema_one, range(100)) if f]
for failure in failures:
    print(failure)
print(f"{20 + 100 - len(failures)} of 120 structured answers held")
sys.exit(1 if failures else 0)
