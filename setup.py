"""Ships torchtune_blah.pth into site-packages, for regular and editable installs.

torchtune has no plug-in hook. The .pth line installs a tiny import hook
(components/torchtune_blah/_tune_hook.py, standard library only) that adds our recipes and
configs to torchtune's recipe registry when torchtune imports it, so that
`tune ls`, `tune cp` and `tune run blah_qlora` work from any directory.
tests/test_registry.py checks that the file lands and that the hook works.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "torchtune_blah.pth"
PTH_LINE = "import torchtune_blah._tune_hook\n"


class build_py_with_pth(build_py):
    """Regular wheels: the .pth sits at the wheel root, i.e. in site-packages."""

    def run(self):
        super().run()
        if not self.editable_mode:
            (Path(self.build_lib) / PTH_NAME).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs.append(str(Path(self.build_lib) / PTH_NAME))
        return outputs


class editable_wheel_with_pth(editable_wheel):
    """Editable wheels only carry what setuptools writes into the unpacked wheel
    directory; this is the step where it writes its own namespace .pth files."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        (Path(installation_dir) / PTH_NAME).write_text(PTH_LINE)


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
