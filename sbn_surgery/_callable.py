"""Modules that are also their main function: ``sbn_surgery.diagnose``, ``sbn_surgery.study`` and
``sbn_surgery.convert`` are the subpackages (the module), whatever the import order, and calling
one calls the function of the same name inside it (``sbn_surgery.diagnose(...)`` is
``sbn_surgery.diagnose.diagnose(...)``)."""

from __future__ import annotations

import sys
import types

__all__ = ["make_callable"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        # looked up at each call, so patching the function patches the call too
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(package: str) -> None:
    """Make the imported package ``package`` callable as its function of the same name."""
    sys.modules[package].__class__ = _CallablePackage
