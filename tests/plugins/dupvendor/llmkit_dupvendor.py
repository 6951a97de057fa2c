"""A vendor plugin that registers an impl name the testvendor plugin owns."""

from llmkit.hookspecs import Backend, Impl, hookimpl

LLMKIT_PLUGIN_API = 1


class DupBackend(Backend):
    name = "dupvendor"
    device_type = "cpu"


def rmsnorm(block, x):
    raise AssertionError("a broken plugin's impl must never run")


@hookimpl
def llmkit_backends():
    return [DupBackend()]


@hookimpl
def llmkit_impls():
    return [
        Impl(kind="norm@1", backend="testvendor", name="rmsnorm", forward=rmsnorm,
             device_types={"cpu"}, dtypes={"float32"}, features={"rmsnorm", "cast_before_weight"},
             priority=100),
    ]
