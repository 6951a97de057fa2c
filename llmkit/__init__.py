"""llmkit: assemble LLMs from certified blocks that run on pluggable backends.

Core objects: block kinds (versioned contracts with one reference impl), impls (per backend, with
declared capabilities), backends, the plugin-built `Registry`, and `assemble`, which resolves every
block of a model once and returns its dispatch `Plan`.
"""

from .assembly import Block, assemble
from .backend import Backend, Peak, Timing
from .errors import (
    BackendUnavailableError,
    CertificateWarning,
    FallbackWarning,
    LlmkitError,
    LlmkitWarning,
    PluginWarning,
    ResolutionError,
    UnknownNameError,
)
from .impls import ANY, REFERENCE, Impl, Range
from .inspect import inspect
from .kinds import BlockKind, Cost, ParamSpec
from .loading import Checkpoint, CheckpointError, load
from .model import Model, build
from .plan import Plan, PlanEntry
from .registry import Registry, default_registry
from .spec import Spec, SpecError, load_spec, preset_names
from .resolve import Resolution, Selection
from .target import Target, parse_dtype

__all__ = [
    "ANY",
    "REFERENCE",
    "Backend",
    "BackendUnavailableError",
    "Block",
    "BlockKind",
    "CertificateWarning",
    "Checkpoint",
    "CheckpointError",
    "Cost",
    "Model",
    "Spec",
    "SpecError",
    "FallbackWarning",
    "Impl",
    "LlmkitError",
    "LlmkitWarning",
    "ParamSpec",
    "Peak",
    "Plan",
    "PlanEntry",
    "PluginWarning",
    "Range",
    "Registry",
    "Resolution",
    "ResolutionError",
    "Selection",
    "Target",
    "Timing",
    "UnknownNameError",
    "assemble",
    "build",
    "inspect",
    "load",
    "load_spec",
    "preset_names",
    "default_registry",
    "parse_dtype",
]
