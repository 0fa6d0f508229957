// The loops of the C++ decode step (native_step.cpp includes this, once): each works on one row, in
// a fixed order whatever the batch. Sums run over 16 lanes (element i into lane i % 16), then the
// lanes in a fixed tree: the compiler vectorizes that without reordering anything. Functions marked
// CLONED are compiled for AVX-512, AVX2 and baseline x86-64, picked at load by the CPU.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define CLONED __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#define AVX512_ATTENTION 1
#else
#define CLONED
#define AVX512_ATTENTION 0
#endif

namespace {

constexpr int kLanes = 16;

// e^x (Cephes' expf: 2^n times a degree-6 polynomial, within 2 units of 2^-24), branch-free so that
// loops over it vectorize: n is rounded by adding and subtracting 1.5 * 2^23 (std::floor keeps GCC
// from vectorizing; the build has no -ffast-math to undo it). x is clamped to [-87.3, 88.37]: below,
// ~1e-38 instead of 0 (a weight of nothing, either way); above, where 2^n would overflow, e^88.37.
// NaN gives NaN (the integer part is computed on 0 there: no float-to-int conversion of a NaN).
inline float exp_of(float x) {
  float clamped = x < -87.3f ? -87.3f : x;
  clamped = clamped > 88.37626f ? 88.37626f : clamped;
  clamped = x == x ? clamped : 0.0f;
  float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x == x ? y * scale : x;
}

// The loops read and write bfloat16 as its bits (uint16_t: the compiler vectorizes no loads of
// c10::BFloat16, a class), converted as c10 converts it: round to nearest even, NaN to 0x7FC0.
template <typename T>
using Bits = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;

template <typename T>
Bits<T>* bits_of(const at::Tensor& tensor) {
  return reinterpret_cast<Bits<T>*>(tensor.data_ptr<T>());
}

inline float widen(float value) { return value; }
inline float widen(uint16_t value) {
  uint32_t bits = static_cast<uint32_t>(value) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

// `value` rounded to S's precision, kept in a float (in 32 bits, so that the loops around it
// vectorize): for bfloat16, to nearest even, NaN to the quiet NaN 0x7FC0.
template <typename S>
inline float round_as(float value);
template <>
inline float round_as<float>(float value) {
  return value;
}
template <>
inline float round_as<uint16_t>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits = value != value ? 0x7FC00000u : (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

// `value` as S: a float, or bfloat16's bits (`round_as`'s upper half).
template <typename S>
inline S narrow(float value);
template <>
inline float narrow<float>(float value) {
  return value;
}
template <>
inline uint16_t narrow<uint16_t>(float value) {
  float rounded = round_as<uint16_t>(value);
  uint32_t bits;
  std::memcpy(&bits, &rounded, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

// Loops over a row go a chunk at a time through float buffers (kChunk, a multiple of kLanes): a loop
// that mixes 16-bit loads with float arithmetic and int conversions is one GCC does not vectorize.
constexpr int64_t kChunk = 256;

inline float lanes_sum(const float* lanes) {  // the fixed tree over 16 lanes
  float half[8], quarter[4];
  for (int i = 0; i < 8; ++i) half[i] = lanes[i] + lanes[i + 8];
  for (int i = 0; i < 4; ++i) quarter[i] = half[i] + half[i + 4];
  return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

// Σ a[i] b[i], element i into lane i % 16 (inlined into its callers' clones); b float or bf16 bits.
template <typename C>
inline float dot(const float* a, const C* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * widen(b[i + l]);
  }
  for (int64_t i = whole; i < n; ++i) lanes[i - whole] += a[i] * widen(b[i]);
  return lanes_sum(lanes);
}

// transformers' LlamaRMSNorm: in float32, x / sqrt(mean(x^2) + eps), rounded to T, times the weight.
template <typename T>
CLONED void rms_norm(const T* x, const T* weight, T* out, int64_t width, float eps) {
  float lanes[kLanes] = {}, row[kChunk], scale[kChunk];
  for (int64_t at = 0; at < width; at += kChunk) {
    int64_t n = std::min(kChunk, width - at);
    for (int64_t i = 0; i < n; ++i) row[i] = widen(x[at + i]);
    int64_t whole = n - n % kLanes;
    for (int64_t i = 0; i < whole; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += row[i + l] * row[i + l];
    }
    for (int64_t i = whole; i < n; ++i) lanes[i - whole] += row[i] * row[i];
  }
  float inverse = 1.0f / std::sqrt(lanes_sum(lanes) / static_cast<float>(width) + eps);
  for (int64_t at = 0; at < width; at += kChunk) {
    int64_t n = std::min(kChunk, width - at);
    for (int64_t i = 0; i < n; ++i) {
      row[i] = widen(x[at + i]);
      scale[i] = widen(weight[at + i]);
    }
    for (int64_t i = 0; i < n; ++i) row[i] = scale[i] * round_as<T>(row[i] * inverse);
    for (int64_t i = 0; i < n; ++i) out[at + i] = narrow<T>(row[i]);
  }
}

// silu(gate) * up, each rounded to T as PyTorch's two ops round them.
template <typename T>
CLONED void silu_times_up(const T* gate, const T* up, T* out, int64_t width) {
  float gates[kChunk], ups[kChunk];
  for (int64_t at = 0; at < width; at += kChunk) {
    int64_t n = std::min(kChunk, width - at);
    for (int64_t i = 0; i < n; ++i) {
      gates[i] = widen(gate[at + i]);
      ups[i] = widen(up[at + i]);
    }
    for (int64_t i = 0; i < n; ++i) gates[i] = round_as<T>(gates[i] / (1.0f + exp_of(-gates[i]))) * ups[i];
    for (int64_t i = 0; i < n; ++i) out[at + i] = narrow<T>(gates[i]);
  }
}

template <typename T>
CLONED void add_into(T* x, const T* y, int64_t width) {
  for (int64_t i = 0; i < width; ++i) x[i] = narrow<T>(widen(x[i]) + widen(y[i]));
}

// One head's RoPE (Decoder._attention_inputs): element i pairs with i + half, the pair rotated by
// (cos, sin) times `scale`, and written side by side (out[2i], out[2i+1]), as the prefill writes keys:
// in float32, or rounded to a bf16 cache's bits.
template <typename T, typename C>
inline void rotate(const T* head, const float* rotation, float scale, C* out, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    float a = widen(head[i]), b = widen(head[i + half]);
    float c = rotation[2 * i] * scale, s = rotation[2 * i + 1] * scale;
    out[2 * i] = narrow<C>(a * c - b * s);
    out[2 * i + 1] = narrow<C>(a * s + b * c);
  }
}


// softmax over scores[0..end-1] in place (exponentials of score - max); returns their sum. Always
// inlined: into the AVX-512 attention it vectorizes 16 lanes wide (out of line, compiled for
// baseline x86-64, it took 7 % of an 8-row step on the example model).
__attribute__((always_inline)) inline float exponentiate(float* scores, int64_t end) {
  float top = -INFINITY;
  for (int64_t j = 0; j < end; ++j) top = std::max(top, scores[j]);
  float lanes[kLanes] = {};
  int64_t whole = end - end % kLanes;
  for (int64_t j = 0; j < whole; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      scores[j + l] = exp_of(scores[j + l] - top);
      lanes[l] += scores[j + l];
    }
  }
  for (int64_t j = whole; j < end; ++j) {
    scores[j] = exp_of(scores[j] - top);
    lanes[j - whole] += scores[j];
  }
  return lanes_sum(lanes);
}

// One query head against the row's keys 0..end-1: softmax(q K^T) V, into `out` (T, head_dim wide).
// The cache C: float32, or bf16 bits.
template <typename T, typename C>
CLONED void attend_head(const float* q, const C* keys, const C* values, int64_t end, int64_t head_dim,
                        float* scores, float* sums, T* out) {
  for (int64_t j = 0; j < end; ++j) scores[j] = dot(q, keys + j * head_dim, head_dim);
  float total = exponentiate(scores, end);
  std::fill(sums, sums + head_dim, 0.0f);
  for (int64_t j = 0; j < end; ++j) {
    const C* value = values + j * head_dim;
    float weight = scores[j];
    for (int64_t d = 0; d < head_dim; ++d) sums[d] += weight * widen(value[d]);
  }
  for (int64_t d = 0; d < head_dim; ++d) out[d] = narrow<T>(sums[d] / total);
}

#if AVX512_ATTENTION
// The same with AVX-512 for head_dim = 16 * VECTORS, for G query heads that share the keys (grouped-
// query attention): each key and value is loaded once for the G heads, and each head's arithmetic is
// the same whatever G (the same multiply-adds in the same order). A score's 16 lanes are folded to 4,
// four scores' folded together (_mm_hadd_ps), instead of each score's lanes summed one by one (3.6 ms
// of a 15 ms 8-row step on the example model); the weighted values summed in registers.
__attribute__((target("avx512f"))) inline __m128 fold(__m512 lanes) {
  __m256 low = _mm512_castps512_ps256(lanes);
  __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1));
  __m256 eight = _mm256_add_ps(low, high);
  return _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
}

// 16 cache elements as floats: float32, or bf16 bits shifted into a float's upper half.
__attribute__((target("avx512f"))) inline __m512 load16(const float* at) { return _mm512_loadu_ps(at); }
__attribute__((target("avx512f"))) inline __m512 load16(const uint16_t* at) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// Four columns' scores for each of the G heads, into scores[g * stride + 0..3].
template <int VECTORS, int G, typename C>
__attribute__((target("avx512f"))) inline void four_scores(const __m512 (&q)[G][VECTORS], const C* keys,
                                                           float* scores, int64_t stride) {
  __m128 folded[G][4];
  for (int c = 0; c < 4; ++c) {
    __m512 key[VECTORS];
    for (int v = 0; v < VECTORS; ++v) key[v] = load16(keys + (c * VECTORS + v) * 16);
    for (int g = 0; g < G; ++g) {
      __m512 sum = _mm512_mul_ps(q[g][0], key[0]);
      for (int v = 1; v < VECTORS; ++v) sum = _mm512_fmadd_ps(q[g][v], key[v], sum);
      folded[g][c] = fold(sum);
    }
  }
  for (int g = 0; g < G; ++g) {
    __m128 four = _mm_hadd_ps(_mm_hadd_ps(folded[g][0], folded[g][1]), _mm_hadd_ps(folded[g][2], folded[g][3]));
    _mm_storeu_ps(scores + g * stride, four);
  }
}

// G heads' queries (side by side, 16 * VECTORS each) against keys 0..end-1; `scores`: G * end floats.
template <typename T, int VECTORS, int G, typename C>
__attribute__((target("avx512f"))) void attend_heads_avx512(const float* query, const C* keys, const C* values,
                                                           int64_t end, float* scores, T* out) {
  constexpr int64_t width = 16 * VECTORS;
  __m512 q[G][VECTORS];
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < VECTORS; ++v) q[g][v] = _mm512_loadu_ps(query + g * width + 16 * v);
  }
  int64_t j = 0;
  for (; j + 4 <= end; j += 4) four_scores<VECTORS, G>(q, keys + j * width, scores + j, end);
  if (j < end) {  // the last 1-3 columns: folded as four, the missing ones reading zeros
    alignas(64) C tail[4 * width] = {};
    std::memcpy(tail, keys + j * width, sizeof(C) * width * (end - j));
    float four[G * 4];
    four_scores<VECTORS, G>(q, tail, four, 4);
    for (int g = 0; g < G; ++g) {
      for (int64_t c = j; c < end; ++c) scores[g * end + c] = four[g * 4 + c - j];
    }
  }
  float totals[G];
  for (int g = 0; g < G; ++g) totals[g] = exponentiate(scores + g * end, end);
  __m512 sums[G][VECTORS];
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < VECTORS; ++v) sums[g][v] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < end; ++c) {
    for (int v = 0; v < VECTORS; ++v) {
      __m512 value = load16(values + c * width + 16 * v);
      for (int g = 0; g < G; ++g) {
        sums[g][v] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * end + c]), value, sums[g][v]);
      }
    }
  }
  alignas(64) float result[width];
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < VECTORS; ++v) _mm512_store_ps(result + 16 * v, sums[g][v]);
    for (int64_t d = 0; d < width; ++d) out[g * width + d] = narrow<T>(result[d] / totals[g]);
  }
}

