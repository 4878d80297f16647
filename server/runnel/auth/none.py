"""Built-in plugin: the ``none`` authentication kind (the default)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from . import ANONYMOUS


class NoAuth:
    """``kind = "none"``: every caller is anonymous."""

    @hookimpl(trylast=True)
    def runnel_authenticate(self, request, route):
        return ANONYMOUS


def make_no_auth(table, config) -> NoAuth:
    table.finish()
    return NoAuth()


@hookimpl
def runnel_register_auth_kinds(register):
    register("none", make_no_auth)
