"""``edgefl server train --run-id`` with names that are not one safe folder name.

Before the fix ``.`` and ``..`` passed the check, so the run's app folder and its
``flower-run-id`` file were written into ``state_dir`` itself (``runs/..``), and ``../x``
style names were one step from anywhere else.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from probes.small import BAD_RUN_IDS, probe_run_id_dot

from edgefl.errors import BadInputError
from edgefl.files import check_safe_name


def test_dot_dot_and_other_unsafe_run_ids_are_refused_and_write_nothing(tmp_path: Path) -> None:
    result = probe_run_id_dot(tmp_path)
    detail = str(result["detail"])
    assert "'..': exit 2" in detail, detail
    assert "written outside runs/: nothing; in runs/: nothing" in detail, detail
    assert result["held"] is True, detail


@pytest.mark.parametrize("rid", BAD_RUN_IDS)
def test_unsafe_names_fail_the_shared_check(rid: str) -> None:
    with pytest.raises(BadInputError, match="invalid run id"):
        check_safe_name(rid, "run id")


@pytest.mark.parametrize("rid", ["run-20261206T010203-abc123", "exp.1", "A_b-9"])
def test_ordinary_run_ids_pass(rid: str) -> None:
    assert check_safe_name(rid, "run id") == rid
