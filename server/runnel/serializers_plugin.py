"""Built-in plugin: the SSE and NDJSON stream framings."""

from .hookspecs import hookimpl
from .serializers import NDJSON, ServerSentEvents


@hookimpl
def runnel_register_serializers(register):
    register(ServerSentEvents())
    register(NDJSON())
