// The decode step's layers of function/engine/decoder.py in C++ (function/engine/native.py builds and
// loads it): one token a row. The matmuls are the same calls as the Python loop's (oneDNN on packed
// weights, PyTorch's int8 and int4 kernels); everything between them is a loop of our own over each
// row: RMSNorm, RoPE with the cache writes, attention over the row's own keys, SiLU times up, the
// residual adds. That replaces ~30 ATen calls a layer (each with its dispatch and allocation) by 5
// loops, and the GIL is released for the step.
//
// Each row is computed alone, in a fixed order whatever the batch: a row's result never depends on
// the other rows, so batched rows decode bitwise as alone wherever the matmuls do (which
// function.engine.calibration measures). Sums run over 16 lanes (element i into lane i % 16), then
// the lanes in a fixed tree: the compiler vectorizes that without reordering anything. Functions
// marked CLONED are compiled for AVX-512, AVX2 and baseline x86-64, picked at load by the CPU.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define CLONED __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#define AVX512_ATTENTION 1
#else
#define CLONED
#define AVX512_ATTENTION 0
#endif

namespace {

using at::Tensor;
constexpr int kLanes = 16;

enum Kind : int64_t { kPacked = 0, kInt8 = 1, kInt4 = 2 };

// One fused projection (function/engine/projections.py): its kind and its tensors.
struct Projection {
  int64_t kind = kPacked;
  Tensor first;   // oneDNN-packed weight, int8 codes, or packed int4 codes
  Tensor second;  // int8 scales, or int4 scales and zeros (unused when packed)
  std::optional<Tensor> bias;
  int64_t group_size = 0;  // int4
  int64_t width = -1;      // int4 of one layer: its output columns (the rest is padding)
};

const c10::OperatorHandle& linear_pointwise() {
  static const c10::OperatorHandle handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  return handle;
}

// PackedProjection / Int8Projection / Int4Projection.forward
Tensor call(const Projection& projection, const Tensor& input) {
  if (projection.kind == kPacked) {
    c10::List<std::optional<at::Scalar>> scalars;
    scalars.push_back(std::nullopt);
    torch::jit::Stack stack{input, projection.first,
                            projection.bias ? c10::IValue(*projection.bias) : c10::IValue(),
                            std::string("none"), scalars, std::string("")};
    linear_pointwise().callBoxed(&stack);
    return stack[0].toTensor();
  }
  Tensor rows = input.reshape({-1, input.size(-1)}).to(at::kBFloat16);
  Tensor output;
  if (projection.kind == kInt8) {
    output = at::_weight_int8pack_mm(rows, projection.first, projection.second);
  } else {
    output = at::_weight_int4pack_mm_for_cpu(rows.contiguous(), projection.first, projection.group_size,
                                             projection.second);
    if (projection.width >= 0) output = output.slice(1, 0, projection.width);
  }
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = output.size(-1);
  output = output.reshape(shape).to(input.scalar_type());
  return projection.bias ? output + *projection.bias : output;
}

// e^x for x <= 88.7 (Cephes' expf: 2^n times a degree-6 polynomial; ~1 ulp), branch-free so that
// loops over it vectorize: n is rounded by adding and subtracting 1.5 * 2^23 (std::floor keeps GCC
// from vectorizing). Below -87.3 it gives ~1e-38, not 0: a weight of nothing, either way.
inline float exp_of(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
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
  return y * scale;
}

// The loops read and write bfloat16 as its bits (uint16_t: the compiler vectorizes no loads of
// c10::BFloat16, a class), converted as c10 converts it: round to nearest even, NaN to 0x7FC0.
template <typename T>
using Bits = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;

template <typename T>
Bits<T>* bits_of(const Tensor& tensor) {
  return reinterpret_cast<Bits<T>*>(tensor.data_ptr<T>());
}

inline float widen(float value) { return value; }
inline float widen(uint16_t value) {
  uint32_t bits = static_cast<uint32_t>(value) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

template <typename S>
inline S narrow(float value);
template <>
inline float narrow<float>(float value) {
  return value;
}
template <>
inline uint16_t narrow<uint16_t>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(value != value ? 0x7FC0u : rounded);
}

// `value` rounded to S's precision, kept in a float (narrow, then widen: in 32 bits, so that the loops
// around it vectorize).
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

// Loops over a row go a chunk at a time through float buffers (kChunk, a multiple of kLanes): a loop
// that mixes 16-bit loads with float arithmetic and int conversions is one GCC does not vectorize.
constexpr int64_t kChunk = 256;

inline float lanes_sum(const float* lanes) {  // the fixed tree over 16 lanes
  float half[8], quarter[4];
  for (int i = 0; i < 8; ++i) half[i] = lanes[i] + lanes[i + 8];
  for (int i = 0; i < 4; ++i) quarter[i] = half[i] + half[i + 4];
  return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

// Σ a[i] b[i], element i into lane i % 16 (inlined into its callers' clones).
inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  for (int64_t i = whole; i < n; ++i) lanes[i - whole] += a[i] * b[i];
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
// (cos, sin) times `scale`, and written side by side (out[2i], out[2i+1]), as the prefill writes keys.
template <typename T>
inline void rotate(const T* head, const float* rotation, float scale, float* out, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    float a = widen(head[i]), b = widen(head[i + half]);
    float c = rotation[2 * i] * scale, s = rotation[2 * i + 1] * scale;
    out[2 * i] = a * c - b * s;
    out[2 * i + 1] = a * s + b * c;
  }
}

struct Shape {
  int64_t heads, kv_heads, head_dim, width, intermediate;
  float eps, scale;
};

// softmax over scores[0..end-1] in place (exponentials of score - max); returns their sum.
inline float exponentiate(float* scores, int64_t end) {
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
template <typename T>
CLONED void attend_head(const float* q, const float* keys, const float* values, int64_t end, int64_t head_dim,
                        float* scores, float* sums, T* out) {
  for (int64_t j = 0; j < end; ++j) scores[j] = dot(q, keys + j * head_dim, head_dim);
  float total = exponentiate(scores, end);
  std::fill(sums, sums + head_dim, 0.0f);
  for (int64_t j = 0; j < end; ++j) {
    const float* value = values + j * head_dim;
    float weight = scores[j];
    for (int64_t d = 0; d < head_dim; ++d) sums[d] += weight * value[d];
  }
  for (int64_t d = 0; d < head_dim; ++d) out[d] = narrow<T>(sums[d] / total);
}

#if AVX512_ATTENTION
// The same with AVX-512 for head_dim = 16 * VECTORS: a score's 16 lanes folded to 4, four scores'
// folded together (_mm_hadd_ps), instead of each score's lanes summed one by one (3.6 ms of a 15 ms
// 8-row step on the example model); the weighted values summed in registers.
__attribute__((target("avx512f"))) inline __m128 fold(__m512 lanes) {
  __m256 low = _mm512_castps512_ps256(lanes);
  __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(lanes), 1));
  __m256 eight = _mm256_add_ps(low, high);
  return _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
}

