"""Hooks for scripts/schemathesis.sh: lets schemathesis read `image/png` answers.

A PNG answer has to be a PNG (its signature, then its IHDR chunk); it is then checked against its
documented schema (a string with `contentMediaType: image/png`) as text.
"""

import schemathesis

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@schemathesis.deserializer("image/png")
def png(_ctx, response):
    body = response.content
    if not body.startswith(PNG_SIGNATURE) or body[12:16] != b"IHDR":
        raise ValueError(f"not a PNG: {len(body)} bytes starting {body[:16]!r}")
    return body.decode("latin-1")
