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
// A model that computes in bfloat16 gets bfloat16 products: its kernels are packed as pairs of
// consecutive rows, [ceil(N/32), ceil(K/2), 32] uint32, the activations rounded to bfloat16 as
// they enter a product, each pair of products summed into float32 (AVX512-BF16's dot product,
// twice the multiply-adds per instruction of float32's FMA). The KV cache is float32 or
// bfloat16; attention and everything else run in float32.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

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

typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
typedef uint16_t bf16;

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf as_float(vu u) { vf v; std::memcpy(&v, &u, sizeof v); return v; }
inline vf load(const bf16* p) {  // 16 bfloat16 values, widened exactly
  typedef uint16_t vh __attribute__((vector_size(2 * kLanes)));
  vh h;
  std::memcpy(&h, p, sizeof h);
  return as_float(__builtin_convertvector(h, vu) << 16);
}
inline float widen(float x) { return x; }
inline float widen(bf16 x) {
  const uint32_t u = uint32_t{x} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// out[i] = in[i] as the cache's (or a bfloat16 product's) type, i < n: bfloat16 rounded to
// nearest even, as jnp's astype does (a NaN stays a NaN).
inline void narrow(const float* in, float* out, int64_t n) {
  std::memcpy(out, in, n * sizeof(float));
}
inline void narrow(const float* in, bf16* out, int64_t n) {
  typedef uint16_t vh __attribute__((vector_size(2 * kLanes)));
  auto round16 = [](vu u) {
    const vu nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return __builtin_convertvector(nan ? (u >> 16) | 0x40u : (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16,
                                   vh);
  };
  int64_t i = 0;
  vu u;
  for (; i + kLanes <= n; i += kLanes) {
    std::memcpy(&u, in + i, sizeof u);
    const vh h = round16(u);
    std::memcpy(out + i, &h, sizeof h);
  }
  if (i < n) {  // the last n - i, through a zero-padded vector
    u = vu{};
    std::memcpy(&u, in + i, (n - i) * sizeof(float));
    const vh h = round16(u);
    std::memcpy(out + i, &h, (n - i) * sizeof(bf16));
  }
}

// Packed weights are float32 or bfloat16; bfloat16 is a float32's upper 16 bits, so it widens
// exactly as it is loaded, and the products are float32's: half the bytes to stream. A
// bfloat16 panel row stores column j beside column 16 + j (cpu_decode.pack), so one 32-bit
// lane holds both and a shift and a mask widen them, no shuffles (those cost 20% of the FMAs'
// throughput here).
static_assert(kVecs == 2, "a bfloat16 panel row is one vector of 32-bit pairs");
inline void load_panel_row(const float* w, vf out[kVecs]) {
  for (int j = 0; j < kVecs; ++j) out[j] = load(w + kLanes * j);
}
inline void load_panel_row(const bf16* w, vf out[kVecs]) {
  vu pairs;
  std::memcpy(&pairs, w, sizeof pairs);
  out[0] = as_float(pairs << 16);
  out[1] = as_float(pairs & 0xFFFF0000u);
}

// A kernel for bfloat16 products holds, in lane c of a uint32 panel row, column c's weights in
// rows 2i (low half) and 2i + 1; x is read the same way, as pairs of bfloat16. Returns
// acc + x_hi * w_hi + x_lo * w_lo per lane, each product exact and each sum rounded to float32
// (the order and rounding of AVX512-BF16's vdpbf16ps, used where the CPU has it).
typedef uint32_t pair_t __attribute__((may_alias));  // read from bfloat16 scratch
inline vf dot_pairs(vf acc, pair_t x, vu w) {
#ifdef __AVX512BF16__
  return (vf)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_set1_epi32(x), (__m512bh)w);
#else
  const float lo = widen(static_cast<bf16>(x)), hi = widen(static_cast<bf16>(x >> 16));
  acc += hi * as_float(w & 0xFFFF0000u);
  return acc + lo * as_float(w << 16);
#endif
}

// e^x, 16 lanes at a time: within a few ulp (denormal results aside), 0 far below, +inf
// above 88.7 (portable: 0 below -87, +inf above 88), NaN for NaN (libm's expf does not
// vectorise without -ffast-math, whose flush-to-zero would leak into the whole process).
// e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln(2)/2, e^r by Taylor to r^6. AVX-512 rounds
// and scales in one instruction each (vrndscaleps, vscalefps: 13 operations, half of the
// portable version's; the head's log-sum-exp and attention's softmax spend most of their
// time here).
inline vf exp16(vf x) {
  auto taylor = [](vf r) {
    vf p = vf{} + 1.0f / 720;
    for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = p * r + c;
    return p;
  };
#ifdef __AVX512F__
  // max(c, x) and min(c, x) return x where x is NaN, so a NaN stays a NaN.
  const __m512 v = _mm512_min_ps(_mm512_set1_ps(89.0f),
                                 _mm512_max_ps(_mm512_set1_ps(-104.0f), (__m512)x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf r = (vf)v - (vf)n * 0.693145751953125f - (vf)n * 1.428606765330187e-06f;
  return (vf)_mm512_scalef_ps((__m512)taylor(r), n);
#else
  typedef int32_t vi __attribute__((vector_size(64)));
  const vf lo = x < -87.0f ? vf{} + 1 : vf{};
  const vf hi = x > 88.0f ? vf{} + __builtin_inff() : vf{};
  x = x < -87.0f ? vf{} - 87.0f : x;
  x = x > 88.0f ? vf{} + 88.0f : x;
  const vf z = x * 1.44269504f + 0.5f;
  const vf t = __builtin_convertvector(__builtin_convertvector(z, vi), vf);  // towards 0
  const vf n = t > z ? t - 1 : t;                                             // floor(z)
  const vf r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return lo != 0 ? vf{} : hi != 0 ? hi : taylor(r) * scale;
#endif
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

template <typename T>  // float, or bfloat16 (a KV cache's) widened
float dot(const float* a, const T* b, int64_t n) {
  vf acc = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += load(a + i) * load(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * widen(b[i]);
  return s;
}

// The sum of e^(in[i] - shift) for i < n, each also written to out[i] unless out is null.
float exp_shifted(const float* in, float shift, float* out, int64_t n) {
  vf sum = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf e = exp16(load(in + i) - shift);
    if (out) store(out + i, e);
    sum += e;
  }
  float total = 0;
  if (i < n) {
    float buf[kLanes] = {};
    std::memcpy(buf, in + i, (n - i) * sizeof(float));
    const vf e = exp16(load(buf) - shift);
    for (int64_t j = i; j < n; ++j) {
      total += e[j - i];
      if (out) out[j] = e[j - i];
    }
  }
  return hsum(sum) + total;
}

// out[k] = the sum of v[k]'s lanes, k < 16. Each level adds the low and high halves of every
// vector's partial sums while merging two vectors into one: 30 shuffles for 16 sums, where
// one sum at a time takes 4 each.
inline vf hsum16(vf v[16]) {
  for (int i = 0; i < 8; ++i)  // lanes 0-7: v[2i]'s 8 partial sums, 8-15: v[2i+1]'s
    v[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                   25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // 4 lanes each
    v[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17,
                                   18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // 2 lanes each
    v[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17,
                                   20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(v[0], v[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(v[0], v[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

// V vectors of a cache row's 16 * V values: float32, or bfloat16 widened. Two vectors of
// bfloat16 come in pair order, the even-indexed values and then the odd ones: one 32-bit lane
// holds one of each, which a shift and a mask widen (no shuffles; with them, a bfloat16 cache
// took 20% longer to attend over than a float32 one). Sums over a row do not see the order; a
// strip of outputs is put back in order once (natural_order).
template <typename T>
constexpr bool kPairOrder = std::is_same_v<T, bf16>;
template <int V>
inline void load_strip(const float* p, vf (&out)[V]) {
  for (int v = 0; v < V; ++v) out[v] = load(p + v * kLanes);
}
template <int V>
inline void load_strip(const bf16* p, vf (&out)[V]) {
  if constexpr (V == 2) {
    vu pairs;
    std::memcpy(&pairs, p, sizeof pairs);
    out[0] = as_float(pairs << 16);
    out[1] = as_float(pairs & 0xFFFF0000u);
  } else {
    for (int v = 0; v < V; ++v) out[v] = load(p + v * kLanes);
  }
}
inline void pair_order(vf (&v)[2]) {
  const vf even = __builtin_shufflevector(v[0], v[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22,
                                          24, 26, 28, 30);
  v[1] = __builtin_shufflevector(v[0], v[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
  v[0] = even;
}
inline void natural_order(vf (&v)[2]) {
  const vf low = __builtin_shufflevector(v[0], v[1], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6,
                                         22, 7, 23);
  v[1] = __builtin_shufflevector(v[0], v[1], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                                 15, 31);
  v[0] = low;
}

// q . keys[k] for the 16 keys [16, n] (n a multiple of 16 * V, at most kMaxDot), one lane
// each; q is put in the keys' load order once.
constexpr int64_t kMaxDot = 256;
template <int V, typename T>
inline vf dot16(const float* q, const T* keys, int64_t n) {
  vf qv[kMaxDot / kLanes];
  for (int64_t i = 0; i < n; i += V * kLanes) {
    vf strip[V];
    for (int v = 0; v < V; ++v) strip[v] = load(q + i + v * kLanes);
    if constexpr (V == 2 && kPairOrder<T>) pair_order(strip);
    for (int v = 0; v < V; ++v) qv[i / kLanes + v] = strip[v];
  }
  vf partial[16];
  for (int k = 0; k < 16; ++k, keys += n) {
    vf acc = {};
    for (int64_t i = 0; i < n; i += V * kLanes) {
      vf key[V];
      load_strip(keys + i, key);
      for (int v = 0; v < V; ++v) acc += qv[i / kLanes + v] * key[v];
    }
    partial[k] = acc;
  }
  return hsum16(partial);
}

// l[t] = ok[t] ? l[t] * scale : kNegInf (llama.attend's masked logits), t < n; returns their
// max.
float scale_and_mask(float* l, const bool* ok, float scale, int64_t n) {
  typedef int8_t vb __attribute__((vector_size(kLanes)));
  typedef int16_t vh __attribute__((vector_size(2 * kLanes)));
  typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
  vf top = vf{} + kNegInf;
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    vb allowed;
    std::memcpy(&allowed, ok + t, sizeof allowed);
    // Widened in two steps: GCC 12 turns one 8-to-32-bit conversion into 16 scalar ones.
    const vi wide = __builtin_convertvector(__builtin_convertvector(allowed, vh), vi);
    const vf v = wide != 0 ? load(l + t) * scale : vf{} + kNegInf;
    store(l + t, v);
    top = v > top ? v : top;
  }
  float best = kNegInf;
  for (int j = 0; j < kLanes; ++j) best = std::max(best, top[j]);
  for (; t < n; ++t) {
    l[t] = ok[t] ? l[t] * scale : kNegInf;
    best = std::max(best, l[t]);
  }
  return best;
}

// out[g][i : i + V * 16] = sum over t < s of p[g][t] * rows[t, i : i + V * 16], g < G: each
// strip of a row, once loaded, is multiplied into all G heads' sums, which sit in registers
// (two sets, over even and odd t, to halve the chains of dependent adds).
template <int G, int V, typename T>
void weighted_strips(const float* const* p, const T* rows, float* const* out, int64_t s,
                     int64_t n, int64_t i) {
  vf even[G][V] = {}, odd[G][V] = {};
  auto add = [&](vf(&acc)[G][V], int64_t t) {
    vf row[V];
    load_strip(rows + t * n + i, row);
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < V; ++v) acc[g][v] += p[g][t] * row[v];
  };
  int64_t t = 0;
  for (; t + 2 <= s; t += 2) add(even, t), add(odd, t + 1);
  if (t < s) add(even, t);
  for (int g = 0; g < G; ++g) {
    vf sum[V];
    for (int v = 0; v < V; ++v) sum[v] = even[g][v] + odd[g][v];
    if constexpr (V == 2 && kPairOrder<T>) natural_order(sum);
    for (int v = 0; v < V; ++v) store(out[g] + i + v * kLanes, sum[v]);
  }
}

// out[g][0:n] = sum over t < s of p[g][t] * rows[t, 0:n], g < G, 32 columns at a time.
template <int G, typename T>
void weighted_heads(const float* const* p, const T* rows, float* const* out, int64_t s,
                    int64_t n) {
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) weighted_strips<G, 2>(p, rows, out, s, n, i);
  for (; i + kLanes <= n; i += kLanes) weighted_strips<G, 1>(p, rows, out, s, n, i);
  for (; i < n; ++i)
    for (int g = 0; g < G; ++g) {
      float sum = 0;
      for (int64_t t = 0; t < s; ++t)
        if (p[g][t] != 0) sum += p[g][t] * widen(rows[t * n + i]);
      out[g][i] = sum;
    }
}

// out[g, 0:n] = sum over t < s of p[g, t] * rows[t, 0:n] for g < group (p [group, ps], rows
// [s, n], out [group, n]), two heads at a time; p is 0 for the masked rows, whose products
// add nothing.
template <typename T>
void weighted_rows(const float* p, int64_t ps, const T* rows, float* out, int64_t group,
                   int64_t s, int64_t n) {
  int64_t g = 0;
  for (; g + 2 <= group; g += 2) {
    const float* pg[2] = {p + g * ps, p + (g + 1) * ps};
    float* og[2] = {out + g * n, out + (g + 1) * n};
    weighted_heads<2>(pg, rows, og, s, n);
  }
  if (g < group) {
    const float* pg[1] = {p + g * ps};
    float* og[1] = {out + g * n};
    weighted_heads<1>(pg, rows, og, s, n);
  }
}

// Below this many multiply-adds a stage runs on the calling thread alone: handing work to
// another thread costs a few microseconds, about what 2^18 multiply-adds take (build with
// -DJAXLLM_SERIAL_WORK=1e15 to time one thread).
#ifndef JAXLLM_SERIAL_WORK
#define JAXLLM_SERIAL_WORK (int64_t{1} << 18)
#endif
constexpr int64_t kSerialWork = JAXLLM_SERIAL_WORK;
constexpr int64_t kExpWork = 16;  // an exp16 per value takes about as long as 16 multiply-adds

// The helpers of one kernel call: up to pool-size - 1 of XLA's threads, each scheduled once
// and kept, spinning, until the call returns, so that its stages (a layer has five) hand out
// work without a Schedule each: XLA's idle threads went back to sleep between stages, and
// waking a sleeping virtual CPU cost more than many of the stages.
//
// A job's items are claimed from one word, the ticket (items, next): a claim is one
// compare-and-swap, which fails on a finished job (next == items), so no helper runs an item
// of a job whose caller has moved on. A job's function is read only after a claim, which
// acquires the caller's store of its ticket: a helper whose stale ticket happens to equal the
// next job's claims an item of that job, rightly, and runs that job's function. The
// caller waits only for items that are running, never for a helper that has not started (its
// pool busy): one that starts after the call has ended finds `quit` and returns. So two
// calls that share a pool cannot deadlock waiting on each other's queued helpers.
class Crew {
 public:
  Crew(ffi::ThreadPool& pool, int64_t work) {
    const int64_t helpers = work >= kSerialWork ? pool.num_threads() - 1 : 0;
    for (int64_t i = 0; i < helpers; ++i)
      pool.Schedule([state = state_] {
        state->active.fetch_add(1);
        while (!state->quit.load()) {
          if (!state->claim_and_run()) pause();
        }
        state->active.fetch_sub(1);
      });
    threads_ = std::max<int64_t>(helpers, 0) + 1;
  }
  int64_t threads() const { return threads_; }
  ~Crew() {
    state_->quit.store(true);  // before reading `active`: a helper sees it, or we see it
    while (state_->active.load() > 0) pause();
  }

  // fn(i) for i in [0, n), on this thread and the helpers; on this thread alone below
  // kSerialWork multiply-adds (about what handing out work costs).
  template <typename Fn>
  void parallel_for(int64_t n, int64_t work, Fn fn) {
    if (threads_ == 1 || n < 2 || work < kSerialWork || n > kMaxItems) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    State& s = *state_;
    s.call = [](void* f, int64_t i) { (*static_cast<Fn*>(f))(i); };
    s.ctx = &fn;
    s.done.store(0, std::memory_order_relaxed);
    s.ticket.store(uint64_t(n) << 32, std::memory_order_release);  // publishes call and ctx
    while (s.claim_and_run()) {
    }
    while (s.done.load(std::memory_order_acquire) < n) pause();
  }

 private:
  static constexpr int64_t kMaxItems = int64_t{0xffffffff};
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  struct State {
    std::atomic<uint64_t> ticket{0};
    std::atomic<int64_t> done{0};
    std::atomic<int64_t> active{0};
    std::atomic<bool> quit{false};
    void (*call)(void*, int64_t) = nullptr;
    void* ctx = nullptr;

    bool claim_and_run() {  // false when the current job has no unclaimed item
      uint64_t t = ticket.load(std::memory_order_acquire);
      while ((t & 0xffffffff) < (t >> 32))
        if (ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) {
          call(ctx, int64_t(t & 0xffffffff));
          done.fetch_add(1, std::memory_order_release);
          return true;
        }
      return false;
    }
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
  int64_t threads_ = 1;
};

// Ask for the weights 4 KiB ahead of the ones being multiplied: on its own the hardware
// prefetcher kept a thread's stream at 18 GB/s, with this at 25 (the FMAs' pace), and a
// decode step ~15% faster. The panels are contiguous, so the reads run ahead into the next.
constexpr int64_t kPrefetchBytes = 4096;
template <typename W>
inline void prefetch(const W* w) {  // one panel row: one (bfloat16) or two cache lines
  for (size_t line = 0; line < sizeof(W) * kPanel / 64; ++line)
    __builtin_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 64 * line);
}

// One panel row's products: acc[r] += x[r * k] * w for R rows of x, float32 or bfloat16
// weights (widened) times float32 x, or bfloat16 pairs times bfloat16 pairs.
template <int R, typename W>
inline void multiply_row(vf (&acc)[R][kVecs], const float* x, int64_t k, const W* w) {
  vf wv[kVecs];
  load_panel_row(w, wv);
  for (int r = 0; r < R; ++r) {
    const float xr = x[r * k];
    for (int j = 0; j < kVecs; ++j) acc[r][j] += xr * wv[j];
  }
}
template <int R>
inline void multiply_row(vf (&acc)[R][kVecs], const pair_t* x, int64_t k, const uint32_t* w) {
  vu wv[kVecs];
  for (int j = 0; j < kVecs; ++j) std::memcpy(&wv[j], w + kLanes * j, sizeof(vu));
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kVecs; ++j) acc[r][j] = dot_pairs(acc[r][j], x[r * k], wv[j]);
}

// y[r0:r0+R, panel's columns] = x[r0:r0+R] . w (packed), for y [m, n]; k counts pairs of rows
// for a bfloat16 product.
template <int R, typename X, typename W>
void tile(const X* x, const W* w, float* y, int64_t k, int64_t n, int64_t r0, int64_t panel) {
  vf acc[R][kVecs] = {};
  x += r0 * k;
  w += panel * k * kPanel;
  for (int64_t i = 0; i < k; ++i, w += kPanel) {
    prefetch(w);
    multiply_row<R>(acc, x + i, k, w);
  }
  const int64_t c0 = panel * kPanel, cols = std::min(kPanel, n - c0);
  for (int r = 0; r < R; ++r) {
    float out[kPanel];
    for (int j = 0; j < kVecs; ++j) store(out + kLanes * j, acc[r][j]);
    std::memcpy(y + (r0 + r) * n + c0, out, cols * sizeof(float));  // the last panel is padded
  }
}

template <int R, typename X, typename W>
void tiles(const X* x, const W* w, float* y, int64_t k, int64_t n, int64_t r0,
           int64_t first, int64_t last) {
  for (int64_t p = first; p < last; ++p) tile<R>(x, w, y, k, n, r0, p);
}

// Panels [first, last) of y [m, n] = x [m, k] . w [ceil(n/32), k, 32].
template <typename X, typename W>
void panels(const X* x, const W* w, float* y, int64_t m, int64_t k, int64_t n,
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

// A packed kernel operand: float32 or bfloat16 weights for float32 products, or uint32 pairs
// of bfloat16 rows for bfloat16 products.
struct Packed {
  const void* data;
  ffi::DataType type;
};

// x [m, k] rounded to bfloat16 as rows of ceil(k/2) pairs (an odd k's last one padded with 0),
// in this thread's scratch: a bfloat16 product's left operand.
const pair_t* bf16_pairs(const float* x, int64_t m, int64_t k) {
  thread_local std::vector<bf16> pairs;
  const int64_t row = (k + 1) / 2 * 2;
  if (static_cast<int64_t>(pairs.size()) < m * row) pairs.resize(m * row);
  for (int64_t r = 0; r < m; ++r) {
    narrow(x + r * k, pairs.data() + r * row, k);
    if (k < row) pairs[r * row + k] = 0;
  }
  return reinterpret_cast<const pair_t*>(pairs.data());
}

// Chunks of a product's panels per thread, claimed one at a time: enough for a thread that
// started late, or shares its core, to leave the rest to the others.
constexpr int64_t kChunksPerThread = 4;

void matmul(Crew& crew, const float* x, Packed w, float* y, int64_t m, int64_t k, int64_t n) {
  const int64_t total = (n + kPanel - 1) / kPanel;
  const int64_t chunks = std::min<int64_t>(total, kChunksPerThread * crew.threads());
  const pair_t* xp = w.type == ffi::DataType::U32 ? bf16_pairs(x, m, k) : nullptr;
  crew.parallel_for(chunks, m * k * n, [=](int64_t c) {
    const int64_t first = c * total / chunks, last = (c + 1) * total / chunks;
    if (xp)
      panels(xp, static_cast<const uint32_t*>(w.data), y, m, (k + 1) / 2, n, first, last);
    else if (w.type == ffi::DataType::BF16)
      panels(x, static_cast<const bf16*>(w.data), y, m, k, n, first, last);
    else
      panels(x, static_cast<const float*>(w.data), y, m, k, n, first, last);
  });
}

// Whether w is a [k, n] kernel packed as [ceil(n/32), k, 32] float32 or bfloat16, or for
// bfloat16 products as [ceil(n/32), ceil(k/2), 32] uint32; sets *out.
bool packed(const ffi::AnyBuffer& w, int64_t k, int64_t n, Packed* out) {
  const auto d = w.dimensions();
  const auto type = w.element_type();
  *out = {w.untyped_data(), type};
  const int64_t rows = type == ffi::DataType::U32 ? (k + 1) / 2 : k;
  return (type == ffi::DataType::F32 || type == ffi::DataType::BF16 ||
          type == ffi::DataType::U32) &&
         d.size() == 3 && d[1] == rows && d[2] == kPanel && d[0] == (n + kPanel - 1) / kPanel;
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  Packed wp;
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0] || !packed(w, xd[1], yd[1], &wp))
    return ffi::Error::InvalidArgument(
        "cpu_decode.matmul: want x [M,K], w [ceil(N/32),K,32] float32 or bfloat16 (or "
        "[ceil(N/32),ceil(K/2),32] uint32 pairs), y [M,N]");
  Crew crew(pool, xd[0] * xd[1] * yd[1]);
  matmul(crew, x.typed_data(), wp, y->typed_data(), xd[0], xd[1], yd[1]);
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
  thread_local std::vector<float> buffers[3];  // attention, a layer's block, the head
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
template <typename T>
void attend_group(const float* q, const T* keys, const T* values, const bool* ok,
                  int64_t group, int64_t s, int64_t hd, float* out) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  float* probs = scratch(0, group * (s + 1));  // runs on helper threads: their own scratch
  float* totals = probs + group * s;
  // Keys past the last allowed one (the cache's unwritten tail) get probability 0 and are not
  // read; with none allowed, softmax of equal logits averages them all, as llama.attend does.
  int64_t end = s;
  while (end > 0 && !ok[end - 1]) --end;
  if (end == 0) end = s;
  for (int64_t g = 0; g < group; ++g) {  // each head's logits, then probabilities in place
    float* l = probs + g * s;
    const float* qg = q + g * hd;
    int64_t t = 0;
    if (hd % (2 * kLanes) == 0 && hd <= kMaxDot)
      for (; t + 16 <= end; t += 16) store(l + t, dot16<2>(qg, keys + t * hd, hd));
    else if (hd % kLanes == 0 && hd <= kMaxDot)
      for (; t + 16 <= end; t += 16) store(l + t, dot16<1>(qg, keys + t * hd, hd));
    for (; t < end; ++t) l[t] = dot(qg, keys + t * hd, hd);
    const float top = scale_and_mask(l, ok, scale, end);
    totals[g] = exp_shifted(l, top, l, end);  // 0 for masked keys unless all are
  }
  weighted_rows(probs, s, values, out, group, end, hd);
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < hd; ++i) out[g * hd + i] /= totals[g];
}

ffi::Error DecodeLayer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> ln1,
                       ffi::AnyBuffer wqkv, ffi::Buffer<ffi::F32> bqkv, ffi::AnyBuffer wo,
                       ffi::Buffer<ffi::F32> ln2, ffi::AnyBuffer wgu, ffi::AnyBuffer wd,
                       ffi::AnyBuffer k_in, ffi::AnyBuffer v_in, ffi::Buffer<ffi::F32> cos,
                       ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::PRED> mask,
                       ffi::BufferR0<ffi::S32> start_buf, ffi::ResultBuffer<ffi::F32> x_out,
                       ffi::Result<ffi::AnyBuffer> k_cache, ffi::Result<ffi::AnyBuffer> v_cache,
                       int64_t heads, int64_t kv_heads, int64_t f, float eps) {
  const auto xd = x.dimensions(), cd = k_in.dimensions();
  if (xd.size() != 2 || cd.size() != 4 || heads <= 0 || kv_heads <= 0 || heads % kv_heads ||
      f <= 0)
    return ffi::Error::InvalidArgument(
        "cpu_decode.layer: want x [B,D], caches [B,KV,S,hd], heads a multiple of kv_heads, "
        "mlp > 0");
  const int64_t b = xd[0], d = xd[1], s = cd[2], hd = cd[3], group = heads / kv_heads;
  const int64_t nq = heads * hd, nqkv = (heads + 2 * kv_heads) * hd;
  Packed pqkv, po, pgu, pd;
  const auto cache_type = k_in.element_type();
  if ((cache_type != ffi::DataType::F32 && cache_type != ffi::DataType::BF16) ||
      v_in.element_type() != cache_type || k_cache->element_type() != cache_type ||
      v_cache->element_type() != cache_type)
    return ffi::Error::InvalidArgument("cpu_decode.layer: want float32 or bfloat16 caches");
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
  float* out = x_out->typed_data();
  const float* cs = cos.typed_data();
  const float* sn = sin.typed_data();
  const bool* allowed = mask.typed_data();

  Crew crew(pool, b * d * nqkv);
  float* h = scratch(1, b * (2 * d + nqkv + nq + 3 * f));  // one block, carved
  float *qkv = h + b * d, *attn = qkv + b * nqkv, *gu = attn + b * nq, *act = gu + b * 2 * f;
  float* down = act + b * f;
  rms_norm(x.typed_data(), ln1.typed_data(), h, b, d, eps);
  matmul(crew, h, pqkv, qkv, b, d, nqkv);
  // One (row, kv head) per item: the bias and RoPE of its query group and its key and value,
  // the cache write, then attention of the group over its keys and values.
  const float* bias = bqkv.typed_data();
  auto attend = [&](auto* ck, auto* cv) {  // the caches (aliasing k_in, v_in: written in place)
    crew.parallel_for(b * kv_heads, b * heads * s * hd, [&](int64_t item) {
      const int64_t r = item / kv_heads, j = item % kv_heads, at = (r * kv_heads + j) * s * hd;
      float* row = qkv + r * nqkv;
      float* q = row + j * group * hd;
      float* k = row + nq + j * hd;
      float* v = row + nq + (kv_heads + j) * hd;
      for (float* part : {q, k, v})
        for (int64_t i = 0, n = part == q ? group * hd : hd; i < n; ++i)
          part[i] += bias[part - row + i];
      const float *cos_r = cs + r * hd / 2, *sin_r = sn + r * hd / 2;
      for (int64_t g = 0; g < group; ++g) rope(q + g * hd, cos_r, sin_r, hd / 2);
      rope(k, cos_r, sin_r, hd / 2);
      narrow(k, ck + at + start * hd, hd);  // attention reads them back as stored
      narrow(v, cv + at + start * hd, hd);
      attend_group(q, ck + at, cv + at, allowed + r * s, group, s, hd,
                   attn + r * nq + j * group * hd);
    });
  };
  void *ck = k_cache->untyped_data(), *cv = v_cache->untyped_data();
  if (cache_type == ffi::DataType::BF16)
    attend(static_cast<bf16*>(ck), static_cast<bf16*>(cv));
  else
    attend(static_cast<float*>(ck), static_cast<float*>(cv));
  matmul(crew, attn, po, out, b, nq, d);
  for (int64_t i = 0; i < b * d; ++i) out[i] += x.typed_data()[i];
  rms_norm(out, ln2.typed_data(), h, b, d, eps);
  matmul(crew, h, pgu, gu, b, d, 2 * f);
  crew.parallel_for(b, kExpWork * b * f, [&](int64_t r) {  // a row each
    silu_times(gu + r * 2 * f, gu + r * 2 * f + f, act + r * f, f);
  });
  matmul(crew, act, pd, down, b, f, d);
  for (int64_t i = 0; i < b * d; ++i) out[i] += down[i];
  return ffi::Error::Success();
}

// Each row's first argmax and log-sum-exp of its logits l [n] (n > 0): what a sampler needs
// besides the logits, taken while they are in cache (as XLA ops, four passes over them cost
// more than the output projection). A row with a NaN gets top n - 1 and lse NaN, as
// generate's jnp version does.
void row_stats(const float* l, int64_t n, int32_t* top, float* lse) {
  typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
  vi lane, at = {};  // at[j]: where lane j first held its largest value, mv[j]
  for (int j = 0; j < kLanes; ++j) lane[j] = j;
  vf mv = vf{} - __builtin_inff();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf v = load(l + i);
    at = v > mv ? lane + static_cast<int32_t>(i) : at;
    mv = (v > mv) | (v != v) ? v : mv;  // a NaN, once in, stays
  }
  bool nan = false;
  float m = -__builtin_inff();
  int64_t first = 0;
  auto offer = [&](float v, int64_t where) {  // keeps the first index of the largest value
    if (v != v)
      nan = true;
    else if (v > m || (v == m && where < first))
      m = v, first = where;
  };
  for (int j = 0; j < kLanes; ++j) offer(mv[j], at[j]);
  for (; i < n; ++i) offer(l[i], i);
  *top = static_cast<int32_t>(nan ? n - 1 : first);
  if (nan || m == -__builtin_inff()) {
    *lse = nan ? __builtin_nanf("") : m;
    return;
  }
  *lse = m + std::log(exp_shifted(l, m, nullptr, n));
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
  Crew crew(pool, b * d * v);
  float* h = scratch(2, b * d);
  rms_norm(x.typed_data(), scale.typed_data(), h, b, d, eps);
  float* out = logits->typed_data();
  matmul(crew, h, wp, out, b, d, v);
  crew.parallel_for(b, kExpWork * b * v, [&](int64_t r) {
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
                                  .Arg<ffi::AnyBuffer>()          // k cache [B, KV, S, hd]
                                  .Arg<ffi::AnyBuffer>()          // v cache (the same type)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos [B, hd/2]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin [B, hd/2]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // attention mask [B, S]
                                  .Arg<ffi::BufferR0<ffi::S32>>() // write index
                                  .Ret<ffi::Buffer<ffi::F32>>()   // x out
                                  .Ret<ffi::AnyBuffer>()          // k cache (aliased)
                                  .Ret<ffi::AnyBuffer>()          // v cache (aliased)
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("kv_heads")
                                  .Attr<int64_t>("mlp")   // the MLP's width
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