template <int VECTORS>
__attribute__((target("avx512f"))) inline __m128 four_scores(const __m512* q, const float* keys) {
  __m128 folded[4];
  for (int c = 0; c < 4; ++c) {
    __m512 sum = _mm512_mul_ps(q[0], _mm512_loadu_ps(keys + c * 16 * VECTORS));
    for (int v = 1; v < VECTORS; ++v) sum = _mm512_fmadd_ps(q[v], _mm512_loadu_ps(keys + (c * VECTORS + v) * 16), sum);
    folded[c] = fold(sum);
  }
  return _mm_hadd_ps(_mm_hadd_ps(folded[0], folded[1]), _mm_hadd_ps(folded[2], folded[3]));
}

template <typename T, int VECTORS>
__attribute__((target("avx512f"))) void attend_head_avx512(const float* query, const float* keys,
                                                          const float* values, int64_t end, float* scores, T* out) {
  constexpr int64_t width = 16 * VECTORS;
  __m512 q[VECTORS];
  for (int v = 0; v < VECTORS; ++v) q[v] = _mm512_loadu_ps(query + 16 * v);
  int64_t j = 0;
  for (; j + 4 <= end; j += 4) _mm_storeu_ps(scores + j, four_scores<VECTORS>(q, keys + j * width));
  if (j < end) {  // the last 1-3 columns: folded as four, the missing ones reading zeros
    alignas(64) float tail[4 * width] = {};
    std::memcpy(tail, keys + j * width, sizeof(float) * width * (end - j));
    float four[4];
    _mm_storeu_ps(four, four_scores<VECTORS>(q, tail));
    for (int64_t c = j; c < end; ++c) scores[c] = four[c - j];
  }
  float total = exponentiate(scores, end);
  __m512 sums[VECTORS];
  for (int v = 0; v < VECTORS; ++v) sums[v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < end; ++c) {
    __m512 weight = _mm512_set1_ps(scores[c]);
    for (int v = 0; v < VECTORS; ++v) {
      sums[v] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(values + c * width + 16 * v), sums[v]);
    }
  }
  alignas(64) float result[width];
  for (int v = 0; v < VECTORS; ++v) _mm512_store_ps(result + 16 * v, sums[v]);
  for (int64_t d = 0; d < width; ++d) out[d] = narrow<T>(result[d] / total);
}
#endif

