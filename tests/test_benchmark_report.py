"""benchmarks/compare.py's report: the ratios, the tables and the chart come out of the numbers given.

The engines themselves are not run here (that is minutes of benchmarking, and timings are no tests);
these are the pure functions that turn measured rows into what the README shows.
"""

from __future__ import annotations

import importlib.util
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_compare", ROOT / "benchmarks" / "compare.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _results(compare: ModuleType) -> list:
    sweep = [{"context_tokens": 256, "decode_tok_s": 30.0}, {"context_tokens": 4096, "decode_tok_s": 15.0}]
    return [
        compare.Result("llmchat", prefill_tok_s=400.0, decode_tok_s=30.0, ttft_s=1.2, dtype="packed", contexts=sweep),
        compare.Result("llama-cpp-python", prefill_tok_s=200.0, decode_tok_s=90.0, ttft_s=2.5, dtype="gguf"),
        compare.Result("transformers-fp32", prefill_tok_s=500.0, decode_tok_s=15.0, ttft_s=1.0, dtype="float32"),
        compare.Result("transformers-bf16", prefill_tok_s=80.0, decode_tok_s=16.0, ttft_s=6.0, dtype="bfloat16"),
        compare.Result("llmchat-dequantized", error="exit code 2: boom | bad"),
    ]


def test_ratios_are_taken_against_the_named_engines(compare: ModuleType) -> None:
    rows = {row["engine"]: row for row in compare._rows([_results(compare)])}
    ours = rows["llmchat"]
    assert ours["decode_vs_llama_cpp"] == pytest.approx(30 / 90, abs=1e-3)
    assert ours["prefill_vs_llama_cpp"] == 2.0
    assert ours["decode_vs_transformers_fp32"] == 2.0
    assert ours["prefill_vs_transformers_bf16"] == 5.0
    assert rows["llama-cpp-python"]["decode_vs_llama_cpp"] == 1.0
    assert rows["llmchat-dequantized"]["decode_vs_llama_cpp"] is None  # failed: no numbers, no ratio


def test_markdown_shows_every_engine_and_the_sweep(compare: ModuleType) -> None:
    table = compare._markdown(compare._rows([_results(compare)]))
    lines = table.splitlines()
    assert lines[0].count("|") == 9 and "decode × llama.cpp" in lines[0]
    row = next(line for line in lines if line.startswith("| llmchat (packed)"))
    assert "| 400.0 | 30.0 | 1.200 | 0.33x | 2.00x | 2.00x | 5.00x |" in row
    failed = next(line for line in lines if line.startswith("| llmchat-dequantized"))
    assert "boom \\| bad" in failed  # a pipe in an error message does not break the table
    assert "| decode tok/s at context | 256 | 4096 |" in table
    assert "| llmchat | 30.0 | 15.0 |" in table


def test_chart_is_svg_with_one_line_per_swept_engine(compare: ModuleType) -> None:
    rows = [row for row in compare._rows([_results(compare)]) if row.get("contexts")]
    svg = compare._svg_chart(rows, "title", "subtitle")
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 1
    points = [tuple(map(float, p.split(","))) for p in lines[0].get("points", "").split()]
    assert len(points) == 2 and points[0][0] < points[1][0]  # contexts left to right
    assert points[0][1] < points[1][1]  # 30 tok/s sits higher (smaller y) than 15
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert "llmchat" in texts and "256" in texts and "4096" in texts and "title" in texts


def test_interleaved_rounds_report_medians_and_the_median_of_per_round_ratios(compare: ModuleType) -> None:
    """Over rounds, a measure is the engine's median and a ratio the median of each round's ratio (not the
    ratio of the medians: a round where the machine slowed down slows both sides of its ratio)."""
    rounds = [
        [compare.Result("llmchat", decode_tok_s=d), compare.Result("llama-cpp-python", decode_tok_s=b)]
        for d, b in [(30.0, 90.0), (40.0, 40.0), (20.0, 30.0)]
    ]
    rows = {row["engine"]: row for row in compare._rows(rounds)}
    assert rows["llmchat"]["decode_tok_s"] == 30.0 and rows["llama-cpp-python"]["decode_tok_s"] == 40.0
    assert rows["llmchat"]["decode_vs_llama_cpp"] == round(20 / 30, 3)  # ratios 0.333, 1.0, 0.667
    assert rows["llmchat"]["rounds"] == 3
    rounds[1][1] = compare.Result("llama-cpp-python", error="exit code 1: crashed")
    rows = {row["engine"]: row for row in compare._rows(rounds)}
    assert rows["llama-cpp-python"]["error"] == "exit code 1: crashed"
    assert rows["llmchat"]["decode_vs_llama_cpp"] == round((1 / 3 + 2 / 3) / 2, 3)  # the two rounds it ran in
