"""Request and response bodies of the scoring API."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MAX_ID = 2**63 - 1
EntityId = Annotated[int, Field(ge=0, le=MAX_ID)]


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hour: int | None = Field(None, ge=0, le=23, description="hour of day (UTC); defaults to now")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: EntityId
    candidate_item_ids: list[EntityId] = Field(..., min_length=1, description="scored in this order")
    context: Context = Field(default_factory=Context)


class ScoreResponse(BaseModel):
    scores: list[float] = Field(..., description="click probability per candidate, in request order")
    model_version: str
    user_known: bool = Field(..., description="false: no features stored for the user; scored with empty history")
    unknown_candidates: list[int] = Field(..., description="candidates with no stored item features")
    feature_age_s: dict[str, float | None] = Field(..., description="per user feature view: seconds since its event time")