// attend_head, with AVX-512 where the CPU has it and head_dim is 64 or 128.
template <typename T>
void attend(const float* q, const float* keys, const float* values, int64_t end, int64_t head_dim, float* scores,
            float* sums, T* out) {
#if AVX512_ATTENTION
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512 && head_dim == 64) return attend_head_avx512<T, 4>(q, keys, values, end, scores, out);
  if (avx512 && head_dim == 128) return attend_head_avx512<T, 8>(q, keys, values, end, scores, out);
#endif
  attend_head(q, keys, values, end, head_dim, scores, sums, out);
}

struct Layers {
  std::vector<Tensor> attention_norm, mlp_norm;  // the norms' weights
  std::vector<Projection> qkv, o, gate_up, down;
  Shape shape;

  // Decoder._project: zero rows added up to `least` rows, calls of at most `measured` rows (0: any).
  Tensor project(const Projection& projection, const Tensor& x, int64_t least, int64_t measured) const {
    int64_t rows = x.size(0);
    if (measured > 0 && rows > measured) {
      std::vector<Tensor> parts;
      for (int64_t at = 0; at < rows; at += measured) {
        parts.push_back(project(projection, x.slice(0, at, at + measured), least, measured));
      }
      return at::cat(parts);
    }
    if (rows >= least) return call(projection, x).contiguous();
    std::vector<int64_t> padding = x.sizes().vec();
    padding[0] = least - rows;
    return call(projection, at::cat({x, x.new_zeros(padding)})).slice(0, 0, rows).contiguous();
  }

  // A projection's output as the loops read it: contiguous, the activations' dtype, `columns` wide.
  static Tensor checked(Tensor output, const Tensor& x, int64_t batch, int64_t columns) {
    TORCH_CHECK(output.is_contiguous() && output.scalar_type() == x.scalar_type() && output.numel() == batch * columns,
                "a projection gave ", output.sizes(), " ", output.scalar_type(), ", not ", batch, " rows of ", columns);
    return output;
  }

