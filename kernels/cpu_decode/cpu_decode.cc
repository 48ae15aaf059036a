// One-token decode steps on XLA:CPU: a whole decoder layer per call, and the output head (final
// norm, output projection, each row's argmax and log-sum-exp).
//
// A sampler's decode step multiplies B (the batch) rows by every weight matrix and attends
// over the KV cache. On XLA:CPU that step is ~140 small ops whose fixed costs (a few us each)
// exceed their arithmetic, and whose library GEMMs, built for many rows, read the weights at a
// fraction of what this memory delivers (bench-7m: 2.7 ms per step, 0.7 ms of it with no
// matmul at all). Here a layer is one call: RMSNorm, q/k/v, RoPE, the cache write, GQA
// attention, o, RMSNorm, gate/up, SiLU and down, the matmuls shared out to XLA's intra-op
// threads. The math is jaxllm.models.llama's (Block with a KV cache); tests compare the two.
//
// Weights come packed in panels of 32 columns, [ceil(N/32), K, 32] (cpu_decode.pack), float32
// or bfloat16, so a product reads each matrix front to back once, every weight multiplied into
// all B rows while the B x 32 outputs of its panel stay in registers over the whole K loop.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;      // columns per panel; cpu_decode.PANEL on the Python side
constexpr float kNegInf = -1e30f;   // llama.NEG_INF: masked logits, finite
typedef float vf __attribute__((vector_size(64)));  // one AVX-512 register, or two AVX2 ones
constexpr int kLanes = 16;
constexpr int kVecs = kPanel / kLanes;
#ifdef __AVX512F__
constexpr int kRows = 8;  // 8 rows x 2 vectors of outputs: 16 of the 32 zmm registers
#else
constexpr int kRows = 4;  // 4 rows x 2 x 2 ymm: half of AVX2's 16 registers
#endif

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// Packed weights are float32 or bfloat16; bfloat16 is a float32's upper 16 bits, so it widens
// exactly as it is loaded, and the products are float32's: half the bytes to stream. A
// bfloat16 panel row stores column j beside column 16 + j (cpu_decode.pack), so one 32-bit
// lane holds both and a shift and a mask widen them, no shuffles (those cost 20% of the FMAs'
// throughput here).
typedef uint16_t bf16;
static_assert(kVecs == 2, "a bfloat16 panel row is one vector of 32-bit pairs");
inline void load_panel_row(const float* w, vf out[kVecs]) {
  for (int j = 0; j < kVecs; ++j) out[j] = load(w + kLanes * j);
}
inline void load_panel_row(const bf16* w, vf out[kVecs]) {
  typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
  vu pairs;
  std::memcpy(&pairs, w, sizeof pairs);
  const vu low = pairs << 16, high = pairs & 0xFFFF0000u;
  std::memcpy(&out[0], &low, sizeof low);
  std::memcpy(&out[1], &high, sizeof high);
}

// e^x, 16 lanes at a time: within a few ulp for x in [-87, 88], 0 below, +inf above
// (libm's expf does not vectorise without -ffast-math, whose flush-to-zero would leak into
// the whole process). e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln(2)/2, e^r by Taylor.
inline vf exp16(vf x) {
  typedef int32_t vi __attribute__((vector_size(64)));
  const vf lo = x < -87.0f ? vf{} + 1 : vf{};
  const vf hi = x > 88.0f ? vf{} + __builtin_inff() : vf{};
  x = x < -87.0f ? vf{} - 87.0f : x;
  x = x > 88.0f ? vf{} + 88.0f : x;
  const vf z = x * 1.44269504f + 0.5f;
  const vf t = __builtin_convertvector(__builtin_convertvector(z, vi), vf);  // towards 0
  const vf n = t > z ? t - 1 : t;                                             // floor(z)
  const vf r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  vf p = vf{} + 1.0f / 720;
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = p * r + c;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return lo != 0 ? vf{} : hi != 0 ? hi : p * scale;
}

