// The decode step's layers of function/engine/decoder.py in C++ (function/engine/native.py builds and
// loads it): one token a row. The matmuls are our own bf16 one where it reads the weights
// (native_matmul.h), else the Python loop's calls (oneDNN on packed weights, PyTorch's int8 and int4
// kernels); everything between them is a loop of our own over each row: RMSNorm, RoPE with the cache
// writes, attention over the row's own keys, SiLU times up, the residual adds. That replaces ~30 ATen
// calls a layer (each with its dispatch and allocation) by 5 loops, and the GIL is released for the
// step. Rows (and the attention's heads) run in parallel on torch's threads: the extension is built
// with OpenMP (native.py).
//
// Each row is computed alone, in a fixed order whatever the batch and the thread (the loops:
// native_loops.h): a row's result never depends on the other rows, so batched rows decode bitwise as
// alone wherever the matmuls do (ours by construction; others as function.engine.calibration measures).
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

#include "native_loops.h"
#include "native_matmul.h"

namespace {

using at::Tensor;

enum Kind : int64_t { kPacked = 0, kInt8 = 1, kInt4 = 2 };

// One fused projection (function/engine/projections.py): its kind and its tensors.
struct Projection {
  int64_t kind = kPacked;
  Tensor first;   // oneDNN-packed weight, int8 codes, or packed int4 codes
  Tensor second;  // int8 scales, or int4 scales and zeros (unused when packed)
  std::optional<Tensor> bias;
  int64_t group_size = 0;  // int4
  int64_t width = -1;      // int4 of one layer: its output columns (the rest is padding)
  bool own = false;        // packed: decode steps' rows through own_matmul (Layers::own_matmuls)
  Tensor own_bias;         // the bias in float32, for own_matmul
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

// Whether our matmul reads `packed` (oneDNN-packed bf16 weights) as oneDNN does: the layout its size
// tells (own_layout), and its results on random rows oneDNN's but for rounding (a misread layout
// gives others entirely).
bool own_agrees(const Tensor& packed, const std::optional<Tensor>& bias) {
  if (!own_layout(packed)) return false;
  Tensor shift = bias ? bias->to(at::kFloat).contiguous() : Tensor();
  at::Generator generator = at::detail::createCPUGenerator(0);
  Tensor x = at::randn({kOwnRows, packed.size(1)}, generator, at::TensorOptions().dtype(at::kFloat)).to(at::kBFloat16);
  Tensor theirs = call(Projection{kPacked, packed, packed, bias}, x).to(at::kFloat);
  Tensor mine = own_matmul(x, packed, shift).to(at::kFloat);
  double error = (mine - theirs).norm().item<double>() / std::max(theirs.norm().item<double>(), 1e-30);
  return mine.sizes() == theirs.sizes() && error < 1e-2;
}

struct Shape {
  int64_t heads, kv_heads, head_dim, width, intermediate;
  float eps, scale;
};

struct Layers {
  std::vector<Tensor> attention_norm, mlp_norm;  // the norms' weights
  std::vector<Projection> qkv, o, gate_up, down;
  Shape shape;

