"""Drives a specd router's OpenAI-compatible API with the unmodified `openai` client library.

Usage: openai_client.py BASE_URL PROMPT. Prints one JSON object with what the Rust test checks.
"""
import json
import sys

import openai

base, prompt = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
out = {}
out["models"] = [m.id for m in client.models.list().data]
model = out["models"][0]

c = client.completions.create(
    model=model, prompt=prompt, max_tokens=24, temperature=0, extra_body={"drafter": "self"}
)
out["completion"] = c.choices[0].text
out["usage_completion_tokens"] = c.usage.completion_tokens
out["completion_stream"] = "".join(
    ch.choices[0].text
    for ch in client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True)
    if ch.choices
)

messages = [{"role": "user", "content": "Name a color."}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
out["chat"] = chat.choices[0].message.content
parts = []
for ch in client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if ch.choices and ch.choices[0].delta.content:
        parts.append(ch.choices[0].delta.content)
out["chat_stream"] = "".join(parts)

try:
    client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=-3)
    out["bad_status"] = 200
except openai.BadRequestError as e:
    out["bad_status"] = e.status_code

# Prometheus metrics on the same port: which of the vLLM-style names are exported.
import urllib.request

metrics = urllib.request.urlopen(base.rsplit("/v1", 1)[0] + "/metrics", timeout=10).read().decode()
names = [
    "specd_requests_total",
    "specd_request_errors_total",
    "specd_time_to_first_token_seconds_bucket",
    "specd_time_per_output_token_seconds_bucket",
    "specd_e2e_request_latency_seconds_bucket",
    "specd_num_requests_running",
    "specd_num_requests_waiting",
    "specd_spec_decode_num_draft_tokens_total",
    "specd_spec_decode_num_accepted_tokens_total",
    "specd_spec_decode_num_accepted_tokens_per_pos_total",
    "specd_router_step_overhead_seconds_bucket",
    "specd_generation_tokens_total",
]
out["metrics_missing"] = [n for n in names if n not in metrics]

print(json.dumps(out))