// out[i] = e^(in[i] - shift) for i < n.
void exp_shifted(const float* in, float shift, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(out + i, exp16(load(in + i) - shift));
  if (i < n) {
    float buf[kLanes] = {};
    std::memcpy(buf, in + i, (n - i) * sizeof(float));
    const vf e = exp16(load(buf) - shift);
    for (int64_t j = i; j < n; ++j) out[j] = e[j - i];
  }
}

inline float hsum(vf v) {  // a tree of half-width adds
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b =
      __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

float dot(const float* a, const float* b, int64_t n) {
  vf acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load(a + i) * load(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[0:4] = q . keys[0:4] (keys [4, n], n a multiple of kLanes): four dot products whose
// horizontal sums share their shuffles (one sum at a time bound the attention logits).
inline void dot4(const float* q, const float* keys, int64_t n, float* out) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
  for (int64_t i = 0; i < n; i += kLanes) {
    const vf qv = load(q + i);
    a0 += qv * load(keys + i);
    a1 += qv * load(keys + n + i);
    a2 += qv * load(keys + 2 * n + i);
    a3 += qv * load(keys + 3 * n + i);
  }
  auto half = [](vf v) -> v8 {
    return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  };
  const v8 h0 = half(a0), h1 = half(a1), h2 = half(a2), h3 = half(a3);
  const v8 p01 = __builtin_shufflevector(h0, h1, 0, 1, 2, 3, 8, 9, 10, 11) +
                 __builtin_shufflevector(h0, h1, 4, 5, 6, 7, 12, 13, 14, 15);  // h0 x4 | h1 x4
  const v8 p23 = __builtin_shufflevector(h2, h3, 0, 1, 2, 3, 8, 9, 10, 11) +
                 __builtin_shufflevector(h2, h3, 4, 5, 6, 7, 12, 13, 14, 15);
  const v8 q2 = __builtin_shufflevector(p01, p23, 0, 1, 8, 9, 4, 5, 12, 13) +
                __builtin_shufflevector(p01, p23, 2, 3, 10, 11, 6, 7, 14, 15);  // h0 h0 h2 h2 h1..
  const v4 r = __builtin_shufflevector(q2, q2, 0, 2, 4, 6) +
               __builtin_shufflevector(q2, q2, 1, 3, 5, 7);  // h0 h2 h1 h3
  out[0] = r[0], out[1] = r[2], out[2] = r[1], out[3] = r[3];
}

// out[0:n] = sum over t < s of p[t] * rows[t, 0:n] (rows [s, n]), one 16-column strip at a
// time with its sums in registers (four of them, over t mod 4, to cut the chain of dependent
// adds); p is 0 for the masked rows, whose products add nothing.
void weighted_rows(const float* p, const float* rows, float* out, int64_t s, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vf acc[4] = {};
    int64_t t = 0;
    for (; t + 4 <= s; t += 4)
      for (int j = 0; j < 4; ++j) acc[j] += p[t + j] * load(rows + (t + j) * n + i);
    for (; t < s; ++t) acc[0] += p[t] * load(rows + t * n + i);
    store(out + i, (acc[0] + acc[1]) + (acc[2] + acc[3]));
  }
  for (; i < n; ++i) {
    float sum = 0;
    for (int64_t t = 0; t < s; ++t)
      if (p[t] != 0) sum += p[t] * rows[t * n + i];
    out[i] = sum;
  }
}

// Below this many multiply-adds a stage runs on the calling thread alone: handing work to
// another thread costs a few microseconds, about what 2^18 multiply-adds take (build with
// -DJAXLLM_SERIAL_WORK=1e15 to time one thread).
#ifndef JAXLLM_SERIAL_WORK
#define JAXLLM_SERIAL_WORK (int64_t{1} << 18)
#endif
constexpr int64_t kSerialWork = JAXLLM_SERIAL_WORK;

// fn(i) for i in [0, n), on this thread and up to pool-size - 1 helpers. Items are claimed
// from a counter, so a helper that starts late (its pool busy) finds nothing left and returns:
// this thread waits only for items already running, never for a queued task, and cannot
// deadlock when every pool thread is itself inside such a call.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, int64_t work, Fn fn) {
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n);
  if (threads <= 1 || work < kSerialWork) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct Job {
    Fn fn;
    int64_t n;
    std::atomic<int64_t> next{0}, done{0};
    Job(Fn f, int64_t n) : fn(std::move(f)), n(n) {}
  };
  auto job = std::make_shared<Job>(std::move(fn), n);
  auto run = [job] {
    for (int64_t i; (i = job->next.fetch_add(1)) < job->n;) {
      job->fn(i);
      job->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(run)(run));
  run();
  while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Ask for the weights 4 KiB ahead of the ones being multiplied: on its own the hardware
// prefetcher kept a thread's stream at 18 GB/s, with this at 25 (the FMAs' pace), and a
// decode step ~15% faster. The panels are contiguous, so the reads run ahead into the next.
constexpr int64_t kPrefetchBytes = 4096;
inline void prefetch(const float* w) {  // one panel row: two cache lines
  __builtin_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes);
  __builtin_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 64);
}
inline void prefetch(const bf16* w) {  // one cache line
  __builtin_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes);
}

