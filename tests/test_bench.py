"""bench.py helpers that need no GPU: the llama.cpp reference lookup and the memory line."""
from __future__ import annotations

import rocmforge_lab as rf
from rocmforge_lab import synth
from rocmforge_lab.bench import _format_memory, llama_cpp_reference


def test_reference_figures_match_the_default_model_only_by_shape_and_quant(smollm2_cpu, tmp_path):
    assert llama_cpp_reference(smollm2_cpu) == ("SmolLM2-135M Q4_1", 48469, 939)
    tiny = rf.load(synth.make_gguf(tmp_path / "t.gguf", arch="llama", shape="tiny", qtype="q4_1", seed=0),
                   device="cpu", progress=False)
    assert llama_cpp_reference(tiny) is None  # no reference for other shapes


def test_memory_line_in_mib():
    line = _format_memory({"weights": {"bytes": 3 * 2**20, "tensors": 4}, "kv_cache": {"dtype": "f16"}})
    assert line == "weights.bytes=3.0 MiB, weights.tensors=4, kv_cache.dtype=f16"
