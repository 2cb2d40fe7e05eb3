"""The official `openai` Python client against a running Sparkle, unchanged but for base_url.

Usage: openai_client.py BASE_URL API_KEY   (SSL_CERT_FILE names the service's certificate)
Prints one JSON line with what it saw; exits non-zero on any surprise.
"""
import base64
import json
import os
import ssl
import struct
import sys
import urllib.request
import zlib

import openai

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

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
assert all(p.startswith(PNG_SIGNATURE) for p in pngs), "not PNGs"

# A `url` is fetched by whatever the caller likes, with no API key.
result = client.images.generate(
    prompt="a lighthouse",
    size="64x64",
    response_format="url",
    extra_body={"steps": 2, "seed": 6},
)
link = result.data[0].url
trusted = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
with urllib.request.urlopen(link, context=trusted, timeout=60) as answer:
    fetched = {
        "status": answer.status,
        "content_type": answer.headers["Content-Type"],
        "png": answer.read().startswith(PNG_SIGNATURE),
        "same_host": link.startswith(base_url + "/"),
    }

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

models = [m.id for m in client.models.list()]


def rgba_png(width, height, alpha_of):
    """An RGBA PNG: a gradient, with the alpha `alpha_of(x, y)` gives."""
    rows = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in (x * 4 % 256, y * 4 % 256, 128, alpha_of(x, y)))
        for y in range(height)
    )

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# An edit: the transparent left half is repainted.
edited = client.images.edit(
    image=("source.png", rgba_png(96, 64, lambda x, y: 0 if x < 48 else 255), "image/png"),
    prompt="a corgi on the beach",
    size="96x64",
    response_format="b64_json",
    extra_body={"steps": 2, "seed": 8},
)
edit_png = base64.b64decode(edited.data[0].b64_json)
assert edit_png.startswith(PNG_SIGNATURE), "the edit is not a PNG"
edit = {"width": struct.unpack(">I", edit_png[16:20])[0], "height": struct.unpack(">I", edit_png[20:24])[0],
        "job": edited.id if hasattr(edited, "id") else getattr(edited, "model_extra", {}).get("id")}

try:
    client.images.edit(image=("notes.txt", b"not an image", "text/plain"), prompt="x")
    raise SystemExit("a text file was accepted as an image")
except openai.BadRequestError as e:
    bad_edit = {"status": e.status_code, "code": e.code, "param": e.body.get("param")}

print(json.dumps({"images": len(pngs), "url": fetched, "bad_request": bad, "auth": auth,
                  "models": models, "edit": edit, "bad_edit": bad_edit}))
