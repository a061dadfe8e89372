"""What a bad job spec raises: `SpecError`, naming the field at fault.

Its own small module because both halves of reading a spec raise it: the model builder (one
layer at a time) and the resolved job built on top of it (worker/resolved_job.py). The client
package re-exports it (`chainrule.spec_file.SpecError`) for the spec-file reader.
"""

from __future__ import annotations


class SpecError(ValueError):
    """An invalid job spec: `field_path` names the field ("" for the whole spec or file),
    `message` says what is wrong with it. The service returns it as INVALID_ARGUMENT; the
    `chainrule` command exits 2 with it."""

    def __init__(self, field_path: str, message: str):
        self.field_path = field_path
        self.message = message
        super().__init__(f"{field_path}: {message}" if field_path else message)
