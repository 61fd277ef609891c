"""The exit-code table: one source (harness/errors.py), documented once (README), refused as a preemption code."""

from __future__ import annotations

import re

import pytest

from harness.config.run_config import to_typed_config
from harness.errors import NOT_RETRYABLE, RESERVED_EXIT_CODES, ConfigError, ExitCode
from tests.conftest import PROJECT_ROOT, compose


def readme_exit_codes() -> dict[int, str]:
    text = (PROJECT_ROOT / "README.md").read_text()
    table = text[text.index("### Exit codes"):]
    return {int(code): name for code, name in re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|", table, re.MULTILINE)}


def test_the_readme_table_lists_every_exit_code_by_name() -> None:
    assert readme_exit_codes() == {int(code): code.name for code in ExitCode}


def test_the_readme_says_which_codes_not_to_requeue() -> None:
    text = (PROJECT_ROOT / "README.md").read_text()
    for code in ExitCode:
        row = re.search(rf"^\| {int(code)} \| `{code.name}` \|.*\| (.*) \|$", text, re.MULTILINE)
        assert row is not None, code
        assert row.group(1).startswith("no") == (code in NOT_RETRYABLE or code == ExitCode.SUCCESS), row.group(0)


@pytest.mark.parametrize("code", sorted(RESERVED_EXIT_CODES))
def test_a_preemption_code_that_collides_with_the_table_is_refused(code: int) -> None:
    with pytest.raises(ConfigError, match=r"preemption\.exit_code"):
        to_typed_config(compose(f"preemption.exit_code={code}"))


def test_a_free_preemption_code_is_accepted() -> None:
    assert to_typed_config(compose("preemption.exit_code=143")).preemption.exit_code == 143
