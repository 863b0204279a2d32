"""Response bodies of the API besides `JobView` (which lives with the job logic)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.jobs import JobView


class ErrorBody(BaseModel):
    """Every error: one line that names the field (or the resource) and the problem."""

    detail: str


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: ['body', 'poses', 0, 'keypoints'].")
    msg: str
    type: str


class ValidationErrorBody(ErrorBody):
    """422 from request validation: `detail` in one line, `errors` one entry per problem."""

    errors: list[FieldError]


class JobList(BaseModel):
    data: list[JobView]
    count: int
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null on the last page."
    )


class OutputObject(BaseModel):
    key: str = Field(description="Relative to the job's output prefix: 'shards/000000.tar'.")
    url: str = Field(description="Presigned GET URL (S3) or file:// URL (local storage).")


class OutputList(BaseModel):
    data: list[OutputObject]
    count: int
    expires_in: int = Field(description="Seconds the presigned URLs stay valid.")
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` for the next page; null on the last page."
    )


class ModelView(BaseModel):
    name: str
    version: str
    weights_sha256: str
    resolution: str = Field(description="height x width of the generated images")


class ModelList(BaseModel):
    data: list[ModelView]
    count: int


class Status(BaseModel):
    status: str
    checks: dict[str, Any] = Field(default_factory=dict)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer with."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        model = ValidationErrorBody if code == 422 else ErrorBody
        out[code] = {"model": model, "description": _DESCRIPTIONS.get(code, "Error")}
    return out


_DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing, unknown or revoked API key",
    404: "No such job for this tenant",
    409: "The job's state does not allow this action",
    413: "Request body too large",
    422: "Invalid job spec or parameter (the message names the field)",
    429: "Too many active jobs (or event streams) for this tenant",
    503: "Database or storage unavailable",
}
