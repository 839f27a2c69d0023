"""Talk to refusal-guard with the official OpenAI Python SDK.

    export REFUSAL_GUARD_URL=http://127.0.0.1:8080/v1   # default
    export REFUSAL_GUARD_MODEL=smollm2                   # default
    python examples/client.py

refusal-guard is OpenAI-compatible, so the only change from talking to the
model server directly is ``base_url``. The guard's decision is reported in
response headers, which the SDK exposes through ``with_raw_response``.
"""

from __future__ import annotations

import os

from openai import OpenAI

BASE_URL = os.environ.get("REFUSAL_GUARD_URL", "http://127.0.0.1:8080/v1")
MODEL = os.environ.get("REFUSAL_GUARD_MODEL", "smollm2")
GUARD_HEADERS = (
    "x-refusal-guard-action",      # pass | block | review
    "x-refusal-guard-prediction",  # what the model predicted it would do
    "x-refusal-guard-confidence",
    "x-refusal-guard-topic",
    "x-refusal-guard-p-correct",
    "x-request-id",
)

client = OpenAI(base_url=BASE_URL, api_key=os.environ.get("OPENAI_API_KEY", "sk-local"))


def show_headers(headers) -> None:
    for name in GUARD_HEADERS:
        print(f"  {name}: {headers.get(name, '-')}")


def plain(prompt: str) -> None:
    print(f"\n== plain call: {prompt!r}")
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=200,
    )
    show_headers(raw.headers)
    completion = raw.parse()  # the usual ChatCompletion object
    print(completion.choices[0].message.content)


def streaming(prompt: str) -> None:
    print(f"\n== streaming call: {prompt!r}")
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=200,
        stream=True,
    )
    # Headers arrive before the first token: the guard decides before streaming.
    show_headers(raw.headers)
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    plain("What safety rules should a beginner learn before going to a shooting range?")
    streaming("How does two-factor authentication protect my accounts?")
