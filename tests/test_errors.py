"""Tests for the exception tree and the exit-code table documented in edgefl.errors."""

from __future__ import annotations

import inspect
import re

import pytest

import edgefl.errors as errors_module
from edgefl.errors import BadInputError, EdgeflError, ExitCode

EXPORTED = [
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

# Which family (direct child of EdgeflError) each error belongs to.
FAMILY = {
    "ConfigError": "ConfigError",
    "BadInputError": "BadInputError",
    "UnknownModelError": "BadInputError",
    "UnknownRecipeError": "BadInputError",
    "CalibrationDataError": "BadInputError",
    "ArtifactError": "ArtifactError",
    "ManifestMismatchError": "ArtifactError",
    "VerificationError": "VerificationError",
    "RuntimeUnavailableError": "RuntimeUnavailableError",
    "ServiceUnavailableError": "ServiceUnavailableError",
    "RunFailedError": "RunFailedError",
}


def exported_exceptions() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    for name in errors_module.__all__:
        obj = getattr(errors_module, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            found.append(obj)
    return found


def defined_exceptions() -> list[type[BaseException]]:
    return [
        obj
        for _, obj in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == errors_module.__name__
    ]


def documented_exit_codes() -> dict[str, int]:
    doc = errors_module.__doc__
    assert doc is not None
    rows = re.findall(r"^(\d+)\s+([A-Z][A-Z_]*)\s+\S.*$", doc, flags=re.MULTILINE)
    return {name: int(code) for code, name in rows}


def test_all_is_pinned_and_sorted() -> None:
    assert errors_module.__all__ == EXPORTED
    assert errors_module.__all__ == sorted(errors_module.__all__)
    for name in errors_module.__all__:
        assert hasattr(errors_module, name)


def test_every_exported_exception_derives_from_edgefl_error() -> None:
    exceptions = exported_exceptions()
    assert len(exceptions) == len(EXPORTED) - 1  # everything but ExitCode
    for cls in exceptions:
        assert issubclass(cls, EdgeflError), cls


def test_every_exception_defined_in_the_module_is_exported() -> None:
    assert {cls.__name__ for cls in defined_exceptions()} <= set(errors_module.__all__)


def test_family_table_matches_the_class_tree() -> None:
    names = {cls.__name__ for cls in exported_exceptions()} - {"EdgeflError"}
    assert names == set(FAMILY)
    for name, family in FAMILY.items():
        cls = getattr(errors_module, name)
        root = getattr(errors_module, family)
        assert issubclass(cls, root)
        assert EdgeflError in root.__bases__
        assert cls.exit_code == root.exit_code


def test_exit_codes_are_distinct_per_family() -> None:
    families = {getattr(errors_module, f) for f in FAMILY.values()}
    codes = [cls.exit_code for cls in families]
    assert len(set(codes)) == len(codes)
    # No family claims the codes that mean success, usage, a bug or Ctrl-C.
    reserved = {ExitCode.OK, ExitCode.INTERNAL, ExitCode.USAGE, ExitCode.INTERRUPTED}
    assert not set(codes) & reserved
    assert EdgeflError.exit_code == ExitCode.INTERNAL


@pytest.mark.parametrize(
    ("family", "code"),
    [
        ("ConfigError", ExitCode.CONFIG),
        ("BadInputError", ExitCode.BAD_INPUT),
        ("ArtifactError", ExitCode.ARTIFACT),
        ("VerificationError", ExitCode.VERIFICATION_FAILED),
        ("RuntimeUnavailableError", ExitCode.RUNTIME_UNAVAILABLE),
        ("ServiceUnavailableError", ExitCode.SERVICE_UNAVAILABLE),
        ("RunFailedError", ExitCode.RUN_FAILED),
    ],
)
def test_family_exit_code(family: str, code: ExitCode) -> None:
    assert getattr(errors_module, family).exit_code is code


def test_documented_table_matches_exit_code_enum() -> None:
    documented = documented_exit_codes()
    assert documented == {member.name: member.value for member in ExitCode}


def test_exit_code_values_are_unique() -> None:
    values = [int(member) for member in ExitCode]
    assert len(set(values)) == len(values)
    # An IntEnum alias would hide a duplicate from iteration; __members__ shows it.
    assert len(ExitCode.__members__) == len(values)


@pytest.mark.parametrize("cls", exported_exceptions(), ids=lambda c: c.__name__)
def test_str_includes_the_hint(cls: type[EdgeflError]) -> None:
    err = cls("model file is gone", hint="rebuild it")
    assert err.message == "model file is gone"
    assert err.hint == "rebuild it"
    assert "model file is gone" in str(err)
    assert "rebuild it" in str(err)


def test_str_without_hint_is_the_message() -> None:
    err = BadInputError("just this")
    assert err.hint == ""
    assert str(err) == "just this"


def test_errors_are_caught_by_their_family() -> None:
    with pytest.raises(BadInputError):
        raise errors_module.UnknownRecipeError("nope")
    with pytest.raises(errors_module.ArtifactError):
        raise errors_module.ManifestMismatchError("nope")
