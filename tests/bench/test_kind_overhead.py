"""benchmarks/bench_kind_overhead.py on a tiny model: its table has a row per kind asked for (a linear-site kind
on the KV-cache path, a virtual-token kind on the recompute path), every ratio a finite positive number, a
failure row, and the kinds it leaves out listed with a reason (no timing is asserted)."""
import importlib.util
import math
from pathlib import Path

from surgeon.adapters import kinds
from surgeon.bench import kind_setups

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kind_overhead.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_kind_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(text: str) -> dict[str, list[str]]:
    """kind -> its cells after the kind (sites, decode, prefill, params, options), header and rule left out."""
    lines = [line for line in text.splitlines() if line.startswith("| ")][2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def ratio(cell: str) -> float:
    assert cell.endswith("x") or " (" in cell, cell
    return float(cell.split("x")[0])


def test_the_table_has_a_finite_positive_ratio_per_kind_a_failure_row_and_the_skips(tmp_path, monkeypatch):
    bench = load()
    monkeypatch.delitem(kind_setups.FITS, "c3a")     # its default block_size 256 then cannot fit hidden 64
    monkeypatch.delitem(kind_setups.SETUPS, "prefix")   # without its sites it is skipped, with the reason
    out = tmp_path / "table.md"
    assert bench.main(["--layers", "2", "--hidden", "64", "--kinds", "lora", "ia3", "c3a", "prefix", "prompt_tuning",
                       "--rounds", "1", "--prompt", "16", "--threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    table = rows(text)
    assert list(table) == [bench.BASE, bench.NONE, "lora", "ia3", "c3a", "prompt_tuning"]
    for kind in (bench.BASE, bench.NONE, "lora", "ia3", "prompt_tuning"):
        for cell in table[kind][1:3]:
            value = ratio(cell)
            assert math.isfinite(value) and value > 0, (kind, cell)
    projections = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 192), (64, 192), (192, 64)]   # q k v o gate up down
    assert int(table["lora"][3].replace(",", "")) == 2 * sum(16 * (fan_in + fan_out) for fan_in, fan_out in projections)
    assert table["lora"][:1] + table["lora"][4:] == ["7 projections", "rank=16"] and table["ia3"][4] == ""
    assert not table["lora"][1].endswith("(recompute: prompt + 1)")
    assert table["c3a"][1].startswith("failed to compile: ") and "block_size 256" in table["c3a"][1], table["c3a"]
    # 8 virtual tokens of hidden 64 in front of the embeddings: generate recomputes the whole sequence
    assert table["prompt_tuning"][0] == "embed_tokens: 8 virtual tokens" and table["prompt_tuning"][3] == "512"
    assert table["prompt_tuning"][1].endswith("x (recompute: prompt + 1)"), table["prompt_tuning"]
    assert "- prompt_tuning: virtual tokens lengthen the sequence, so generate keeps no KV cache" in text
    assert "- prefix: its site ops (sdpa) do not include aten.linear, and SETUPS has no sites for it" in text
    assert "load average (1, 5, 15 min): " in text


def test_every_kind_gets_a_row_and_one_without_sites_is_skipped_with_a_reason(monkeypatch):
    found = kinds()
    assert set(kind_setups.SETUPS) <= set(found)
    assert {name: kind_setups.skip_reason(kind) for name, kind in found.items() if kind_setups.skip_reason(kind)} == {}
    monkeypatch.delitem(kind_setups.SETUPS, "ln_tuning")
    assert "its site ops (norm) do not include aten.linear" in kind_setups.skip_reason(found["ln_tuning"])


def test_shape_options_fit_every_site_and_the_rank_its_limit():
    found = kinds()
    dims = [(512, 512), (512, 256), (512, 1376), (1376, 512)]
    assert kind_setups.fitted_options(found["c3a"], dims) == {"block_size": 32}      # 256 does not divide 1376
    assert kind_setups.fitted_options(found["road"], dims) == {"group_size": 32}     # 64 does not divide 1376
    assert kind_setups.fitted_options(found["oft"], dims) == {}                      # 32 divides every input
    assert kind_setups.fitted_options(found["lora"], dims) == {"rank": 16}
    assert kind_setups.fitted_options(found["shira"], [(8, 8)]) == {"rank": 4}       # in * out / (in + out)
