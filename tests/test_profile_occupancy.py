"""The decode profile's occupancy columns (rocmforge_lab.backend.profile): resident blocks per
multiprocessor from a kernel's registers / static shared memory / threads, and waves per kind.
Reference values: CUDA's occupancy rule worked by hand for an H100 (132 multiprocessors, 64 Ki
registers in 4 partitions, 228 KiB shared memory, 1 KiB reserved per block, 2048 threads, 32
blocks), with the register counts nvcc 13 reports for kernels/fused_decode.hip (sm_90)."""
import math
from types import SimpleNamespace

from rocmforge_lab.backend.profile import format_profile, occupancy, resident_blocks, summarize

H100 = {"warpSize": 32, "maxThreadsPerMultiProcessor": 2048, "maxBlocksPerMultiProcessor": 32,
        "regsPerMultiprocessor": 65536, "sharedMemPerMultiprocessor": 233472, "reservedSharedMemPerBlock": 1024,
        "multiProcessorCount": 132}


def test_resident_blocks_h100():
    # fd_gate_up, 512 threads: 70 registers = 2,304 per warp, 7 warps per partition, 28 per
    # multiprocessor: one 16-warp block (the Qwen2.5-0.5B grid of 152 blocks took two waves)
    assert resident_blocks(70, 19712, 512, H100) == 1
    assert resident_blocks(64, 19712, 512, H100) == 2   # fd_gate_up_b2: 2,048 per warp, 32 warps
    assert resident_blocks(78, 1156, 256, H100) == 3    # fd_matvec: 2,560 per warp, 6 per partition
    assert resident_blocks(56, 42752, 128, H100) == 5   # fd_gate_up_s_q4k: shared memory, 228 KiB / 42.75 KiB
    assert resident_blocks(204, 43268, 128, H100) == 2  # fd_attn hd128: 6,656 per warp, 2 per partition
    assert resident_blocks(16, 0, 64, H100) == 32       # tiny blocks: the 32-block limit
    assert resident_blocks(32, 0, 1024, H100) == 2      # the thread limit
    assert resident_blocks(255, 0, 1024, H100) == 0     # does not fit at all


def test_format_profile_shows_waves():
    rows = [{"kind": "gate_up", "us": 16.0, "weight_bytes": 6_000_000, "blocks_per_sm": 1, "waves": 152 / 132},
            {"kind": "gate_up", "us": 16.2, "weight_bytes": 6_000_000, "blocks_per_sm": 1, "waves": 152 / 132},
            {"kind": "down", "us": 9.0, "weight_bytes": 3_000_000, "blocks_per_sm": 3, "waves": 224 / 396}]
    k = summarize(rows)
    assert k["gate_up"]["count"] == 2 and math.isclose(k["gate_up"]["waves"], 152 / 132)
    assert k["down"]["blocks_per_sm"] == 3
    text = format_profile(rows, "t")
    head, gate_up, down = text.splitlines()[1:4]
    assert head.split()[-2:] == ["blocks/SM", "waves"]
    assert gate_up.split()[-2:] == ["1", "1.15"] and down.split()[-2:] == ["3", "0.57"]
    # rows without occupancy (the step path's per-op profile): no such columns
    plain = format_profile([{"kind": "linear", "us": 3.0, "weight_bytes": 0}], "t")
    assert "waves" not in plain


def test_occupancy_of_a_decoder_step():
    """occupancy(fd, props): per launch of fd.exec.calls (function, grid, block, args), from the
    function's num_regs / shared_size_bytes; a kernel without those attributes gives (0, nan)."""
    def fn(regs, smem):  # as cupy.RawKernel: the attributes on the kernel, not on its .kernel (a Function)
        return SimpleNamespace(num_regs=regs, shared_size_bytes=smem, kernel=object())
    calls = [(fn(70, 19712), (152,), (512,), ()), (fn(64, 19712), (152,), (512,), ()),
             (fn(204, 43268), (16, 4, 4), (128,), ()), (object(), (1,), (32,), ())]
    got = occupancy(SimpleNamespace(exec=SimpleNamespace(calls=calls)), H100)
    assert got[0] == (1, 152 / 132) and got[1] == (2, 152 / 264) and got[2] == (2, 256 / 264)
    assert got[3][0] == 0 and math.isnan(got[3][1])
