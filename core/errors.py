"""The edgefl exception tree and the process exit codes it maps to.

Every error raised on purpose by edgefl derives from :class:`EdgeflError`. Third-party
errors are translated at the boundary (``raise ... from exc``) so callers only ever need
to catch this tree. Each class carries its :class:`ExitCode` (``exit_code``). Library code
never calls ``sys.exit``: the CLI maps an exception to its code in one place,
:func:`edgefl.clikit.exits_on_error`, the decorator every command wears (it prints the
message and hint on stderr and exits with ``exit_code``). An unexpected exception ends
the process with its traceback and status 1 (``INTERNAL``); a bad command line exits 2
(``USAGE``, from click).

Exit codes (stable, documented in the README):

====  ======================  =========================================================
code  name                    meaning
====  ======================  =========================================================
0     OK                      success
1     INTERNAL                a bug: an unexpected exception (please report it)
2     USAGE                   bad command line (unknown option, missing argument)
3     CONFIG                  a configuration file or value failed validation
4     BAD_INPUT               unknown model or recipe, missing or unusable input data
5     ARTIFACT                a model artifact is corrupt, truncated or fails its hash
6     VERIFICATION_FAILED     an artifact disagrees with its reference and was refused
7     RUNTIME_UNAVAILABLE     no device runtime (or not the one asked for) can run
8     SERVICE_UNAVAILABLE     a service the command needs (SuperLink, broker) is
                              unreachable or refused the request
9     RUN_FAILED              a federated run ended without completing
130   INTERRUPTED             stopped by Ctrl-C
====  ======================  =========================================================
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ArtifactError",
    "BadInputError",
    "CalibrationDataError",
    "ConfigError",
    "EdgeflError",
    "ExitCode",
    "ManifestMismatchError",
    "RunFailedError",
    "RuntimeUnavailableError",
    "ServiceUnavailableError",
    "UnknownModelError",
    "UnknownRecipeError",
    "VerificationError",
]


class ExitCode(IntEnum):
    """Process exit codes; see the module docstring for their meaning."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG = 3
    BAD_INPUT = 4
    ARTIFACT = 5
    VERIFICATION_FAILED = 6
    RUNTIME_UNAVAILABLE = 7
    SERVICE_UNAVAILABLE = 8
    RUN_FAILED = 9
    INTERRUPTED = 130


class EdgeflError(Exception):
    """Base of every error edgefl raises on purpose.

    Attributes:
        exit_code: What a process should exit with when this error ends it.
        hint: One sentence telling the user what to do about it, or ``""``.
    """

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(EdgeflError):
    """A configuration file or value is invalid."""

    exit_code = ExitCode.CONFIG


class BadInputError(EdgeflError):
    """Input the user gave cannot be used (names, files, data)."""

    exit_code = ExitCode.BAD_INPUT


class UnknownModelError(BadInputError):
    """No model of that name is in the zoo."""


class UnknownRecipeError(BadInputError):
    """No quantization recipe of that name exists."""


class CalibrationDataError(BadInputError):
    """Static quantization needs calibration data that is missing or unusable."""


class ArtifactError(EdgeflError):
    """A model artifact is corrupt, truncated or unreadable."""

    exit_code = ExitCode.ARTIFACT


class ManifestMismatchError(ArtifactError):
    """An artifact does not match its manifest (hash, size or tensor spec)."""


class VerificationError(EdgeflError):
    """An artifact disagrees with its torch reference on a device runtime."""

    exit_code = ExitCode.VERIFICATION_FAILED


class RuntimeUnavailableError(EdgeflError):
    """The requested device runtime cannot be loaded here."""

    exit_code = ExitCode.RUNTIME_UNAVAILABLE


class ServiceUnavailableError(EdgeflError):
    """A service the command needs (SuperLink, broker) is unreachable or refused it."""

    exit_code = ExitCode.SERVICE_UNAVAILABLE


class RunFailedError(EdgeflError):
    """A federated run ended without completing (failed or stopped by Flower)."""

    exit_code = ExitCode.RUN_FAILED