// Up to 16 / VECTORS heads a call (their queries and sums fill the 32 vector registers), G picked at run time.
template <typename T, int VECTORS, typename C>
__attribute__((target("avx512f"))) void attend_avx512(const float* query, const C* keys, const C* values,
                                                     int64_t end, int64_t heads, float* scores, T* out) {
  constexpr int64_t width = 16 * VECTORS, most = 16 / VECTORS;
  for (int64_t h = 0; h < heads; h += most) {
    const float* q = query + h * width;
    switch (std::min(most, heads - h)) {
      case 1: attend_heads_avx512<T, VECTORS, 1, C>(q, keys, values, end, scores, out + h * width); break;
      case 2: attend_heads_avx512<T, VECTORS, 2, C>(q, keys, values, end, scores, out + h * width); break;
      case 3: attend_heads_avx512<T, VECTORS, 3, C>(q, keys, values, end, scores, out + h * width); break;
      default: attend_heads_avx512<T, VECTORS, 4, C>(q, keys, values, end, scores, out + h * width); break;
    }
  }
}
#endif

// `heads` query heads side by side that share one key head, each as attend_head: with AVX-512 where
// the CPU has it and head_dim is 64 or 128. `scores`: room for heads * end floats.
template <typename T, typename C>
void attend(const float* q, const C* keys, const C* values, int64_t end, int64_t head_dim, int64_t heads,
            float* scores, float* sums, T* out) {
#if AVX512_ATTENTION
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512 && head_dim == 64) return attend_avx512<T, 4, C>(q, keys, values, end, heads, scores, out);
  if (avx512 && head_dim == 128) return attend_avx512<T, 8, C>(q, keys, values, end, heads, scores, out);
#endif
  for (int64_t h = 0; h < heads; ++h) {
    attend_head(q + h * head_dim, keys, values, end, head_dim, scores, sums, out + h * head_dim);
  }
}

}  // namespace
