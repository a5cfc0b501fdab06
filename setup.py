"""Build hook: the top-level `templates/` folder ships inside the wheel as `mailbridge/templates/`.

The repository keeps one copy of the templates at the top level (the layout an admin copies from to
override them); an installed mailbridge has no checkout to read them from. Everything else about the
package is declared in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TEMPLATES = Path(__file__).resolve().parent / "templates"


class BuildPyWithTemplates(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout
            return
        target = Path(self.build_lib) / "mailbridge" / "templates"
        shutil.copytree(TEMPLATES, target, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithTemplates})
