"""The base of every config section (kept apart so `data.config` can use it without a cycle)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are errors (with a suggestion), never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
