"""Request and response bodies of the scoring API.

Ids are the ids of the user's own logs (Feast's entity join keys): 64-bit signed integers or
non-empty strings, whichever the model's `entity_types` (model.json) says for users and for
items; `id_type_error` refuses the other kind. Integers and the hour are strict: `true`,
`7.0` or a number as text for an integer are refused rather than coerced.
"""

from __future__ import annotations

from typing import Annotated, Mapping, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from loopfm.contract.names import ID_INT64, ITEM_KEY, USER_KEY

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_CANDIDATES = 1000  # hard cap of the schema; LOOPFM_MAX_CANDIDATES may lower it
IntId = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX, title="int64 id")]


def _utf8(value: str) -> str:
    """JSON's "\\ud800" escape reads as a lone surrogate, which no UTF-8 Redis key can hold."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("not valid UTF-8 text (it holds a lone surrogate)") from None
    return value


TextId = Annotated[StrictStr, Field(min_length=1, title="string id"), AfterValidator(_utf8)]
EntityId = Annotated[
    Union[IntId, TextId],
    Field(description="an id as in your logs: a 64-bit signed integer or a non-empty string, as the model's "
                      "entity_types say (GET /models); the other kind is a 422"),
]  # fmt: skip


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hour: Annotated[StrictInt, Field(ge=0, le=23)] | None = Field(None, description="hour of day (UTC); default: now")


class ScoreRequest(BaseModel):
    # The example is what /docs shows and what schemathesis sends first (tests/test_fuzz.py).
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"user_id": 3, "candidate_item_ids": [801, 802], "context": {"hour": 9}}]}
    )
    user_id: EntityId
    candidate_item_ids: list[EntityId] = Field(
        ..., min_length=1, max_length=MAX_CANDIDATES, description="scored in this order"
    )
    context: Context = Field(default_factory=Context)


class ScoreResponse(BaseModel):
    scores: list[float] = Field(..., description="click probability per candidate, in request order")
    model_version: str
    user_known: bool = Field(..., description="false: no features stored for the user; scored with empty history")
    unknown_candidates: list[int | str] = Field(
        ..., description="candidates the model does not know (no stored features, or outside its vocabulary), as sent"
    )
    feature_age_s: dict[str, float | None] = Field(
        ..., description="per user feature view: seconds since its event time, never negative: 0 while that time is "
        "ahead (the FM history's is its newest code's availability, event time + fm.logging_delay_s, which the live "
        "loop stores before that moment)"
    )
    corrupt_values: int = Field(0, description="stored values that could not be decoded and were read as missing")


def _kind(value: int | str) -> str:
    return f"the integer {value}" if isinstance(value, int) else f"the string {value!r}"


def id_type_error(body: ScoreRequest, entity_types: Mapping[str, str]) -> dict | None:
    """The first of `body`'s ids that does not fit a model whose join keys have `entity_types`
    ({join key: ID_INT64 | ID_STRING}), as a validation error (loc, msg, type, input), or None:
    an int64 entity takes integers only, a string entity strings only (never converted: "7"
    and 7 are different ids in Feast)."""
    fields = ((USER_KEY, "user_id", [body.user_id]), (ITEM_KEY, "candidate_item_ids", body.candidate_item_ids))
    for key, field, values in fields:
        want_int = entity_types[key] == ID_INT64
        if set(map(type, values)) == {int if want_int else str}:  # the usual case, in C: 1,000 ids in ~10 µs
            continue
        for i, value in enumerate(values):
            if isinstance(value, int) != want_int:
                loc = ("body", field) if field == "user_id" else ("body", field, i)
                kind = "64-bit integers" if want_int else "strings"
                msg = f"{'.'.join(map(str, loc[1:]))}: this model's {key} values are {kind} (model.json entity_types), got {_kind(value)}"
                return {"loc": loc, "msg": msg, "type": "id_type", "input": value}
    return None
