// oneDNN convolutions for XLA:CPU through the XLA FFI (overfocus_jax/onednn.py builds and registers them).
//
//   OnednnConvForward:         y  = conv(x, W)                      x: N,H,W,C   W: KH,KW,C,O   y: N,OH,OW,O
//   OnednnConvBackwardData:    dx = ∂L/∂x from dy = ∂L/∂y and W
//   OnednnConvBackwardWeights: dW = ∂L/∂W from x and dy
//
// float32 or bfloat16, NHWC activations and HWIO weights as JAX holds them (oneDNN reads and writes them in place); the weights
// are reordered to the layout oneDNN's kernel picks (`format_tag::any`) on every call, a few KiB. Primitives are
// built once per shape and kept; calls run one at a time (each uses every core through OpenMP).
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <memory>
#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() { static dnnl::engine e(dnnl::engine::kind::cpu, 0); return e; }

std::mutex& Lock() { static std::mutex m; return m; }  // one call at a time: each uses every core (OpenMP)

struct Geometry {
  memory::dims src, wei, dst, strides, pad_l, pad_r;
  memory::data_type type = memory::data_type::f32;
  std::string Key(const char* kind) const {
    std::string k(kind);
    k += type == memory::data_type::bf16 ? "bf16;" : "f32;";
    for (const auto* d : {&src, &wei, &dst, &strides, &pad_l, &pad_r}) { for (auto v : *d) k += "," + std::to_string(v); k += ";"; }
    return k;
  }
};

// NHWC / HWIO shapes to oneDNN's logical NCHW / OIHW dims.
Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
                      int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                      memory::data_type type) {
  Geometry g;
  g.type = type;
  g.src = {x[0], x[3], x[1], x[2]};
  g.wei = {w[3], w[2], w[0], w[1]};
  g.dst = {y[0], y[3], y[1], y[2]};
  g.strides = {sh, sw}; g.pad_l = {pt, pl}; g.pad_r = {pb, pr};
  return g;
}

memory::desc Md(const Geometry& g, const memory::dims& d, tag t) { return memory::desc(d, g.type, t); }

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, Md(g, g.src, tag::nhwc),
      Md(g, g.wei, tag::any), Md(g, g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r);
}

struct Entry {
  dnnl::primitive prim;
  memory::desc wei_md;     // the primitive's weights (or weight-gradient) layout
  dnnl::reorder wei_reorder;  // user HWIO <-> primitive layout
  bool plain;              // primitive's layout is already HWIO
  dnnl::memory scratch_w;  // the weights in the primitive's layout, allocated once (calls run one at a time)
};

Entry& Lookup(const std::string& key, const Geometry& g, int kind) {
  static std::unordered_map<std::string, std::unique_ptr<Entry>> cache;
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  auto e = std::make_unique<Entry>();
  auto user_w = Md(g, g.wei, tag::hwio);
  auto fwd = ForwardPd(g);
  if (kind == 0) {
    e->prim = dnnl::convolution_forward(fwd);
    e->wei_md = fwd.weights_desc();
  } else if (kind == 1) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct,
        Md(g, g.src, tag::nhwc), Md(g, g.wei, tag::any), Md(g, g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r, fwd);
    e->prim = dnnl::convolution_backward_data(pd);
    e->wei_md = pd.weights_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), dnnl::algorithm::convolution_direct,
        Md(g, g.src, tag::nhwc), Md(g, g.wei, tag::any), Md(g, g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r, fwd);
    e->prim = dnnl::convolution_backward_weights(pd);
    e->wei_md = pd.diff_weights_desc();
  }
  e->plain = (e->wei_md == user_w);
  if (!e->plain) {
    e->scratch_w = memory(e->wei_md, Engine());
    if (kind == 2) e->wei_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), e->wei_md, Engine(), user_w));
    else e->wei_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user_w, Engine(), e->wei_md));
  }
  auto& ref = *e;
  cache.emplace(key, std::move(e));
  return ref;
}

// kind 0: y = conv(x, w); 1: dx = conv_transpose(dy, w); 2: dw from x and dy.
void Execute(int kind, void* x, void* w, void* y, const Geometry& g) {
  Entry& e = Lookup(g.Key(kind == 0 ? "f" : kind == 1 ? "d" : "w"), g, kind);
  static dnnl::stream s(Engine());
  memory src(Md(g, g.src, tag::nhwc), Engine(), x), dst(Md(g, g.dst, tag::nhwc), Engine(), y);
  memory user_w(Md(g, g.wei, tag::hwio), Engine(), w);
  memory prim_w = e.plain ? user_w : e.scratch_w;
  if (kind != 2 && !e.plain) e.wei_reorder.execute(s, user_w, prim_w);
  if (kind == 0) e.prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w}, {DNNL_ARG_DST, dst}});
  else if (kind == 1) e.prim.execute(s, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w}, {DNNL_ARG_DIFF_DST, dst}});
  else e.prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, prim_w}, {DNNL_ARG_DIFF_DST, dst}});
  if (kind == 2 && !e.plain) e.wei_reorder.execute(s, prim_w, user_w);
  s.wait();
}

ffi::Error Run(int kind, void* x, void* w, void* y, const Geometry& g) {
  try {
    std::lock_guard<std::mutex> guard(Lock());
    Execute(kind, x, w, y, g);
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN kernels: ") + err.what());
  }
  return ffi::Error::Success();
}

constexpr memory::data_type DnnlType(ffi::DataType t) {
  return t == ffi::DataType::BF16 ? memory::data_type::bf16 : memory::data_type::f32;
}

template <ffi::DataType T>
ffi::Error Forward(ffi::Buffer<T> x, ffi::Buffer<T> w, ffi::ResultBuffer<T> y,
                   int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr, DnnlType(T));
  return Run(0, x.untyped_data(), w.untyped_data(), y->untyped_data(), g);
}

template <ffi::DataType T>
ffi::Error BackwardData(ffi::Buffer<T> dy, ffi::Buffer<T> w, ffi::ResultBuffer<T> dx,
                        int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr, DnnlType(T));
  return Run(1, dx->untyped_data(), w.untyped_data(), dy.untyped_data(), g);
}

template <ffi::DataType T>
ffi::Error BackwardWeights(ffi::Buffer<T> x, ffi::Buffer<T> dy, ffi::ResultBuffer<T> dw,
                           int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr, DnnlType(T));
  return Run(2, x.untyped_data(), dw->untyped_data(), dy.untyped_data(), g);
}

}  // namespace

#define ATTRS .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top") \
  .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

#define BIND(T) ffi::Ffi::Bind().Arg<ffi::Buffer<T>>().Arg<ffi::Buffer<T>>().Ret<ffi::Buffer<T>>() ATTRS

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, Forward<ffi::F32>, BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardData<ffi::F32>, BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeights<ffi::F32>, BIND(ffi::F32));
// bfloat16 buffers; oneDNN accumulates in float32 and rounds each result to bfloat16 once.
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForwardBf16, Forward<ffi::BF16>, BIND(ffi::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardDataBf16, BackwardData<ffi::BF16>, BIND(ffi::BF16));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeightsBf16, BackwardWeights<ffi::BF16>, BIND(ffi::BF16));
