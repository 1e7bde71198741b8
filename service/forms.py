"""Multipart forms whose text fields must be text in the charset they declare (UTF-8 unless the
request's Content-Type says otherwise).

Starlette decodes a field that is not valid in its charset as Latin-1, so the bytes
`ff fe c3 28` sent as a track id would be stored as "ÿþÃ(", and no later check can tell such a
string from real Latin-1. Every router here uses `StrictFormRoute`, whose requests parse
multipart bodies with a parser that refuses such a field instead: 422 `invalid_request`,
naming the field, before any handler runs.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import HTTPException
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response


class NotTextError(MultiPartException):
    """A form field whose bytes are not valid in the request's charset."""


class StrictMultiPartParser(MultiPartParser):
    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except UnicodeDecodeError as e:
                raise NotTextError(
                    f"form field {part.field_name!r} is not valid {self._charset} text "
                    f"(byte {e.start}: {bytes(part.data[e.start : e.start + 1])!r})"
                ) from None
        super().on_part_end()


class StrictFormRequest(Request):
    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is None and content_type == b"multipart/form-data":
            try:
                async with aclosing(self.stream()) as stream:
                    parser = StrictMultiPartParser(
                        self.headers,
                        stream,
                        max_files=max_files,
                        max_fields=max_fields,
                        max_part_size=max_part_size,
                    )
                    self._form = await parser.parse()
            except MultiPartException as exc:
                status = 422 if isinstance(exc, NotTextError) else 400
                raise HTTPException(status_code=status, detail=exc.message) from None
        return await super()._get_form(
            max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
        )


class StrictFormRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictFormRequest(request.scope, request.receive))

        return strict
