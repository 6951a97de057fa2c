"""A vendor plugin whose impl hook raises after its backend hook succeeded."""

from llmkit.hookspecs import Backend, hookimpl

LLMKIT_PLUGIN_API = 1


class HookyBackend(Backend):
    name = "hooky"
    device_type = "cpu"


@hookimpl
def llmkit_backends():
    return [HookyBackend()]


@hookimpl
def llmkit_impls():
    raise RuntimeError("kernel table not initialised")
