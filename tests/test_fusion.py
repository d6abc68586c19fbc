"""The traffic model of bnlib.lab.fusion and its reader of generated C++ (no timings, no compiler needed)."""

import pytest
import torch

from bnlib.lab import fusion

# A kernel in the form Inductor's CPU backend writes: a statistics reduction over every element, a loop over
# the channels only, and an elementwise pass that writes a float output and a bool mask (scalar and vector code).
KERNEL = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const float* in_ptr0,
                       const float* in_ptr1,
                       float* out_ptr0,
                       float* out_ptr1,
                       bool* out_ptr2)
{
    {
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(4L); x0+=static_cast<int64_t>(1L))
        {
            for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(6L); x1+=static_cast<int64_t>(1L))
            {
                auto tmp0 = in_ptr0[static_cast<int64_t>(x1 + 6L*x0)];
                out_ptr0[static_cast<int64_t>(x0)] = tmp0;
            }
        }
    }
    {
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(4L); x0+=static_cast<int64_t>(1L))
        {
            auto tmp0 = in_ptr1[static_cast<int64_t>(x0)];
            out_ptr0[static_cast<int64_t>(x0)] = tmp0;
        }
    }
    {
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(4L); x0+=static_cast<int64_t>(1L))
        {
            for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(6L); x1+=static_cast<int64_t>(8L))
            {
                auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr0 + static_cast<int64_t>(x1 + 6L*x0));
                auto tmp1 = in_ptr1[static_cast<int64_t>(x0)];
                tmp0.store(out_ptr1 + static_cast<int64_t>(x1 + 6L*x0));
                tmp0.store(out_ptr2 + static_cast<int64_t>(x1 + 6L*x0), static_cast<int64_t>(8));
            }
            for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(6L); x1+=static_cast<int64_t>(1L))
            {
                out_ptr1[static_cast<int64_t>(x1 + 6L*x0)] = in_ptr0[static_cast<int64_t>(x1 + 6L*x0)];
            }
        }
    }
    {
        {
            out_ptr0[static_cast<int64_t>(0L)] = 1;
        }
    }
}
"""


def test_kernel_passes_reads_the_loop_nests_and_their_full_size_traffic():
    nests = fusion.kernel_passes(KERNEL)
    assert [n.elements for n in nests] == [24, 4, 24]  # the block with no loop is left out
    stats, per_channel, out = nests
    assert stats.reads == {"in_ptr0": 4} and stats.writes == {}  # out_ptr0[x0] is indexed by one variable
    assert per_channel.reads == {"in_ptr1": 4} and per_channel.writes == {"out_ptr0": 4}
    assert out.reads == {"in_ptr0": 4} and out.writes == {"out_ptr1": 4, "out_ptr2": 1}
    assert out.bytes_per_element() == 9


def test_cpp_kernels_finds_the_sources_in_a_generated_module():
    module = "x = async_compile.cpp_pybinding(['const float*'], r'''" + KERNEL + "''')\ny = 1\n"
    (source,) = fusion.cpp_kernels(module)
    assert fusion.kernel_passes(source)[2].writes == {"out_ptr1": 4, "out_ptr2": 1}


def test_kernel_passes_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="kernel"):
        fusion.kernel_passes("int main() { return 0; }")
    with pytest.raises(ValueError, match="size is not known"):
        fusion.kernel_passes('extern "C" void kernel(const mystery* in_ptr0) { }')


def test_traffic_model_counts_bytes_per_element():
    # eager: stats (2 reads of x), normalize (x -> y), ReLU (y -> z); backward: ReLU (g, z -> gy), BN sums (gy, x),
    # BN input gradient (gy, x -> dx)
    assert fusion.traffic("eager", backward=False) == 4 * (1 + 1 + 2 + 2)
    assert fusion.traffic("eager") == 4 * (6 + 3 + 2 + 3)
    # compiled: Welford (x), normalize + ReLU (x -> z, mask); backward: sums (mask, g, x), gradient (+ dx)
    assert fusion.traffic("compiled", backward=False) == 4 + (4 + 4 + 1)
    assert fusion.traffic("compiled") == 13 + (1 + 4 + 4) + (1 + 4 + 4 + 4)
    assert fusion.traffic("compiled, no grad", backward=False) == 4 + 4 + 4
    assert fusion.traffic("eager eval", backward=False) == 16
    assert fusion.traffic("compiled eval", backward=False) == 8
    assert fusion.traffic("folded", backward=False) == 8
    # in bfloat16 every tensor halves but the bool mask
    # in bfloat16 each of the eight float tensors touched halves; the three touches of the bool mask do not
    assert fusion.traffic("compiled") == 4 * 8 + 3
    assert fusion.traffic("compiled", itemsize=2) == 2 * 8 + 3


def test_passes_and_floor():
    assert len(fusion.passes("eager")) == 7 and len(fusion.passes("compiled")) == 4
    assert len(fusion.passes("compiled", backward=False)) == 2
    assert fusion.floor_seconds("compiled eval", 10**6, 8e9, backward=False) == pytest.approx(1e-3)
    with pytest.raises(KeyError, match="unknown variant"):
        fusion.traffic("fused")
    with pytest.raises(ValueError, match="inference only"):
        fusion.traffic("folded", backward=True)
    with pytest.raises(ValueError, match="positive"):
        fusion.floor_seconds("eager", 10, 0.0)


def test_bn_relu_builds_the_pair_and_refuses_other_ranks():
    block, x, g = fusion.bn_relu((8, 3, 4, 4))
    assert isinstance(block[0], torch.nn.BatchNorm2d) and isinstance(block[1], torch.nn.ReLU)
    assert x.shape == g.shape == (8, 3, 4, 4) and x.requires_grad
    dx, dw, db = fusion.training_step(block, x, g, list(block.parameters()))()
    assert dx.shape == x.shape and dw.shape == db.shape == (3,)
    assert not fusion.forward_pass(block, x)().requires_grad
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fusion.bn_relu((8, 3, 4))
