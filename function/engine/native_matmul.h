// A bfloat16 matmul of our own for the decode step's few rows (native_step.cpp includes this, once),
// reading the weights where oneDNN packed them (function/engine/projections.py, PackedProjection):
// no copy. On the example model's 120 small projections (2 cores, the weights from memory), oneDNN's
// bf16 matmul took 6.4 / 6.8 / 7.0 ms for 1 / 4 / 8 rows (its per-call set-up counts there), this
// one 4.7 / 4.7 / 4.2 (docs/benchmarks.md). Its blocks split between torch's threads (at::parallel_for:
// the extension is built with OpenMP, native.py).
//
// Each output is the sum of its input pairs in one order (pair 0, 1, 2...: one `vdpbf16ps` a pair and
// 16 columns, into a float32 sum), whatever the number of rows: a row's result never depends on the
// batch, so batched rows decode bitwise as alone by construction. oneDNN's order is another (about
// one output in 10^4 rounds to another bfloat16), so a decoder that uses this kernel uses it for every
// decode step; prompts of more than kOwnRows tokens still go to oneDNN (a prompt is prefilled alone).
//
// The layout read (checked at load by `own_layout` and by comparing results with oneDNN's,
// `Layers::own_matmuls`): blocks of 64 output columns, one after another; in a block, for each pair
// of inputs (k, k+1), the 64 columns' two weights side by side (128 bfloat16). It is what oneDNN's
// reorder gives for bf16 on AVX-512 BF16 without AMX; another layout leaves oneDNN's calls in place.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_loops.h"  // fold

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define OWN_MATMUL 1
#else
#define OWN_MATMUL 0
#endif

namespace {

constexpr int64_t kOwnRows = 8;       // the most rows a call takes (more: calls of this many)
constexpr int64_t kPackedBlock = 64;  // output columns a block of the packed layout
// Prefetch distance in input pairs (256 bytes each) for calls of 2+ rows: 8 rows went 0.93 -> 1.02x
// oneDNN's, 4 rows 1.00 -> 1.08x; one row, memory-bound, is faster without (1.22 -> 1.17x).
constexpr int64_t kAhead = 24;

// A oneDNN tensor's buffer and size: libtorch_cpu's at::native::data_ptr_from_mkldnn and
// nbytes_from_mkldnn (ATen/native/mkldnn/MKLDNNCommon.h, not in the wheel's headers), looked up when
// first needed, so that a torch without them loses our matmul, not the whole C++ step.
struct Mkldnn {
  void* (*data)(const at::Tensor&) = nullptr;
  int64_t (*nbytes)(const at::Tensor&) = nullptr;
};
inline const Mkldnn& mkldnn() {
  static const Mkldnn found = [] {
    void* library = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);  // loaded already, by torch
    void* scope = library != nullptr ? library : RTLD_DEFAULT;
    Mkldnn symbols;
    symbols.data = reinterpret_cast<void* (*)(const at::Tensor&)>(
        dlsym(scope, "_ZN2at6native20data_ptr_from_mkldnnERKNS_6TensorE"));
    symbols.nbytes = reinterpret_cast<int64_t (*)(const at::Tensor&)>(
        dlsym(scope, "_ZN2at6native18nbytes_from_mkldnnERKNS_6TensorE"));
    return symbols;
  }();
  return found;
}

// Whether this CPU runs the kernel (AVX-512 BF16) and this torch lets it read oneDNN's buffers.
inline bool own_matmul_supported() {
#if OWN_MATMUL
  static const bool supported = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && mkldnn().data && mkldnn().nbytes;
  return supported;
#else
  return false;
#endif
}

// Whether `packed` (a oneDNN tensor of bf16 weights [columns, inputs]) has the layout the kernel reads,
// as far as its size tells: inputs a multiple of 32, columns padded to whole blocks.
inline bool own_layout(const at::Tensor& packed) {
  if (!own_matmul_supported() || !packed.is_mkldnn() || packed.scalar_type() != at::kBFloat16 ||
      packed.dim() != 2) {
    return false;
  }
  int64_t columns = packed.size(0), inputs = packed.size(1);
  int64_t blocks = (columns + kPackedBlock - 1) / kPackedBlock;
  return columns > 0 && inputs > 0 && inputs % 32 == 0 && mkldnn().nbytes(packed) == blocks * kPackedBlock * inputs * 2;
}

