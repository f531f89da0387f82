"""The Flower app that ``flwr run`` packages, found and copied to a scratch folder.

``flwr run <dir>`` is not read-only: Flower 1.41 rewrites a ``pyproject.toml``
that still has ``[tool.flwr.federations]`` (it comments the table out and moves
it to ``$FLWR_HOME``), and it walks the whole directory (a multi-GB ``.venv``)
before filtering. So every run gets a staged copy, and the checkout stays untouched.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

import tomli_w

from fedapp.config import ExperimentConfig
from fedapp.deploy.errors import LaunchError


def project_root() -> Path:
    """The Flower app directory ``flwr run`` packages into a FAB.

    ``$FEDAPP_PROJECT_ROOT`` if set, else the checkout this package is imported from
    (editable install), else the working directory; it must hold a ``pyproject.toml``
    with a ``[tool.flwr.app]`` table.
    """
    checkout = Path(__file__).resolve().parents[2]  # <checkout>/fedapp/deploy/staging.py
    candidates = [os.environ.get("FEDAPP_PROJECT_ROOT", ""), checkout, Path.cwd()]
    for candidate in candidates:
        if not candidate:
            continue
        pyproject = Path(candidate) / "pyproject.toml"
        if pyproject.is_file() and "flwr" in tomllib.loads(pyproject.read_text()).get("tool", {}):
            return Path(candidate).resolve()
    raise LaunchError(
        "cannot find the Flower app (a pyproject.toml with [tool.flwr.app]); "
        "set FEDAPP_PROJECT_ROOT to the project directory"
    )


def stage_app(root: str | Path, dest: str | Path) -> Path:
    """Copy the Flower app's ``pyproject.toml`` and its packages into ``dest/fedapp``.

    Running a staged copy makes the FAB exactly: ``pyproject.toml`` plus the
    ``*.py`` files of the packages named in ``[tool.flwr.app.components]``. In the
    staged ``pyproject.toml`` the federations are removed and
    ``[tool.flwr.app.config]`` is rebuilt from :class:`ExperimentConfig`'s defaults,
    because Flower rejects ``--run-config`` keys that the app config lacks: the
    schema comes from the code, never from a hand-kept copy that may lag behind a
    new config field. The folder is named ``fedapp`` because Flower requires the
    app folder's name to be a valid app name.
    """
    src = Path(root)
    config = tomllib.loads((src / "pyproject.toml").read_text())
    config["tool"]["flwr"].pop("federations", None)
    config["tool"]["flwr"]["app"]["config"] = ExperimentConfig().to_dict()
    components = config["tool"]["flwr"]["app"]["components"]
    packages = sorted({ref.split(":")[0].split(".")[0] for ref in components.values()})
    app_dir = Path(dest) / "fedapp"
    if app_dir.exists():
        shutil.rmtree(app_dir)
    app_dir.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(config))
    for package in packages:
        for path in sorted((src / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                target = app_dir / path.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return app_dir
