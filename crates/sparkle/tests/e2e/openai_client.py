"""The official `openai` Python client against a running Sparkle, unchanged but for base_url.

Usage: openai_client.py BASE_URL API_KEY   (SSL_CERT_FILE names the service's certificate)
Prints one JSON line with what it saw; exits non-zero on any surprise.
"""
import base64
import json
import sys

import openai

base_url, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)

result = client.images.generate(
    prompt="a corgi, style of monet",
    size="64x64",
    n=2,
    response_format="b64_json",
    extra_body={"steps": 2, "seed": 5},
)
pngs = [base64.b64decode(d.b64_json) for d in result.data]
assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs), "not PNGs"

try:
    client.images.generate(prompt="a corgi", size="500x500")
    raise SystemExit("an invalid size was accepted")
except openai.BadRequestError as e:
    bad = {"status": e.status_code, "code": e.code, "param": e.body.get("param")}

try:
    openai.OpenAI(base_url=base_url + "/v1", api_key="spk_nope", max_retries=0).images.generate(prompt="x")
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    auth = {"status": e.status_code, "code": e.code}

print(json.dumps({"images": len(pngs), "bad_request": bad, "auth": auth}))