// y[r0:r0+R, panel's columns] = x[r0:r0+R] . w (packed), for y [m, n].
template <int R, typename W>
void tile(const float* x, const W* w, float* y, int64_t k, int64_t n, int64_t r0,
          int64_t panel) {
  vf acc[R][kVecs] = {};
  x += r0 * k;
  w += panel * k * kPanel;
  for (int64_t i = 0; i < k; ++i, w += kPanel) {
    vf wv[kVecs];
    prefetch(w);
    load_panel_row(w, wv);
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * k + i];
      for (int j = 0; j < kVecs; ++j) acc[r][j] += xr * wv[j];
    }
  }
  const int64_t c0 = panel * kPanel, cols = std::min(kPanel, n - c0);
  for (int r = 0; r < R; ++r) {
    float out[kPanel];
    for (int j = 0; j < kVecs; ++j) store(out + kLanes * j, acc[r][j]);
    std::memcpy(y + (r0 + r) * n + c0, out, cols * sizeof(float));  // the last panel is padded
  }
}

template <int R, typename W>
void tiles(const float* x, const W* w, float* y, int64_t k, int64_t n, int64_t r0,
           int64_t first, int64_t last) {
  for (int64_t p = first; p < last; ++p) tile<R>(x, w, y, k, n, r0, p);
}

// Panels [first, last) of y [m, n] = x [m, k] . w [ceil(n/32), k, 32].
template <typename W>
void panels(const float* x, const W* w, float* y, int64_t m, int64_t k, int64_t n,
            int64_t first, int64_t last) {
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    switch (std::min<int64_t>(m - r0, kRows)) {
      case 1: tiles<1>(x, w, y, k, n, r0, first, last); break;
      case 2: tiles<2>(x, w, y, k, n, r0, first, last); break;
      case 3: tiles<3>(x, w, y, k, n, r0, first, last); break;
      case 4: tiles<4>(x, w, y, k, n, r0, first, last); break;
#ifdef __AVX512F__
      case 5: tiles<5>(x, w, y, k, n, r0, first, last); break;
      case 6: tiles<6>(x, w, y, k, n, r0, first, last); break;
      case 7: tiles<7>(x, w, y, k, n, r0, first, last); break;
      case 8: tiles<8>(x, w, y, k, n, r0, first, last); break;
#endif
    }
  }
}

// A packed kernel operand, float32 or bfloat16.
struct Packed {
  const void* data;
  bool bf16;
};

void matmul(ffi::ThreadPool& pool, const float* x, Packed w, float* y, int64_t m, int64_t k,
            int64_t n) {
  const int64_t total = (n + kPanel - 1) / kPanel;
  const int64_t chunks = std::min<int64_t>(total, 4 * std::max<int64_t>(pool.num_threads(), 1));
  parallel_for(pool, chunks, m * k * n, [=](int64_t c) {
    const int64_t first = c * total / chunks, last = (c + 1) * total / chunks;
    if (w.bf16)
      panels(x, static_cast<const bf16*>(w.data), y, m, k, n, first, last);
    else
      panels(x, static_cast<const float*>(w.data), y, m, k, n, first, last);
  });
}