  // Decoder._project: zero rows added up to `least` rows, calls of at most `measured` rows (0: any).
  // A projection on our own matmul takes a decode step's rows in calls of up to kOwnRows, as they
  // are (each row alone by construction), and a prompt's up to kOwnRows tokens; longer prompts, oneDNN.
  Tensor project(const Projection& projection, const Tensor& x, int64_t least, int64_t measured,
                 bool prompt) const {
    int64_t rows = x.size(0);
    if (projection.own && (rows <= kOwnRows || !prompt)) {
      if (rows <= kOwnRows) return own_matmul(x, projection.first, projection.own_bias);
      std::vector<Tensor> parts;
      for (int64_t at = 0; at < rows; at += kOwnRows) {
        parts.push_back(own_matmul(x.slice(0, at, at + kOwnRows), projection.first, projection.own_bias));
      }
      return at::cat(parts);
    }
    if (measured > 0 && rows > measured) {
      std::vector<Tensor> parts;
      for (int64_t at = 0; at < rows; at += measured) {
        parts.push_back(project(projection, x.slice(0, at, at + measured), least, measured, prompt));
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

  // T: the activations' element (float, or bf16 as uint16_t bits); C: the cache's.
  template <typename T, typename C>
  Tensor decode_as(Tensor x, const Tensor& rotation, std::vector<Tensor>& keys, std::vector<Tensor>& values,
                   const std::vector<int64_t>& rows, const std::vector<int64_t>& columns,
                   const std::vector<int64_t>& least, int64_t measured, bool prompt) const {
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
    // Each row's loops on a thread of torch's (rows in parallel where there are 2+; a row's arithmetic
    // is the same on any thread): on the example model, 8 rows' loops took 0.85 ms of a 6.9 ms step
    // on one thread.
    auto each_row = [batch](const auto& body) {
      at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) body(b);
      });
    };
    auto attention_normed = [&](size_t index, int64_t b) {
      rms_norm(hidden + b * s.width, bits_of<T>(attention_norm[index]), bits_of<T>(normed) + b * s.width, s.width,
               s.eps);
    };
    each_row([&](int64_t b) { attention_normed(0, b); });
    for (size_t index = 0; index < qkv.size(); ++index) {
      int64_t stride = (s.heads + 2 * s.kv_heads) * s.head_dim;
      Tensor mixed = checked(project(qkv[index], normed, least[0], measured, prompt), x, batch, stride);
      C* key_base = static_cast<C*>(keys[index].data_ptr());
      C* value_base = static_cast<C*>(values[index].data_ptr());
      float* query_rows = queries.data_ptr<float>();
      each_row([&](int64_t b) {  // RoPE; the key and value into the row's column
        const S* row = bits_of<T>(mixed) + b * stride;
        const float* turn = turns + b * half * 2;
        for (int64_t h = 0; h < s.heads; ++h) {
          rotate(row + h * s.head_dim, turn, s.scale, query_rows + (b * s.heads + h) * s.head_dim, half);
        }
        for (int64_t g = 0; g < s.kv_heads; ++g) {
          int64_t at = ((rows[b] * s.kv_heads + g) * length + columns[b]) * s.head_dim;
          rotate(row + (s.heads + g) * s.head_dim, turn, 1.0f, key_base + at, half);
          const S* value = row + (s.heads + s.kv_heads + g) * s.head_dim;
          for (int64_t d = 0; d < s.head_dim; ++d) value_base[at + d] = narrow<C>(widen(value[d]));
        }
      });
      // Each row's heads that share a key head together (each head's arithmetic as alone), in parallel
      // where there is enough of it. Every key of the step is written first (above): a prompt's
      // tokens, or a row's drafts, attend to the ones before them.
      int64_t grain = std::max<int64_t>(1, 16384 / (longest * s.head_dim * group));
      const float* query_base = query_rows;
      S* attended_base = bits_of<T>(attended);
      at::parallel_for(0, batch * s.kv_heads, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(group * longest), sums(s.head_dim);
        for (int64_t item = begin; item < end; ++item) {
          int64_t b = item / s.kv_heads, first = (b * s.heads + item % s.kv_heads * group) * s.head_dim;
          int64_t at = (rows[b] * s.kv_heads + item % s.kv_heads) * length * s.head_dim;
          attend(query_base + first, key_base + at, value_base + at, columns[b] + 1, s.head_dim, group,
                 scores.data(), sums.data(), attended_base + first);
        }
      });
      Tensor projected = checked(project(o[index], attended, least[1], measured, prompt), x, batch, s.width);
      each_row([&](int64_t b) {
        add_into(hidden + b * s.width, bits_of<T>(projected) + b * s.width, s.width);
        rms_norm(hidden + b * s.width, bits_of<T>(mlp_norm[index]), bits_of<T>(normed) + b * s.width, s.width, s.eps);
      });
      Tensor both = checked(project(gate_up[index], normed, least[2], measured, prompt), x, batch, 2 * s.intermediate);
      each_row([&](int64_t b) {
        const S* row = bits_of<T>(both) + b * 2 * s.intermediate;
        silu_times_up(row, row + s.intermediate, bits_of<T>(gated) + b * s.intermediate, s.intermediate);
      });
      Tensor down_out = checked(project(down[index], gated, least[3], measured, prompt), x, batch, s.width);
      each_row([&](int64_t b) {  // and the next layer's first norm
        add_into(hidden + b * s.width, bits_of<T>(down_out) + b * s.width, s.width);
        if (index + 1 < qkv.size()) attention_normed(index + 1, b);
      });
    }
    return x;
  }

