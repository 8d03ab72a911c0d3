"""Skip a test module when the C++ extension is missing, unless FASTVAE_REQUIRE_CPP=1 (CI) makes that a failure."""
import os

import pytest

from fastvae import _extension


def require_extension() -> None:
    try:
        _extension.library()
    except RuntimeError as exc:
        if os.environ.get("FASTVAE_REQUIRE_CPP") == "1":
            raise
        pytest.skip(f"the C++ extension is unavailable here: {exc}", allow_module_level=True)