// Whether w is a [k, n] kernel packed as [ceil(n/32), k, 32] float32 or bfloat16; sets *out.
bool packed(const ffi::AnyBuffer& w, int64_t k, int64_t n, Packed* out) {
  const auto d = w.dimensions();
  const auto type = w.element_type();
  *out = {w.untyped_data(), type == ffi::DataType::BF16};
  return (type == ffi::DataType::F32 || type == ffi::DataType::BF16) && d.size() == 3 &&
         d[1] == k && d[2] == kPanel && d[0] == (n + kPanel - 1) / kPanel;
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  Packed wp;
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0] || !packed(w, xd[1], yd[1], &wp))
    return ffi::Error::InvalidArgument(
        "cpu_decode.matmul: want x [M,K], w [ceil(N/32),K,32] float32 or bfloat16, y [M,N]");
  matmul(pool, x.typed_data(), wp, y->typed_data(), xd[0], xd[1], yd[1]);
  return ffi::Error::Success();
}

// out = x * rsqrt(mean(x^2) + eps) * scale, row by row ([b, d]).
void rms_norm(const float* x, const float* scale, float* out, int64_t b, int64_t d, float eps) {
  for (int64_t r = 0; r < b; ++r, x += d, out += d) {
    const float ss = dot(x, x, d);
    const float inv = 1.0f / std::sqrt(ss / d + eps);
    for (int64_t i = 0; i < d; ++i) out[i] = x[i] * inv * scale[i];
  }
}

// n floats of this thread's scratch, reused from call to call (index: which buffer). Fresh
// vectors each call were handed back to the OS when freed and page-faulted in again on the
// next call: 5-15 us of a ~220 us layer on bench-7m. The contents are not initialised.
float* scratch(int index, int64_t n) {
  thread_local std::vector<float> buffers[4];
  std::vector<float>& buf = buffers[index];
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i], for i < n.
void silu_times(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf g = load(gate + i);
    store(out + i, g / (1.0f + exp16(-g)) * load(up + i));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

// Rotate the halves of one head vector (HF's non-interleaved RoPE): cos/sin [hd/2].
void rope(float* v, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i] + a * sin[i];
  }
}

// Softmax attention of `group` query heads (q [group, hd]) over one kv head's keys and values
// [s, hd], where ok[t] -> out [group, hd]. Masked logits are kNegInf, as in llama.attend.
void attend_group(const float* q, const float* keys, const float* values, const bool* ok,
                  int64_t group, int64_t s, int64_t hd, float* out) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  float* logits = scratch(0, 2 * s);  // runs on helper threads: their own scratch
  float* probs = logits + s;
  // Keys past the last allowed one (the cache's unwritten tail) get probability 0 and are not
  // read; with none allowed, softmax of equal logits averages them all, as llama.attend does.
  int64_t end = s;
  while (end > 0 && !ok[end - 1]) --end;
  if (end == 0) end = s;
  for (int64_t g = 0; g < group; ++g, q += hd, out += hd) {
    int64_t t = 0;
    if (hd % kLanes == 0)
      for (; t + 4 <= end; t += 4) dot4(q, keys + t * hd, hd, logits + t);
    for (; t < end; ++t) logits[t] = dot(q, keys + t * hd, hd);
    float top = kNegInf;
    for (t = 0; t < end; ++t) {
      logits[t] = ok[t] ? logits[t] * scale : kNegInf;
      top = std::max(top, logits[t]);
    }
    exp_shifted(logits, top, probs, end);  // 0 for masked keys unless all are
    float total = 0;
    for (t = 0; t < end; ++t) total += probs[t];
    weighted_rows(probs, values, out, end, hd);
    for (int64_t i = 0; i < hd; ++i) out[i] /= total;
  }
}