#if OWN_MATMUL
#define OWN_TARGET __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl")))

// ROWS rows (at most 4: 16 sums in registers) by one block's 64 columns (`columns` of them real).
template <int ROWS>
OWN_TARGET inline void own_block(const uint16_t* x, int64_t inputs, const uint16_t* block, const float* bias,
                                 uint16_t* y, int64_t stride, int64_t columns) {
  __m512 sums[ROWS][4];
  for (int r = 0; r < ROWS; ++r) {
    for (int g = 0; g < 4; ++g) sums[r][g] = _mm512_setzero_ps();
  }
  for (int64_t pair = 0; pair < inputs / 2; ++pair) {
    if (ROWS > 1) {  // a block's lines 24 pairs ahead (into the next block at its end; past the last, a no-op)
      const char* ahead = reinterpret_cast<const char*>(block + (pair + kAhead) * 128);
      for (int line = 0; line < 4; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    }
    __m512bh weights[4];
    for (int g = 0; g < 4; ++g) weights[g] = (__m512bh)_mm512_loadu_si512(block + pair * 128 + g * 32);
    for (int r = 0; r < ROWS; ++r) {
      int32_t both;
      std::memcpy(&both, x + r * inputs + 2 * pair, sizeof both);
      __m512bh input = (__m512bh)_mm512_set1_epi32(both);
      for (int g = 0; g < 4; ++g) sums[r][g] = _mm512_dpbf16_ps(sums[r][g], input, weights[g]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int g = 0; g < 4 && g * 16 < columns; ++g) {
      __m512 sum = sums[r][g];
      __mmask16 real = columns - g * 16 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (columns - g * 16)) - 1);
      if (bias != nullptr) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(real, bias + g * 16));
      _mm256_mask_storeu_epi16(y + r * stride + g * 16, real, (__m256i)_mm512_cvtneps_pbh(sum));
    }
  }
}

OWN_TARGET void own_rows(const uint16_t* x, int64_t rows, int64_t inputs, const uint16_t* block, const float* bias,
                         uint16_t* y, int64_t stride, int64_t columns) {
  for (int64_t first = 0; first < rows; first += 4) {  // 4 rows at a time: the block again from the cache
    const uint16_t* xs = x + first * inputs;
    uint16_t* ys = y + first * stride;
    switch (std::min<int64_t>(4, rows - first)) {
      case 1: own_block<1>(xs, inputs, block, bias, ys, stride, columns); break;
      case 2: own_block<2>(xs, inputs, block, bias, ys, stride, columns); break;
      case 3: own_block<3>(xs, inputs, block, bias, ys, stride, columns); break;
      default: own_block<4>(xs, inputs, block, bias, ys, stride, columns); break;
    }
  }
}
#endif

// `rows` [n, columns] in `input`'s leading shape: [..., columns].
inline at::Tensor shaped_as(const at::Tensor& rows, const at::Tensor& input) {
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = rows.size(1);
  return rows.view(shape);
}

// x [..., inputs] (bf16, at most kOwnRows rows) times the packed weights, plus `bias` (float32, or
// undefined): [..., columns] in bf16. Callers check own_matmul_supported() and own_layout() first.
inline at::Tensor own_matmul(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& bias) {
  at::Tensor x = input.reshape({-1, input.size(-1)}).contiguous();
  int64_t rows = x.size(0), inputs = x.size(1), columns = packed.size(0);
  TORCH_CHECK(rows <= kOwnRows && inputs == packed.size(1) && x.scalar_type() == at::kBFloat16,
              "our matmul takes at most ", kOwnRows, " bf16 rows of the weights' inputs");
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.numel() == columns && bias.scalar_type() == at::kFloat &&
                                  bias.is_contiguous()),
              "a bias: float32, one a column");
  at::Tensor y = at::empty({rows, columns}, x.options());
