"""torchtune-blah: learnable pause tokens ("think before you speak") for torchtune.

Kept import-light on purpose: the .pth start-up hook imports this package in
every Python process, so nothing heavy (torch, torchtune) may be imported here.
Import the pieces from their modules: ``torchtune_blah.pause``,
``torchtune_blah.data``.
"""

__version__ = "0.1.0"
