"""The whole-model table: CUDA-graph rows and their failures (the capture is replaced: it needs a GPU)."""
from surgeon.bench import models


def test_bench_adds_cuda_graph_rows_and_reports_a_capture_that_fails():
    def capture(fn):
        if fn() == "lowered":
            raise RuntimeError("operation not permitted when stream is capturing")
        return fn

    fns = {"eager base": lambda: "base", "surgeon lowered": lambda: "lowered", "PEFT merged": lambda: "peft"}
    logged = []
    found = models.with_graphs(fns, capture, logged.append)
    assert list(found) == ["eager base", "surgeon lowered", "PEFT merged", "eager base, CUDA graph"]
    assert logged == ["  surgeon lowered: no CUDA graph (RuntimeError: operation not permitted when stream is "
                      "capturing)"]
