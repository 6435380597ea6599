"""mvm: local microVM sandboxes.

Describe a guest in ``mvm.toml``, build it into a kernel + root filesystem, boot it
under QEMU, and work in it. See ``mvmctl --help``.
"""

__version__ = "0.1.0"
