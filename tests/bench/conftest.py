"""The benchmark tables' rows run on the CPU through Triton's interpreter, as the kernel tests do."""
from tests.kernels.conftest import fresh_plans, triton_interpreter  # noqa: F401 - autouse fixtures