  template <typename T>
  Tensor decode_as(Tensor x, const Tensor& rotation, std::vector<Tensor>& keys, std::vector<Tensor>& values,
                   const std::vector<int64_t>& rows, const std::vector<int64_t>& columns,
                   const std::vector<int64_t>& least, int64_t measured) const {
    const Shape& s = shape;
    TORCH_CHECK(attention_norm[0].scalar_type() == x.scalar_type(), "the norms' dtype is the activations'");
    int64_t batch = x.size(0), half = s.head_dim / 2, group = s.heads / s.kv_heads;
    int64_t longest = *std::max_element(columns.begin(), columns.end()) + 1;
    int64_t cache_rows = keys[0].size(0), length = keys[0].size(2);
    for (size_t b = 0; b < rows.size(); ++b) {
      TORCH_CHECK(rows[b] >= 0 && rows[b] < cache_rows && columns[b] >= 0 && columns[b] < length,
                  "row ", rows[b], " column ", columns[b], " is outside the cache");
    }
    Tensor normed = at::empty({batch, 1, s.width}, x.options());
    Tensor gated = at::empty({batch, 1, s.intermediate}, x.options());
    Tensor attended = at::empty({batch, 1, s.heads * s.head_dim}, x.options());
    Tensor queries = at::empty({batch, s.heads, s.head_dim}, x.options().dtype(at::kFloat));
    using S = Bits<T>;
    S* hidden = bits_of<T>(x);
    const float* turns = rotation.data_ptr<float>();
    for (size_t index = 0; index < qkv.size(); ++index) {
      for (int64_t b = 0; b < batch; ++b) {
        rms_norm(hidden + b * s.width, bits_of<T>(attention_norm[index]), bits_of<T>(normed) + b * s.width, s.width,
                 s.eps);
      }
      int64_t stride = (s.heads + 2 * s.kv_heads) * s.head_dim;
      Tensor mixed = checked(project(qkv[index], normed, least[0], measured), x, batch, stride);
      float* key_base = keys[index].data_ptr<float>();
      float* value_base = values[index].data_ptr<float>();
      for (int64_t b = 0; b < batch; ++b) {  // RoPE; the key and value into the row's column
        const S* row = bits_of<T>(mixed) + b * stride;
        const float* turn = turns + b * half * 2;
        for (int64_t h = 0; h < s.heads; ++h) {
          rotate(row + h * s.head_dim, turn, s.scale, queries.data_ptr<float>() + (b * s.heads + h) * s.head_dim,
                 half);
        }
        for (int64_t g = 0; g < s.kv_heads; ++g) {
          int64_t at = ((rows[b] * s.kv_heads + g) * length + columns[b]) * s.head_dim;
          rotate(row + (s.heads + g) * s.head_dim, turn, 1.0f, key_base + at, half);
          const S* value = row + (s.heads + s.kv_heads + g) * s.head_dim;
          for (int64_t d = 0; d < s.head_dim; ++d) value_base[at + d] = widen(value[d]);
        }
      }
      // Each (row, head) alone, in parallel where there is enough of it.
      int64_t grain = std::max<int64_t>(1, 16384 / (longest * s.head_dim));
      const float* query_base = queries.data_ptr<float>();
      S* attended_base = bits_of<T>(attended);
      at::parallel_for(0, batch * s.heads, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(longest), sums(s.head_dim);
        for (int64_t item = begin; item < end; ++item) {
          int64_t b = item / s.heads, h = item % s.heads;
          int64_t at = (rows[b] * s.kv_heads + h / group) * length * s.head_dim;
          attend(query_base + item * s.head_dim, key_base + at, value_base + at, columns[b] + 1, s.head_dim,
                      scores.data(), sums.data(), attended_base + item * s.head_dim);
        }
      });
      Tensor projected = checked(project(o[index], attended, least[1], measured), x, batch, s.width);
      for (int64_t b = 0; b < batch; ++b) {
        add_into(hidden + b * s.width, bits_of<T>(projected) + b * s.width, s.width);
        rms_norm(hidden + b * s.width, bits_of<T>(mlp_norm[index]), bits_of<T>(normed) + b * s.width, s.width, s.eps);
      }
      Tensor both = checked(project(gate_up[index], normed, least[2], measured), x, batch, 2 * s.intermediate);
      for (int64_t b = 0; b < batch; ++b) {
        const S* row = bits_of<T>(both) + b * 2 * s.intermediate;
        silu_times_up(row, row + s.intermediate, bits_of<T>(gated) + b * s.intermediate, s.intermediate);
      }
      Tensor down_out = checked(project(down[index], gated, least[3], measured), x, batch, s.width);
      for (int64_t b = 0; b < batch; ++b) {
        add_into(hidden + b * s.width, bits_of<T>(down_out) + b * s.width, s.width);
      }
    }
    return x;
  }

  // Every layer for one token a row: `x` [batch, 1, width] (embedded); row b's key and value go to
  // cache row rows[b], column columns[b], and it attends to its columns 0..columns[b]; `rotation`
  // [batch, head_dim / 2, 2]: RoPE's (cos, sin) at each row's position. Returns the new hidden states.
  Tensor decode(const Tensor& input, const Tensor& rotation, std::vector<Tensor> keys, std::vector<Tensor> values,
                const std::vector<int64_t>& rows, const std::vector<int64_t>& columns,
                const std::vector<int64_t>& least, int64_t measured) const {
    int64_t batch = input.size(0);
    TORCH_CHECK(keys.size() == qkv.size() && values.size() == qkv.size(), "one cache tensor a layer");
    TORCH_CHECK(static_cast<int64_t>(rows.size()) == batch && static_cast<int64_t>(columns.size()) == batch,
                "a cache row and a column for each row");
    TORCH_CHECK(least.size() == 4, "the fewest rows of qkv, o, gate_up and down");
    TORCH_CHECK(input.dim() == 3 && input.size(1) == 1 && input.size(2) == shape.width, "x: [batch, 1, width]");
    TORCH_CHECK(rotation.scalar_type() == at::kFloat && rotation.is_contiguous() &&
                    rotation.numel() == batch * shape.head_dim, "rotation: [batch, head_dim / 2, 2] float32");
    for (size_t i = 0; i < keys.size(); ++i) {
      TORCH_CHECK(keys[i].scalar_type() == at::kFloat && keys[i].is_contiguous() && values[i].is_contiguous() &&
                      keys[i].sizes() == values[i].sizes() && keys[i].size(1) == shape.kv_heads &&
                      keys[i].size(3) == shape.head_dim, "the cache: [rows, kv_heads, length, head_dim] float32");
    }
    py::gil_scoped_release released;
    Tensor x = input.contiguous().clone();
    if (x.scalar_type() == at::kBFloat16) {
      return decode_as<at::BFloat16>(x, rotation, keys, values, rows, columns, least, measured);
    }
    TORCH_CHECK(x.scalar_type() == at::kFloat, "bfloat16 or float32 activations");
    return decode_as<float>(x, rotation, keys, values, rows, columns, least, measured);
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  py::class_<Projection>(module, "Projection")
      .def(py::init([](int64_t kind, Tensor first, Tensor second, std::optional<Tensor> bias, int64_t group_size,
                       int64_t width) {
             TORCH_CHECK(kind == kPacked || kind == kInt8 || kind == kInt4, "unknown projection kind ", kind);
             return Projection{kind, std::move(first), std::move(second), std::move(bias), group_size, width};
           }),
           py::arg("kind"), py::arg("first"), py::arg("second"), py::arg("bias"), py::arg("group_size"),
           py::arg("width"));
  py::class_<Layers>(module, "Layers")
      .def(py::init([](std::vector<Tensor> attention_norm, std::vector<Tensor> mlp_norm, std::vector<Projection> qkv,
                       std::vector<Projection> o, std::vector<Projection> gate_up, std::vector<Projection> down,
                       int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps) {
             size_t count = qkv.size();
             TORCH_CHECK(count > 0 && attention_norm.size() == count && mlp_norm.size() == count &&
                             o.size() == count && gate_up.size() == count && down.size() == count,
                         "every layer needs its two norms and four projections");
             TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && head_dim % 2 == 0, "head shapes");
             int64_t width = attention_norm[0].numel();
             for (size_t i = 0; i < count; ++i) {
               TORCH_CHECK(attention_norm[i].is_contiguous() && mlp_norm[i].is_contiguous() &&
                               attention_norm[i].numel() == width && mlp_norm[i].numel() == width,
                           "contiguous norm weights of one width");
             }
             Shape shape{heads, kv_heads, head_dim, width, intermediate, static_cast<float>(eps),
                         static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)))};
             return Layers{std::move(attention_norm), std::move(mlp_norm), std::move(qkv), std::move(o),
                           std::move(gate_up), std::move(down), shape};
           }),
           py::arg("attention_norm"), py::arg("mlp_norm"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"),
           py::arg("eps"))
      .def("decode", &Layers::decode, py::arg("x"), py::arg("rotation"), py::arg("keys"), py::arg("values"),
           py::arg("rows"), py::arg("columns"), py::arg("least"), py::arg("measured"));
}
