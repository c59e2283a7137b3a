"""The public surface: ``__all__`` lists exactly what the package offers, all of it importable."""

from __future__ import annotations

import inspect
import subprocess
import sys

import aiockpt
import aiockpt.errors


def test_every_name_in_all_resolves() -> None:
    for name in aiockpt.__all__:
        assert getattr(aiockpt, name) is not None, name
    assert sorted(aiockpt.__all__) == aiockpt.__all__
    assert sorted(dir(aiockpt)) == sorted(aiockpt.__all__)


def test_the_whole_error_tree_is_public_and_rooted() -> None:
    errors = {
        name
        for name, obj in vars(aiockpt.errors).items()
        if inspect.isclass(obj) and issubclass(obj, aiockpt.AiockptError)
    }
    assert errors == set(aiockpt.errors.__all__)
    assert errors <= set(aiockpt.__all__)
    for name in errors:
        assert name in (aiockpt.errors.__doc__ or ""), f"{name} missing from the drawn tree"


def test_importing_the_package_does_not_import_torch() -> None:
    """Elastic workers import aiockpt first; they should not pay for torch unless they use it."""
    code = "import sys, aiockpt; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        aiockpt.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