ffi::Error DecodeLayer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ln1,
                       ffi::AnyBuffer wqkv, ffi::Buffer<ffi::F32> bqkv, ffi::AnyBuffer wo,
                       ffi::Buffer<ffi::F32> ln2, ffi::AnyBuffer wgu, ffi::AnyBuffer wd,
                       ffi::Buffer<ffi::F32> k_in, ffi::Buffer<ffi::F32> v_in,
                       ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                       ffi::Buffer<ffi::PRED> mask, ffi::BufferR0<ffi::S32> start_buf,
                       ffi::ResultBuffer<ffi::F32> x_out, ffi::ResultBuffer<ffi::F32> k_cache,
                       ffi::ResultBuffer<ffi::F32> v_cache, int64_t heads, int64_t kv_heads,
                       float eps) {
  const auto xd = x.dimensions(), cd = k_in.dimensions();
  if (xd.size() != 2 || cd.size() != 4 || heads <= 0 || kv_heads <= 0 || heads % kv_heads)
    return ffi::Error::InvalidArgument("cpu_decode.layer: want x [B,D], caches [B,KV,S,hd]");
  const int64_t b = xd[0], d = xd[1], s = cd[2], hd = cd[3], group = heads / kv_heads;
  const int64_t nq = heads * hd, nqkv = (heads + 2 * kv_heads) * hd;
  const int64_t f = wd.dimensions().size() == 3 ? wd.dimensions()[1] : -1;
  Packed pqkv, po, pgu, pd;
  if (cd[0] != b || cd[1] != kv_heads || v_in.element_count() != k_in.element_count() || hd % 2 ||
      !packed(wqkv, d, nqkv, &pqkv) || bqkv.element_count() != nqkv ||
      !packed(wo, nq, d, &po) || !packed(wgu, d, 2 * f, &pgu) || !packed(wd, f, d, &pd) ||
      ln1.element_count() != d ||
      ln2.element_count() != d || cos.element_count() != b * hd / 2 ||
      sin.element_count() != b * hd / 2 || mask.element_count() != b * s)
    return ffi::Error::InvalidArgument("cpu_decode.layer: operand shapes disagree");
  const int64_t start = *start_buf.typed_data();
  if (start < 0 || start >= s)
    return ffi::Error::InvalidArgument("cpu_decode.layer: write index outside the cache");
  float* ck = k_cache->typed_data();  // aliases k_in: the write is in place
  float* cv = v_cache->typed_data();
  float* out = x_out->typed_data();
  const float* cs = cos.typed_data();
  const float* sn = sin.typed_data();
  const bool* allowed = mask.typed_data();

  float* h = scratch(1, b * (2 * d + nqkv + nq + 3 * f));  // one block, carved
  float *qkv = h + b * d, *attn = qkv + b * nqkv, *gu = attn + b * nq, *act = gu + b * 2 * f;
  float* down = act + b * f;
  rms_norm(x.typed_data(), ln1.typed_data(), h, b, d, eps);
  matmul(pool, h, pqkv, qkv, b, d, nqkv);
  for (int64_t r = 0; r < b; ++r) {
    float* row = qkv + r * nqkv;
    for (int64_t i = 0; i < nqkv; ++i) row[i] += bqkv.typed_data()[i];
    for (int64_t head = 0; head < heads + kv_heads; ++head)  // q heads, then k heads
      rope(row + head * hd, cs + r * hd / 2, sn + r * hd / 2, hd / 2);
    for (int64_t j = 0; j < kv_heads; ++j) {
      const int64_t at = ((r * kv_heads + j) * s + start) * hd;
      std::memcpy(ck + at, row + nq + j * hd, hd * sizeof(float));
      std::memcpy(cv + at, row + nq + (kv_heads + j) * hd, hd * sizeof(float));
    }
  }
  // Attention, one (row, kv head) per item: its query group against its keys and values.
  parallel_for(pool, b * kv_heads, b * heads * s * hd, [&](int64_t item) {
    const int64_t r = item / kv_heads, j = item % kv_heads, at = (r * kv_heads + j) * s * hd;
    attend_group(qkv + r * nqkv + j * group * hd, ck + at, cv + at, allowed + r * s,
                 group, s, hd, attn + r * nq + j * group * hd);
  });
  matmul(pool, attn, po, out, b, nq, d);
  for (int64_t i = 0; i < b * d; ++i) out[i] += x.typed_data()[i];
  rms_norm(out, ln2.typed_data(), h, b, d, eps);
  matmul(pool, h, pgu, gu, b, d, 2 * f);
  for (int64_t r = 0; r < b; ++r) silu_times(gu + r * 2 * f, gu + r * 2 * f + f, act + r * f, f);
  matmul(pool, act, pd, down, b, f, d);
  for (int64_t i = 0; i < b * d; ++i) out[i] += down[i];
  return ffi::Error::Success();
}

