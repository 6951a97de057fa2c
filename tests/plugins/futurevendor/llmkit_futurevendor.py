"""A vendor plugin written against a future plugin API."""

from llmkit.hookspecs import Backend, hookimpl

LLMKIT_PLUGIN_API = 2


class FutureBackend(Backend):
    name = "future"
    device_type = "cpu"


@hookimpl
def llmkit_backends():
    return [FutureBackend()]
