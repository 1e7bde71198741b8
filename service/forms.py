"""The shape of a request, checked before a handler runs, refused in the API's error shape.

Every router here uses `StrictFormRoute`. A route:

- refuses query parameters it does not declare (422 `unknown_parameter`) and, for a form
  route, form fields it does not declare (422 `unknown_field`), once the key is checked;
  it documents that 422 itself;
- that takes an upload (a multipart form) refuses any other Content-Type before reading the
  body (415 `unsupported_media_type`, as `POST /v1/ingest` does);
- parses multipart bodies with `StrictMultiPartParser`, which refuses a body that is not
  multipart at all (400 `malformed_multipart`), a text field over the part limit (413
  `field_too_large`; Starlette's limit, 1 MiB unless a route asks otherwise), more parts than
  the limit (413 `too_many_parts`), and a text field whose bytes are not valid in the charset
  the request declares (422 `invalid_request`, naming the field). Starlette decodes such a
  field as Latin-1, so the bytes `ff fe c3 28` sent as a track id would be stored as "ÿþÃ(",
  and no later check could tell such a string from real Latin-1.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from contextlib import aclosing
from typing import Any

from fastapi import Depends, params
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response

from refrain.service.http_errors import ApiError
from refrain.service.schemas import ErrorBody

MULTIPART = "multipart/form-data"


class FormRefused(MultiPartException):
    """A multipart body refused with this status and code."""

    status = 400
    code = "malformed_multipart"


class NotTextError(FormRefused):
    """A form field whose bytes are not valid in the request's charset."""

    status = 422
    code = "invalid_request"


class FieldTooLarge(FormRefused):
    """A form field that is not a file, over the part limit."""

    status = 413
    code = "field_too_large"


class TooManyParts(FormRefused):
    status = 413
    code = "too_many_parts"


def _quoted(name: str) -> str:
    return repr(name[:64] + ("..." if len(name) > 64 else ""))


class StrictMultiPartParser(MultiPartParser):
    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + end - start > self.max_part_size:
            raise FieldTooLarge(
                f"form field {_quoted(part.field_name)} is over {self.max_part_size // 1024} KiB "
                "(only file uploads may be larger)"
            )
        super().on_part_data(data, start, end)

    def on_headers_finished(self) -> None:
        try:
            super().on_headers_finished()
        except MultiPartException:
            if self._current_files > self.max_files:
                raise TooManyParts(f"more than {self.max_files} files in one request") from None
            if self._current_fields > self.max_fields:
                raise TooManyParts(f"more than {self.max_fields} form fields") from None
            raise

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except UnicodeDecodeError as e:
                raise NotTextError(
                    f"form field {_quoted(part.field_name)} is not valid {self._charset} text "
                    f"(byte {e.start}: {bytes(part.data[e.start : e.start + 1])!r})"
                ) from None
        super().on_part_end()


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class StrictFormRequest(Request):
    async def _get_form(
        self,
        *,
        max_files: int | float = 1000,
        max_fields: int | float = 1000,
        max_part_size: int = 1024 * 1024,
    ) -> FormData:
        content_type, _ = parse_options_header(self.headers.get("Content-Type"))
        if self._form is None and content_type == MULTIPART.encode():
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
            except FormRefused as exc:
                raise ApiError(exc.status, exc.code, exc.message) from None
            except MultiPartException as exc:
                raise ApiError(
                    400,
                    "malformed_multipart",
                    f"the {MULTIPART} body cannot be read ({exc.message.rstrip('.')}): "
                    "send parts separated by the boundary its Content-Type declares",
                ) from None
        return await super()._get_form(
            max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
        )


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)


async def known_names_only(request: Request) -> None:
    """422 for a query parameter, or a field of a form route, that the route does not take."""
    route = request.scope.get("route")
    if not isinstance(route, StrictFormRoute):
        return
    unknown = sorted(set(request.query_params) - route.query_names)
    if unknown:
        expected = ", ".join(sorted(route.query_names)) or "none"
        where = "; form fields go in the body" if route.form_names else ""
        raise ApiError(
            422,
            "unknown_parameter",
            f"unknown query parameters {_listed(unknown)} (expected: {expected}{where})",
        )
    if route.form_names:
        unknown = sorted(set((await request.form()).keys()) - route.form_names)
        if unknown:
            expected = ", ".join(sorted(route.form_names))
            raise ApiError(
                422,
                "unknown_field",
                f"unknown form fields {_listed(unknown)} (expected: {expected})",
            )


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - 20} more" if len(names) > 20 else ""
    return ", ".join(_quoted(n) for n in names[:20]) + more


def _as_json(response: dict[str, Any]) -> dict[str, Any]:
    """An error response of a route that answers another media type (`/metrics`) documented
    as what it is: JSON, where FastAPI would list its model under the route's media type."""
    if response.get("model") is not ErrorBody:
        return response
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    return {
        **{k: v for k, v in response.items() if k != "model"},
        "content": {"application/json": {"schema": ref}},
    }


class StrictFormRoute(APIRoute):
    """A route whose requests are checked as the module says: the names it takes (`query_names`,
    `form_names`), whether it takes an upload, and the 422 it documents for the rest."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        dependencies = list(kwargs.get("dependencies") or ())
        if not any(d.dependency is known_names_only for d in dependencies):
            dependencies.append(Depends(known_names_only))
        responses = dict(kwargs.get("responses") or {})
        responses.setdefault(422, {"model": ErrorBody, "description": "an unknown query parameter"})
        response_class = kwargs.get("response_class")
        answers = getattr(getattr(response_class, "value", response_class), "media_type", None)
        if answers not in (None, "application/json"):
            responses = {status: _as_json(r) for status, r in responses.items()}
        super().__init__(
            path, endpoint, **{**kwargs, "dependencies": dependencies, "responses": responses}
        )
        found = list(_dependants(self.dependant))
        self.query_names = frozenset(p.alias for d in found for p in d.query_params)
        info = self.body_field.field_info if self.body_field is not None else None
        form = isinstance(info, params.Form)
        self.form_names = frozenset(p.alias for d in found for p in d.body_params if form)
        self.upload = form and getattr(info, "media_type", None) == MULTIPART

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            if self.upload and media_type(request) != MULTIPART:
                got = media_type(request)[:100] or "no content type"
                raise ApiError(
                    415,
                    "unsupported_media_type",
                    f"expected {MULTIPART} (the upload and its fields), got {got!r}",
                )
            return await handler(StrictFormRequest(request.scope, request.receive))

        return strict
