// The decode step's layer loop of function/engine/decoder.py, in C++ (function/engine/native.py builds
// and loads it). The same ATen ops, in the same order and on the same tensors as
// `Decoder._decode_layers`, so a token's logits are bitwise those of the Python loop: what changes is
// the ~1,000 Python-to-ATen calls a step that it no longer makes, and the GIL, released for the step.
// Only the layers: the embedding, RoPE's rotations, the cache's bookkeeping and the output layer stay
// in Python. Nothing here is architecture-specific: the arithmetic is ATen's, which picks its kernels
// for the CPU at run time.
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

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

struct Layers {
  std::vector<Tensor> attention_norm, mlp_norm;  // `_doubled` weights
  std::vector<Projection> qkv, o, gate_up, down;
  int64_t heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0;
  double eps = 0.0;

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
    if (rows >= least) return call(projection, x);
    std::vector<int64_t> padding = x.sizes().vec();
    padding[0] = least - rows;
    return call(projection, at::cat({x, x.new_zeros(padding)})).slice(0, 0, rows);
  }

  // Decoder._rms_norm
  Tensor rms_norm(const Tensor& x, const Tensor& doubled) const {
    int64_t width = x.size(-1);
    Tensor normed = at::layer_norm(at::cat({x, x.neg()}, -1), {2 * width}, doubled, {}, eps, true);
    return normed.slice(-1, 0, width);
  }

  // Decoder._attend
  Tensor attend(const Tensor& q, const Tensor& keys, const Tensor& values,
                const std::optional<Tensor>& hidden) const {
    int64_t batch = q.size(0);
    Tensor grouped = q.reshape({batch, kv_heads, heads / kv_heads, head_dim});
    Tensor scores = at::matmul(grouped, keys.transpose(-1, -2));
    if (hidden) scores.masked_fill_(*hidden, -std::numeric_limits<double>::infinity());
    Tensor attended = at::matmul(at::softmax(scores, -1), values);
    return attended.view({batch, 1, heads * head_dim});
  }

  // Decoder._decode_layers: see its docstring for the arguments.
  Tensor decode(Tensor x, const Tensor& rotation, std::vector<Tensor> keys, std::vector<Tensor> values,
                const Tensor& rows, const Tensor& columns,
                const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>>& runs,
                const std::vector<std::optional<Tensor>>& hidden, const std::vector<int64_t>& least,
                int64_t measured) const {
    TORCH_CHECK(keys.size() == qkv.size() && values.size() == qkv.size(), "one cache tensor a layer");
    TORCH_CHECK(runs.size() == hidden.size() && !runs.empty(), "one mask a run");
    TORCH_CHECK(least.size() == 4, "the fewest rows of qkv, o, gate_up and down");
    py::gil_scoped_release released;
    int64_t batch = x.size(0), half = head_dim / 2, rotated_heads = heads + kv_heads;
    // One row: its key and value are written through a view (index_put_'s result, bitwise).
    int64_t row = batch == 1 ? rows[0].item<int64_t>() : 0;
    int64_t column = batch == 1 ? columns[0].item<int64_t>() : 0;
    for (size_t index = 0; index < qkv.size(); ++index) {
      // Decoder._attention_inputs
      Tensor mixed = project(qkv[index], rms_norm(x, attention_norm[index]), least[0], measured)
                         .view({batch, 1, heads + 2 * kv_heads, head_dim});
      Tensor pairs = at::empty({batch, 1, rotated_heads, half, 2});
      pairs.copy_(mixed.slice(2, 0, rotated_heads).unflatten(-1, {2, half}).transpose(-1, -2));
      Tensor rotated = at::view_as_real(at::view_as_complex(pairs) * rotation).flatten(-2);
      Tensor q = rotated.slice(2, 0, heads), k = rotated.slice(2, heads), v = mixed.slice(2, rotated_heads);
      Tensor& layer_keys = keys[index];
      Tensor& layer_values = values[index];
      if (batch == 1) {
        layer_keys.select(0, row).select(1, column).copy_(k.select(0, 0).select(0, 0));
        layer_values.select(0, row).select(1, column).copy_(v.select(0, 0).select(0, 0));
      } else {
        using at::indexing::Slice;
        layer_keys.index_put_({rows, Slice(), columns}, k.select(1, 0));
        layer_values.index_put_({rows, Slice(), columns}, v.select(1, 0).to(at::kFloat));
      }
      std::vector<Tensor> calls;
      calls.reserve(runs.size());
      for (size_t run = 0; run < runs.size(); ++run) {
        auto [at, stop, first, span] = runs[run];
        calls.push_back(attend(q.slice(0, at, stop), layer_keys.slice(0, first, first + stop - at).slice(2, 0, span),
                               layer_values.slice(0, first, first + stop - at).slice(2, 0, span), hidden[run]));
      }
      Tensor attended = calls.size() == 1 ? calls[0] : at::cat(calls);
      x = x + project(o[index], attended.to(x.scalar_type()), least[1], measured);
      // Decoder._mlp
      Tensor both = project(gate_up[index], rms_norm(x, mlp_norm[index]), least[2], measured);
      Tensor gated = at::silu(both.slice(-1, 0, intermediate)) * both.slice(-1, intermediate);
      x = x + project(down[index], gated, least[3], measured);
    }
    return x;
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
             TORCH_CHECK(attention_norm.size() == count && mlp_norm.size() == count && o.size() == count &&
                             gate_up.size() == count && down.size() == count,
                         "every layer needs its two norms and four projections");
             TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && head_dim % 2 == 0, "head shapes");
             return Layers{std::move(attention_norm), std::move(mlp_norm), std::move(qkv), std::move(o),
                           std::move(gate_up), std::move(down), heads, kv_heads, head_dim, intermediate, eps};
           }),
           py::arg("attention_norm"), py::arg("mlp_norm"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"),
           py::arg("eps"))
      .def("decode", &Layers::decode, py::arg("x"), py::arg("rotation"), py::arg("keys"), py::arg("values"),
           py::arg("rows"), py::arg("columns"), py::arg("runs"), py::arg("hidden"), py::arg("least"),
           py::arg("measured"));
}
