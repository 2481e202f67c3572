"""surgeon: a model-surgery compiler over FX graphs.

    compiled = surgeon.compile(model, example_inputs, spec, example_kwargs={"use_cache": False})
    compiled.module      # an nn.Module running the rewritten graph
    print(compiled.report)
"""
from .capture import capture
from .compiled import Compiled, compile, load_spec
from .errors import CaptureError, InputError, KernelError, PassError, SpecError, SurgeonError
from .spec import Spec

__all__ = ["compile", "Compiled", "capture", "load_spec", "Spec", "SurgeonError", "SpecError",
           "CaptureError", "PassError", "KernelError", "InputError"]