  // Puts the bf16 projections whose packed layout our matmul reads (native_matmul.h) on it, each
  // checked first (`own_agrees`). Returns how many; none where the CPU lacks AVX-512 BF16.
  int64_t own_matmuls() {
    if (!own_matmul_supported()) return 0;
    int64_t count = 0;
    for (auto* group : {&qkv, &o, &gate_up, &down}) {
      for (Projection& projection : *group) {
        if (projection.kind != kPacked) continue;
        projection.own = own_agrees(projection.first, projection.bias);
        if (projection.own && projection.bias) projection.own_bias = projection.bias->to(at::kFloat).contiguous();
        count += projection.own;
      }
    }
    return count;
  }

  // Every layer for one token a row: `x` [batch, 1, width] (embedded); row b's key and value go to
  // cache row rows[b], column columns[b], and it attends to its columns 0..columns[b]; `rotation`
  // [batch, head_dim / 2, 2]: RoPE's (cos, sin) at each row's position. `prompt`: the rows are one
  // prompt's tokens (more than kOwnRows of them go to oneDNN). Returns the new hidden states.
  Tensor decode(const Tensor& input, const Tensor& rotation, std::vector<Tensor> keys, std::vector<Tensor> values,
                const std::vector<int64_t>& rows, const std::vector<int64_t>& columns,
                const std::vector<int64_t>& least, int64_t measured, bool prompt) const {
    int64_t batch = input.size(0);
    TORCH_CHECK(keys.size() == qkv.size() && values.size() == qkv.size(), "one cache tensor a layer");
    TORCH_CHECK(static_cast<int64_t>(rows.size()) == batch && static_cast<int64_t>(columns.size()) == batch,
                "a cache row and a column for each row");
    TORCH_CHECK(least.size() == 4, "the fewest rows of qkv, o, gate_up and down");
    TORCH_CHECK(input.dim() == 3 && input.size(1) == 1 && input.size(2) == shape.width, "x: [batch, 1, width]");
    TORCH_CHECK(rotation.scalar_type() == at::kFloat && rotation.is_contiguous() &&
                    rotation.numel() == batch * shape.head_dim, "rotation: [batch, head_dim / 2, 2] float32");
    TORCH_CHECK(input.is_cpu() && rotation.is_cpu(), "CPU tensors");
    at::ScalarType cached = keys[0].scalar_type();
    TORCH_CHECK(cached == at::kFloat || cached == at::kBFloat16, "a float32 or bfloat16 cache");
    for (size_t i = 0; i < keys.size(); ++i) {  // every layer's as the first's, which the loops index by
      TORCH_CHECK(keys[i].scalar_type() == cached && values[i].scalar_type() == cached && keys[i].is_cpu() &&
                      values[i].is_cpu() && keys[i].is_contiguous() && values[i].is_contiguous() &&
                      keys[i].dim() == 4 && keys[i].sizes() == keys[0].sizes() &&
                      values[i].sizes() == keys[0].sizes() && keys[i].size(1) == shape.kv_heads &&
                      keys[i].size(3) == shape.head_dim,
                  "the cache: [rows, kv_heads, length, head_dim] on the CPU, alike in every layer");
    }
    py::gil_scoped_release released;
    Tensor x = input.contiguous().clone();
    bool bf16 = cached == at::kBFloat16;
    if (x.scalar_type() == at::kBFloat16) {
      return bf16 ? decode_as<at::BFloat16, uint16_t>(x, rotation, keys, values, rows, columns, least, measured, prompt)
                  : decode_as<at::BFloat16, float>(x, rotation, keys, values, rows, columns, least, measured, prompt);
    }
    TORCH_CHECK(x.scalar_type() == at::kFloat, "bfloat16 or float32 activations");
    return bf16 ? decode_as<float, uint16_t>(x, rotation, keys, values, rows, columns, least, measured, prompt)
                : decode_as<float, float>(x, rotation, keys, values, rows, columns, least, measured, prompt);
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
  // Our matmul (native_matmul.h): x [..., inputs] bf16 times oneDNN-packed bf16 weights, in calls of up
  // to kOwnRows rows: the layers' (tests), and a packed output layer's (Decoder._project, where
  // `native_head` is set). `own_matmul_agrees` first: whether it reads these weights.
  module.def(
      "own_matmul",
      [](const Tensor& x, const Tensor& packed, const std::optional<Tensor>& bias) {
        TORCH_CHECK(own_matmul_supported(), "our matmul needs AVX-512 BF16 (and this torch's oneDNN buffers)");
        TORCH_CHECK(own_layout(packed), "weights not in the packed layout our matmul reads");
        TORCH_CHECK(x.dim() >= 1 && x.size(-1) == packed.size(1), "x: [..., ", packed.size(1), "]");
        Tensor shift = bias ? bias->to(at::kFloat).contiguous() : Tensor();
        py::gil_scoped_release released;
        int64_t rows = x.numel() / x.size(-1);
        if (rows <= kOwnRows) return own_matmul(x, packed, shift);
        Tensor flat = x.reshape({rows, x.size(-1)});
        std::vector<Tensor> parts;
        for (int64_t at = 0; at < rows; at += kOwnRows) {
          parts.push_back(own_matmul(flat.slice(0, at, at + kOwnRows), packed, shift));
        }
        return shaped_as(at::cat(parts), x);
      },
      py::arg("x"), py::arg("packed"), py::arg("bias") = py::none());
  module.def("own_matmul_agrees", &own_agrees, py::arg("packed"), py::arg("bias") = py::none());
  // The same on weights as the model holds them ([columns, inputs], bf16): an output layer tied to
  // the embeddings (Decoder._project calls it for the output layer where `native_head` is set).
  module.def(
      "own_plain_matmul",
      [](const Tensor& x, const Tensor& weight) {
        TORCH_CHECK(own_matmul_supported(), "our matmul needs AVX-512 BF16 (and this torch's oneDNN buffers)");
        TORCH_CHECK(own_plain_layout(weight), "weights not bf16 rows of inputs by 32 our matmul reads");
        TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "x: [..., ", weight.size(1), "]");
        py::gil_scoped_release released;
        int64_t rows = x.numel() / x.size(-1);
        if (rows <= kOwnRows) return own_plain_matmul(x, weight);
        Tensor flat = x.reshape({rows, x.size(-1)});
        std::vector<Tensor> parts;
        for (int64_t at = 0; at < rows; at += kOwnRows) {
          parts.push_back(own_plain_matmul(flat.slice(0, at, at + kOwnRows), weight));
        }
        return shaped_as(at::cat(parts), x);
      },
      py::arg("x"), py::arg("weight"));
  module.def("own_matmul_supported", &own_matmul_supported);
  // How many of torch's threads ran a parallel_for of `items` here: 1 where the build lacks OpenMP
  // (native.py's flags), whatever torch's thread count (tests).
  module.def("parallel_threads", [](int64_t items) {
    py::gil_scoped_release released;
    std::vector<int> used(at::get_num_threads(), 0);
    at::parallel_for(0, items, 1, [&](int64_t, int64_t) {
      size_t thread = static_cast<size_t>(at::get_thread_num());
      if (thread < used.size()) used[thread] = 1;  // a team larger than torch's count: not counted
    });
    return std::count(used.begin(), used.end(), 1);
  });
  py::class_<Layers>(module, "Layers")
      .def(py::init([](std::vector<Tensor> attention_norm, std::vector<Tensor> mlp_norm, std::vector<Projection> qkv,
                       std::vector<Projection> o, std::vector<Projection> gate_up, std::vector<Projection> down,
                       int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps) {
             size_t count = qkv.size();
             TORCH_CHECK(count > 0 && attention_norm.size() == count && mlp_norm.size() == count &&
                             o.size() == count && gate_up.size() == count && down.size() == count,
                         "every layer needs its two norms and four projections");
             TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && head_dim % 2 == 0, "heads ", heads, ", kv_heads ",
                         kv_heads, ", head_dim ", head_dim, ": kv_heads must divide heads, head_dim be even");
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
      .def("own_matmuls", &Layers::own_matmuls)
      .def("decode", &Layers::decode, py::arg("x"), py::arg("rotation"), py::arg("keys"), py::arg("values"),
           py::arg("rows"), py::arg("columns"), py::arg("least"), py::arg("measured"), py::arg("prompt") = false);
}
