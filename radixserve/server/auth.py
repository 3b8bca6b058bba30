"""The API key check that the server and the router share: `Authorization: Bearer <key>`."""

from __future__ import annotations

import hmac

from aiohttp import web

from radixserve.server.openai_api import ApiError


def check_api_key(request: web.BaseRequest, key: str) -> None:
    """Raise a 401 `ApiError` unless `request` carries `Authorization: Bearer <key>`."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates: encode them back, never fail.
    given = token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, key.encode("utf-8", "surrogateescape")):
        message = "Incorrect API key provided" if header else "Missing API key: send 'Authorization: Bearer <key>'"
        raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