// Each row's first argmax and log-sum-exp of its logits l [n] (n > 0): what a sampler needs
// besides the logits, taken while they are in cache (as XLA ops, four passes over them cost
// more than the output projection). A row with a NaN gets top n - 1 and lse NaN, as
// generate's jnp version does.
void row_stats(const float* l, int64_t n, int32_t* top, float* lse) {
  vf mv = vf{} - __builtin_inff();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf v = load(l + i);
    mv = (v > mv) | (v != v) ? v : mv;  // a NaN, once in, stays
  }
  float m = -__builtin_inff();
  for (int j = 0; j < kLanes; ++j) m = (mv[j] > m || mv[j] != mv[j]) ? mv[j] : m;
  for (; i < n; ++i) m = (l[i] > m || l[i] != l[i]) ? l[i] : m;
  *top = static_cast<int32_t>(n - 1);
  for (i = 0; i < n; ++i)
    if (l[i] == m) {
      *top = static_cast<int32_t>(i);
      break;
    }
  if (m != m || m == -__builtin_inff()) {
    *lse = m;
    return;
  }
  vf sum = {};
  for (i = 0; i + kLanes <= n; i += kLanes) sum += exp16(load(l + i) - m);
  float total = hsum(sum);
  for (; i < n; ++i) total += std::exp(l[i] - m);
  *lse = m + std::log(total);
}

// A decode step's output: logits = rms_norm(x) . w (packed), and each row's argmax and
// log-sum-exp of them.
ffi::Error Head(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> logits,
                ffi::ResultBuffer<ffi::S32> top, ffi::ResultBuffer<ffi::F32> lse, float eps) {
  const auto xd = x.dimensions(), ld = logits->dimensions();
  Packed wp;
  if (xd.size() != 2 || ld.size() != 2 || ld[0] != xd[0] || ld[1] <= 0 ||
      scale.element_count() != xd[1] || top->element_count() != xd[0] ||
      lse->element_count() != xd[0] || !packed(w, xd[1], ld[1], &wp))
    return ffi::Error::InvalidArgument(
        "cpu_decode.head: want x [B,D], scale [D], w [ceil(V/32),D,32], logits [B,V]");
  const int64_t b = xd[0], d = xd[1], v = ld[1];
  float* h = scratch(2, b * d);
  rms_norm(x.typed_data(), scale.typed_data(), h, b, d, eps);
  float* out = logits->typed_data();
  matmul(pool, h, wp, out, b, d, v);
  parallel_for(pool, b, 16 * b * v, [&](int64_t r) {
    row_stats(out + r * v, v, top->typed_data() + r, lse->typed_data() + r);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::AnyBuffer>()          // w packed
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y [M, N]

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmDecodeLayer, DecodeLayer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [B, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // input_layernorm [D]
                                  .Arg<ffi::AnyBuffer>()          // q|k|v packed
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q|k|v bias (zeros if none)
                                  .Arg<ffi::AnyBuffer>()          // o packed
                                  .Arg<ffi::Buffer<ffi::F32>>()   // post_attention_layernorm
                                  .Arg<ffi::AnyBuffer>()          // gate|up packed
                                  .Arg<ffi::AnyBuffer>()          // down packed
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k cache [B, KV, S, hd]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v cache
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos [B, hd/2]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin [B, hd/2]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // attention mask [B, S]
                                  .Arg<ffi::BufferR0<ffi::S32>>() // write index
                                  .Ret<ffi::Buffer<ffi::F32>>()   // x out
                                  .Ret<ffi::Buffer<ffi::F32>>()   // k cache (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // v cache (aliased)
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmDecodeHead, Head,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [B, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // final norm scale [D]
                                  .Arg<ffi::AnyBuffer>()          // output projection packed
                                  .Ret<ffi::Buffer<ffi::F32>>()   // logits [B, V]
                                  .Ret<ffi::Buffer<ffi::S32>>()   // argmax [B]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // log-sum-exp [B]
                                  .Attr<float>("eps"));
