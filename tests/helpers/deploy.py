"""deploy/validate.py as a module (it is a script beside the manifests, not part of the package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def load_validate():
    """The deploy/validate.py module, loaded from its file."""
    spec = importlib.util.spec_from_file_location("dspark_deploy_validate", DEPLOY / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
