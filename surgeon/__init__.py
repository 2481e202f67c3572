"""surgeon: a model-surgery compiler over FX graphs.

    compiled = surgeon.compile(model, example_inputs, spec, example_kwargs={"use_cache": False})
    compiled.module      # an nn.Module running the rewritten graph
    print(compiled.report)
    compiled = surgeon.compile_pretrained("llama/", spec, merge_to="llama-merged/")   # from a checkpoint folder
"""
from .capture import capture
from .compiled import Compiled, compile, load_spec
from .errors import CaptureError, InputError, KernelError, PassError, SpecError, SurgeonError
from .from_folder import compile_pretrained
from .spec import Spec

__all__ = ["compile", "compile_pretrained", "Compiled", "capture", "load_spec", "Spec", "SurgeonError", "SpecError",
           "CaptureError", "PassError", "KernelError", "InputError"]