#if OWN_MATMUL
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* weights = static_cast<const uint16_t*>(mkldnn().data(packed));
  const float* shift = bias.defined() ? bias.data_ptr<float>() : nullptr;
  uint16_t* ys = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  int64_t blocks = (columns + kPackedBlock - 1) / kPackedBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      own_rows(xs, rows, inputs, weights + b * kPackedBlock * inputs, shift ? shift + b * kPackedBlock : nullptr,
               ys + b * kPackedBlock, columns, std::min(kPackedBlock, columns - b * kPackedBlock));
    }
  });
#else
  TORCH_CHECK(false, "our matmul is built for x86-64 with GCC only");
#endif
  return shaped_as(y, input);
}

// Weights as a model holds them, [columns, inputs] row after row (an output layer tied to the
// embeddings, which oneDNN would need a packed copy of: PACK_TIED_OUTPUT): each output is the dot
// product of its weight row with the input row, 32 inputs a `vdpbf16ps` into 16 lanes, then the lanes
// in a fixed tree; four outputs at a time. Rows are independent here too.
inline bool own_plain_layout(const at::Tensor& weight) {
  return weight.scalar_type() == at::kBFloat16 && weight.dim() == 2 && !weight.is_mkldnn() &&
         weight.is_contiguous() && weight.size(0) > 0 && weight.size(1) > 0 && weight.size(1) % 32 == 0;
}

#if OWN_MATMUL
// Outputs first..last-1 of every row; `last - first` a multiple of 4.
OWN_TARGET void own_plain_outputs(const uint16_t* x, int64_t rows, int64_t inputs, const uint16_t* weight,
                                  int64_t first, int64_t last, uint16_t* y, int64_t stride) {
  for (int64_t c = first; c < last; c += 4) {
    const uint16_t* w = weight + c * inputs;
    for (int64_t r = 0; r < rows; ++r) {
      const uint16_t* row = x + r * inputs;
      __m512 sums[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t k = 0; k < inputs; k += 32) {
        __m512bh input = (__m512bh)_mm512_loadu_si512(row + k);
        for (int o = 0; o < 4; ++o) {
          sums[o] = _mm512_dpbf16_ps(sums[o], input, (__m512bh)_mm512_loadu_si512(w + o * inputs + k));
        }
      }
      __m128 four = _mm_hadd_ps(_mm_hadd_ps(fold(sums[0]), fold(sums[1])),  // native_loops.h's, 16 lanes to 4
                                _mm_hadd_ps(fold(sums[2]), fold(sums[3])));
      __m128bh rounded = _mm_cvtneps_pbh(four);
      std::memcpy(y + r * stride + c, &rounded, 4 * sizeof(uint16_t));
    }
  }
}
#endif

// x [..., inputs] (bf16, at most kOwnRows rows) times `weight` [columns, inputs] (own_plain_layout,
// columns a multiple of 4): [..., columns] in bf16.
inline at::Tensor own_plain_matmul(const at::Tensor& input, const at::Tensor& weight) {
  at::Tensor x = input.reshape({-1, input.size(-1)}).contiguous();
  int64_t rows = x.size(0), inputs = x.size(1), columns = weight.size(0);
  TORCH_CHECK(rows <= kOwnRows && inputs == weight.size(1) && x.scalar_type() == at::kBFloat16 && columns % 4 == 0,
              "our matmul takes at most ", kOwnRows, " bf16 rows of the weights' inputs, and columns by 4");
  at::Tensor y = at::empty({rows, columns}, x.options());
#if OWN_MATMUL
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* weights = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  uint16_t* ys = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, columns / 4, 64, [&](int64_t begin, int64_t end) {
    own_plain_outputs(xs, rows, inputs, weights, 4 * begin, 4 * end, ys, columns);
  });
#else
  TORCH_CHECK(false, "our matmul is built for x86-64 with GCC only");
#endif
  return shaped_as(y, input);
}

}  // namespace
