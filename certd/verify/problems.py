"""The one result type of every check: a list of problems, empty when all holds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    #: Stable short id of the failed check, for scripts: format, role, chain, product,
    #: tcb, chip_id, validity, revocation, size, signature, signing_key, platform.
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.check}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "message": self.message}
