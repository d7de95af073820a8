"""The one exception type users see: what went wrong, where, and what to do about it."""

from __future__ import annotations


class CptKitError(Exception):
    """An error in the user's input or environment, reported without a library traceback.

    `where` names the place (a file:line, a recipe key, a run directory) and `hint`
    says what to do. The CLI prints all three and exits with status 2.
    """

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        text = self.message
        if self.where:
            text = f"{self.where}: {text}"
        if self.hint:
            text = f"{text}\n  -> {self.hint}"
        return text


class RecipeError(CptKitError):
    """A recipe that cannot be loaded or is inconsistent."""


class DataError(CptKitError):
    """Corpus input that cannot be used (bad encoding, too small, missing field...)."""


class TrainingError(CptKitError):
    """Training that cannot go on (NaN loss, out of memory...)."""


class ExportError(CptKitError):
    """A merge, conversion, quantization or Modelfile that failed."""


class VerificationError(CptKitError):
    """The exported model does not behave like the trained one."""


class SafetyGateError(VerificationError):
    """The safety probe's pass rate is below the recipe's threshold (and no override was given)."""
