"""Request and response bodies of the scoring API. Ids and the hour are strict integers:
`true`, `"7"` or `7.0` are refused rather than coerced."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

MAX_ID = 2**63 - 1
MAX_CANDIDATES = 1000  # hard cap of the schema; LOOPFM_MAX_CANDIDATES may lower it
EntityId = Annotated[StrictInt, Field(ge=0, le=MAX_ID)]


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hour: Annotated[StrictInt, Field(ge=0, le=23)] | None = Field(None, description="hour of day (UTC); default: now")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: EntityId
    candidate_item_ids: list[EntityId] = Field(
        ..., min_length=1, max_length=MAX_CANDIDATES, description="scored in this order"
    )
    context: Context = Field(default_factory=Context)


class ScoreResponse(BaseModel):
    scores: list[float] = Field(..., description="click probability per candidate, in request order")
    model_version: str
    user_known: bool = Field(..., description="false: no features stored for the user; scored with empty history")
    unknown_candidates: list[int] = Field(
        ..., description="candidates the model does not know (no stored features, or outside its vocabulary)"
    )
    feature_age_s: dict[str, float | None] = Field(..., description="per user feature view: seconds since its event time")
    corrupt_values: int = Field(0, description="stored values that could not be decoded and were read as missing")
