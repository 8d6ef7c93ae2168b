// moebench's CPU operators (moebench/model/cpu_ops.py builds this file on first use, with -march=native): those of
// compiled decode steps, moebench_cpu::linear_row, moe_route_decode (one token's whole MoE block, its norm and
// residual add included, in one parallel region), moe_decode (the experts alone), attention_decode (the same for the
// attention block) and attend_row; for prompts (eager): attention_block_prompt and moe_block_prompt (a layer's two
// blocks, one call each: norms and residual adds included), made of attend_block (the attention of many queries),
// moe_prompt (every expert), route_rows (the router's products, softmax and top-k), linear_panels (a prompt's
// projections, the residual add fused), qk_norm_rope and rms_norm_rows, each callable alone too (below).
//
// Inductor compiles each one-row product as a loop of multiply-adds with one horizontal sum per weight row, and in
// bfloat16 it converts every weight and activation element to float32 first: in cache that reads ~80 GB/s on this
// repo's Zen 5 VM, about what its memory gives at the fast end, so the products stop being memory-bound. Here each
// row is one run of fused dot-product instructions (AVX512-BF16's vdpbf16ps: 32 bfloat16 pairs into float32 lanes;
// float32 through AVX-512 FMAs) and reads ~160 GB/s in cache. The rounding follows the compiled graph's: each
// product rounded to the weights' dtype (for the experts: gate and up, silu(gate) * up, each expert's output), the
// experts' weighted sum accumulated in float32 and rounded once.

#include <ATen/core/Tensor.h>
#include <ATen/record_function.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/div.h>
#include <ATen/ops/index_copy.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/topk.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) { return bf16_to_float(*p); }
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) { *p = float_to_bf16(v); }
inline float round_to(float v, const float*) { return v; }
inline float round_to(float v, const uint16_t*) { return bf16_to_float(float_to_bf16(v)); }

// ---- Vectors of W floats (GCC's vector extensions) -----------------------------------------------------------
#ifdef __AVX512F__
constexpr int W = 16;  // floats per vector register
#else
constexpr int W = 8;
#endif
typedef float vf __attribute__((vector_size(W * 4)));

inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// p[0] in every lane, straight from memory: a broadcast from a register would take a slot on one of the two FMA
// ports of Intel cores (vbroadcastss zmm, xmm runs on port 5), a third of the ports' time in the tiles below.
inline vf vbroadcast(const float* p) {
#if defined(__AVX512F__)
  return _mm512_set1_ps(*p);
#elif defined(__AVX__)
  return _mm256_broadcast_ss(p);
#else
  return vf{} + *p;
#endif
}
inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

// W lanes rounded to bfloat16 as float_to_bf16 rounds one (nearest even, NaN to 0x7fc0): the bits, in the upper
// halves of the lanes; vround(v, p) gives them as floats (v itself where p is float32), vstore_to(p, v) stores v in
// p's dtype.
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));

inline vu bf16_bits_twiddled(vf v) {
  const vu u = (vu)v, nan = (u & 0x7fffffffu) > 0x7f800000u;
  return nan ? vu{} + 0x7fc00000u : (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}
// The W bfloat16s themselves. With AVX512-BF16 one conversion instruction (nearest even) does the six operations
// above; it flushes denormals to zero and keeps a NaN's sign and payload bits where torch keeps the denormal and gives
// 0x7fc0, so a vector holding either takes the twiddling instead (a branch: exact either way).
inline vh bf16_halves(vf v) {
#if defined(__AVX512BF16__)
  if (!_mm512_fpclass_ps_mask((__m512)v, 0x01 | 0x20 | 0x80)) [[likely]]  // no quiet NaN, denormal, signalling NaN
    return (vh)_mm512_cvtneps_pbh((__m512)v);
#endif
  return __builtin_convertvector(bf16_bits_twiddled(v) >> 16, vh);
}
inline vu bf16_bits(vf v) {
#if defined(__AVX512BF16__)
  return (vu)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)bf16_halves(v)), 16);
#else
  return bf16_bits_twiddled(v);
#endif
}
inline vf vround(vf v, const float*) { return v; }
inline vf vround(vf v, const uint16_t*) { return (vf)bf16_bits(v); }
inline void vstore_to(float* p, vf v) { vstore(p, v); }
inline void vstore_to(uint16_t* p, vf v) {
  const vh h = bf16_halves(v);
  std::memcpy(p, &h, sizeof h);
}
// vstore_to without reading the lines first, bypassing the caches (p: W elements' bytes aligned); the stores are
// ordered with other threads' reads only after an _mm_sfence().
inline void vstream_to(float* p, vf v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX__)
  _mm256_stream_ps(p, (__m256)v);
#else
  vstore(p, v);
#endif
}
inline void vstream_to(uint16_t* p, vf v) {
#if defined(__AVX512F__)
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), (__m256i)bf16_halves(v));
#elif defined(__AVX__)
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), (__m128i)bf16_halves(v));
#else
  vstore_to(p, v);
#endif
}
inline vf vload_as(const float* p) { return vload(p); }  // W elements as floats (bfloat16 widened)
inline vf vload_as(const uint16_t* p) {  // (GCC's own widening of a vector: a scalar loop, as for bytes below)
#if defined(__AVX512F__)
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}

// Bytes ahead of the weight row being read that the dot products ask the cache for: two lines kPrefetch bytes on
// into L1, two more kPrefetchL2 bytes on into L2 (the hardware's prefetchers alone: experts ~10% slower, each
// expert's weights are a few short streams; the lines into L2 as well: decode steps 5-15% faster on the Xeon VM,
// float32 and bfloat16, whose two cores kept too few reads in flight to draw the memory's bandwidth).
constexpr int64_t kPrefetch = 2048, kPrefetchL2 = 8192;

inline void prefetch(const void* p) {
  const char* c = static_cast<const char*>(p);
  _mm_prefetch(c + kPrefetch, _MM_HINT_T0);
  _mm_prefetch(c + kPrefetch + 64, _MM_HINT_T0);
  _mm_prefetch(c + kPrefetchL2, _MM_HINT_T1);
  _mm_prefetch(c + kPrefetchL2 + 64, _MM_HINT_T1);
}

#if defined(__AVX2__)  // (AVX-512 without AVX512-BF16 too: bfloat16 dot products take the AVX2 path)
inline float hsum(__m256 v) {  // the 8 lanes' sum
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

inline float vsum(vf v) {  // the W lanes' sum, as a tree (a chain of W adds is latency-bound)
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#elif defined(__AVX2__)
  return hsum((__m256)v);
#else
  float s = 0;
  for (int l = 0; l < W; l++) s += v[l];
  return s;
#endif
}

// Dot products of n elements, the weights' row w against the activations x.
inline float dot(const float* w, const float* x, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    prefetch(w + i);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32) {  // two cache lines a step, as prefetch() asks for
    prefetch(w + i);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
  float acc[16] = {0};
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; j++) acc[j] += w[i + j] * x[i + j];
  float s = 0;
  for (float a : acc) s += a;
#endif
  for (; i < n; i++) s += w[i] * x[i];
  return s;
}

inline float dot(const uint16_t* w, const uint16_t* x, int64_t n) {
  int64_t i = 0;
  float s = 0;
#ifdef __AVX512BF16__
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; i + 64 <= n; i += 64) {
    prefetch(w + i);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + i + 32), (__m512bh)_mm512_loadu_si512(x + i + 32));
  }
  for (; i + 32 <= n; i += 32)
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
  // 16 bfloat16 a load; each 32-bit lane holds two: shifted up, the even element is a float32, masked, the odd one.
  // Products of even with even and odd with odd: the same sum, without widening instructions.
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  auto step = [&](int64_t j, __m256& even, __m256& odd) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j));
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j));
    even = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(wv, 16)),
                           _mm256_castsi256_ps(_mm256_slli_epi32(xv, 16)), even);
    odd = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(wv, high)),
                          _mm256_castsi256_ps(_mm256_and_si256(xv, high)), odd);
  };
  for (; i + 64 <= n; i += 64) {  // two cache lines a step, as prefetch() asks for
    prefetch(w + i);
    step(i, a0, a1);
    step(i + 16, a2, a3);
    step(i + 32, a0, a1);
    step(i + 48, a2, a3);
  }
  for (; i + 16 <= n; i += 16) step(i, a0, a1);
  s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
  float acc[16] = {0};
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; j++) acc[j] += bf16_to_float(w[i + j]) * bf16_to_float(x[i + j]);
  for (float a : acc) s += a;
#endif
  for (; i < n; i++) s += bf16_to_float(w[i]) * bf16_to_float(x[i]);
  return s;
}

// The dot products of R rows of x [R, n] with C rows of w [C, n] (rows n apart) into out[r * ldo + c]: R x C chains
// of multiply-adds, each load of a weight serving R rows. (One row's products alone wait on each multiply-add's
// latency and read the weights from L2 again for every row: a router's, ~3x slower.)
template <int R, int C, typename T>
inline void dot_tile(const T* x, const T* w, int64_t n, float* out, int64_t ldo) {
  vf a[R][C] = {};
  int64_t i = 0;
  for (; i + W <= n; i += W)
    for (int c = 0; c < C; c++) {
      const vf wv = vload_as(w + c * n + i);
      for (int r = 0; r < R; r++) a[r][c] = vfma(vload_as(x + r * n + i), wv, a[r][c]);
    }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) {
      float s = vsum(a[r][c]);
      for (int64_t j = i; j < n; j++) s += load(x + r * n + j) * load(w + c * n + j);
      out[r * ldo + c] = s;
    }
}

#ifdef __AVX512BF16__
template <int R, int C>
inline void dot_tile(const uint16_t* x, const uint16_t* w, int64_t n, float* out, int64_t ldo) {
  __m512 a[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) a[r][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512bh xv[R];
    for (int r = 0; r < R; r++) xv[r] = (__m512bh)_mm512_loadu_si512(x + r * n + i);
    for (int c = 0; c < C; c++) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + c * n + i);
      for (int r = 0; r < R; r++) a[r][c] = _mm512_dpbf16_ps(a[r][c], xv[r], wv);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) {
      float s = _mm512_reduce_add_ps(a[r][c]);
      for (int64_t j = i; j < n; j++) s += bf16_to_float(x[r * n + j]) * bf16_to_float(w[c * n + j]);
      out[r * ldo + c] = s;
    }
}
#endif

// x [R, n] against every row of w [N, n] into out [R, N] (rows ldo apart), four weight rows at a time.
template <int R, typename T>
void dot_rows(const T* x, const T* w, int64_t N, int64_t n, float* out, int64_t ldo) {
  int64_t c = 0;
  for (; c + 4 <= N; c += 4) dot_tile<R, 4>(x, w + c * n, n, out + c, ldo);
  for (; c < N; c++) dot_tile<R, 1>(x, w + c * n, n, out + c, ldo);
}

// Calls f(p) with p(tensor) giving the tensor's elements as uint16_t* (bfloat16) or float*, by t's dtype.
template <typename F>
void by_dtype(const at::Tensor& t, const char* op, F f) {
  if (t.scalar_type() == at::kBFloat16) {
    f([](const at::Tensor& u) { return reinterpret_cast<uint16_t*>(u.data_ptr()); });
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": float32 or bfloat16");
    f([](const at::Tensor& u) { return u.data_ptr<float>(); });
  }
}

// n floats of the calling thread's scratch memory, kept from call to call (a decode operator's at::empty of its
// scratch was a dispatcher call, ~0.5 µs, of the embedded model's ~0.12 ms step): one operator's, never held across
// a call of another.
float* scratch_floats(int64_t n) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

inline float silu_mul(float gate, float up) { return gate / (1.0f + std::exp(-gate)) * up; }

// x [D], ids [k], weights [k], w_gate_up [E, 2I, D], w_down [E, D, I] -> out [D] (plus residual [D] unless null, the
// experts' sum rounded first); scratch: k * (3I + D) floats. Called by every thread of a parallel region (its loops
// are shared among them).
template <typename T>
void experts(const T* x, const int64_t* ids, const T* weights, int64_t k, const T* w_gate_up, const T* w_down,
             int64_t D, int64_t I, float* scratch, T* out, const T* residual = nullptr) {
  T* gu = reinterpret_cast<T*>(scratch);  // [k, 2I], then h [k, I], in T
  T* h = gu + k * 2 * I;
  float* y = scratch + k * 3 * I;  // [k, D]: each expert's weighted output
  if (k % omp_get_num_threads() == 0) {
    // Each thread whole experts, one after the other: no wait between the two products, and each thread reads
    // its experts' weights front to back (reads ~15% faster than splitting every expert's rows over threads).
#pragma omp for schedule(static)
    for (int64_t j = 0; j < k; j++) {
      const T *w1 = w_gate_up + ids[j] * 2 * I * D, *w2 = w_down + ids[j] * D * I;
      T *g = gu + j * 2 * I, *hj = h + j * I;
      for (int64_t r = 0; r < 2 * I; r++) store(g + r, dot(w1 + r * D, x, D));
      for (int64_t i = 0; i < I; i++) store(hj + i, silu_mul(load(g + i), load(g + I + i)));
      for (int64_t d = 0; d < D; d++) y[j * D + d] = round_to(dot(w2 + d * I, hj, I), out) * load(weights + j);
    }
  } else {  // rows of all k experts over the threads, product by product
#pragma omp for schedule(static)
    for (int64_t r = 0; r < k * 2 * I; r++) {
      const int64_t j = r / (2 * I);
      store(gu + r, dot(w_gate_up + (ids[j] * 2 * I + r % (2 * I)) * D, x, D));
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < k * I; r++) {
      const int64_t j = r / I, i = r % I;
      store(h + r, silu_mul(load(gu + j * 2 * I + i), load(gu + j * 2 * I + I + i)));
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < k * D; r++) {
      const int64_t j = r / D, d = r % D;
      y[r] = round_to(dot(w_down + (ids[j] * D + d) * I, h + j * I, I), out) * load(weights + j);
    }
  }
#pragma omp for schedule(static)
  for (int64_t d = 0; d < D; d++) {  // the k experts' sum, in float32
    float acc = 0;
    for (int64_t j = 0; j < k; j++) acc += y[j * D + d];
    store(out + d, residual == nullptr ? acc : load(residual + d) + round_to(acc, out));
  }
}

template <typename T>
void moe(const T* x, const int64_t* ids, const T* weights, int64_t k, const T* w_gate_up, const T* w_down,
         int64_t D, int64_t I, float* scratch, T* out) {
#pragma omp parallel
  experts(x, ids, weights, k, w_gate_up, w_down, D, I, scratch, out);
}

// RMSNorm of n elements, rounded as the torch model rounds it (T: x's dtype): x * rsqrt(mean(x^2) + eps) -> T, then
// times w -> T; the result as floats.
template <typename T>
void rms_norm(const T* x, const T* w, float eps, int64_t n, float* out) {
  vf a0 = {}, a1 = {};  // two vectors of running sums (one chain of FMAs would wait on each), then their lanes'
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    const vf u = vload_as(x + i), v = vload_as(x + i + W);
    a0 = vfma(u, u, a0);
    a1 = vfma(v, v, a1);
  }
  for (; i + W <= n; i += W) {
    const vf u = vload_as(x + i);
    a0 = vfma(u, u, a0);
  }
  float sq = vsum(a0 + a1);
  for (; i < n; i++) sq += load(x + i) * load(x + i);
  const float r = 1.0f / std::sqrt(sq / n + eps);
  for (i = 0; i + W <= n; i += W) vstore(out + i, vround(vload_as(w + i) * vround(vload_as(x + i) * r, x), x));
  for (; i < n; i++) out[i] = round_to(load(w + i) * round_to(load(x + i) * r, x), x);
}

// RMSNorm of x [n] (rms_norm) into out [n] in T; tmp: n floats of scratch.
template <typename T>
void rms_norm_to(const T* x, const T* w, float eps, int64_t n, float* tmp, T* out) {
  rms_norm(x, w, eps, n, tmp);
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore_to(out + i, vload(tmp + i));
  for (; i < n; i++) store(out + i, tmp[i]);
}

// The layer's input x [D] through its RMSNorm (weight w) into this thread's buffer xn, in T.
template <typename T>
void normed(const T* x, const T* w, float eps, int64_t D, std::vector<float>& tmp, std::vector<T>& xn) {
  tmp.resize(D);
  xn.resize(D);
  rms_norm_to(x, w, eps, D, tmp.data(), xn.data());
}

// e^x for x <= 0 on W lanes (0 where x is -inf; below -87 ~e^-87): 2^n by the exponent bits times a degree-6
// polynomial of the reduced argument.
typedef int32_t vi __attribute__((vector_size(W * 4)));

inline vf exp_nonpositive(vf x) {
  const vf zero = {};
#if defined(__AVX512F__)
  const vf clamped = (vf)_mm512_max_ps((__m512)x, _mm512_set1_ps(-87.0f));  // (NaN: -87, as the comparison below)
#else
  const vf clamped = x > -87.0f ? x : zero - 87.0f;
#endif
  const vf magic = zero + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (clamped * 1.44269504088896341f + magic) - magic;
  const vf f = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // x - n ln2, in two parts
  vf p = zero + 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
#if defined(__AVX512F__)  // p * 2^n in one instruction (exact, as the product below, for x <= 0: -126 <= n <= 0)
  return (vf)_mm512_maskz_scalef_ps(_mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ), (__m512)p,
                                    (__m512)n);
#else
  const vf scale = (vf)((__builtin_convertvector(n, vi) + 127) << 23);
  return x == -INFINITY ? zero : p * scale;
#endif
}

// The router's choice for one token, as moebench.model.moe.route: logits [E] (already rounded to T) -> the k largest
// softmax probabilities (float32) in descending order, ties to the lower expert, their ids, renormalised to sum 1
// with norm_topk; weights rounded to T. Returns whether the choice is clear-cut: the k-th largest probability above
// the next by more than 2^-20 of it (~8 float32 steps), every logit finite. Where it is not, which experts are
// chosen may hang on how a tie is broken, or on an exp's last bit. (Ties among the chosen only order them.)
template <typename T>
bool route(const float* logits, int64_t E, int64_t k, bool norm_topk, int64_t* ids, T* weights) {
  thread_local std::vector<float> p;
  thread_local std::vector<int64_t> order;
  const int64_t m = std::min(k + 1, E);
  p.resize(E);
  order.resize(m);
  float top = -INFINITY, total = 0;
  bool finite = true;
  for (int64_t e = 0; e < E; e++) {
    top = std::max(top, logits[e]);
    finite &= std::isfinite(logits[e]);
  }
  int64_t e = 0;
  if (finite) {  // W at a time (a NaN or infinity takes std::exp, whose answers keep it)
    vf sum = {};
    for (; e + W <= E; e += W) {
      const vf v = exp_nonpositive(vload(logits + e) - top);
      vstore(p.data() + e, v);
      sum += v;
    }
    total = vsum(sum);
  }
  for (; e < E; e++) total += p[e] = std::exp(logits[e] - top);
  int64_t n = 0;  // the m largest, by insertion: descending, ties to the lower expert (the one met first)
  for (int64_t c = 0; c < E; c++) {
    if (n == m && !(p[c] > p[order[m - 1]])) continue;
    int64_t j = n < m ? n++ : m - 1;
    for (; j > 0 && p[c] > p[order[j - 1]]; j--) order[j] = order[j - 1];
    order[j] = c;
  }
  const bool apart = finite && (m == k || p[order[k]] < p[order[k - 1]] * (1.0f - 0x1p-20f));
  float chosen = 0;
  for (int64_t j = 0; j < k; j++) chosen += p[order[j]] / total;
  for (int64_t j = 0; j < k; j++) {
    ids[j] = order[j];
    const float w = p[order[j]] / total;
    store(weights + j, norm_topk ? w / chosen : w);
  }
  return apart;
}

// For a row route() found not clear-cut: the choice torch's CPU top-k makes of its softmax probabilities (of
// (value, index) pairs, std::nth_element on "greater" then the first k - 1 sorted, or std::partial_sort where 64 k
// <= E: which of tied experts it keeps hangs on that algorithm's steps alone), made here on the logits, which order
// the experts as their probabilities do (ties included) where no two different logits lie within 2^-16 of each other:
// their exps then differ by far more than a rounding. False where that does not hold or a logit is not finite (the
// caller has torch's own softmax and top-k choose then); else the ids in torch's order, weights as route()'s.
template <typename T>
bool route_as_torch(const float* logits, int64_t E, int64_t k, bool norm_topk, int64_t* ids, T* weights) {
  using pair = std::pair<float, int64_t>;
  thread_local std::vector<float> sorted;
  thread_local std::vector<pair> q;
  for (int64_t e = 0; e < E; e++)
    if (!std::isfinite(logits[e])) return false;  // (first: a NaN would break std::sort's ordering, and its bounds)
  sorted.assign(logits, logits + E);
  std::sort(sorted.begin(), sorted.end());
  for (int64_t e = 1; e < E; e++)
    if (sorted[e] != sorted[e - 1] && sorted[e] - sorted[e - 1] <= 0x1p-16f) return false;
  q.resize(E);
  for (int64_t e = 0; e < E; e++) q[e] = {logits[e], e};
  const auto greater = [](const pair& a, const pair& b) { return a.first > b.first; };
  if (k * 64 <= E) {
    std::partial_sort(q.begin(), q.begin() + k, q.end(), greater);
  } else {
    std::nth_element(q.begin(), q.begin() + k - 1, q.end(), greater);
    std::sort(q.begin(), q.begin() + k - 1, greater);
  }
  const float top = sorted[E - 1];
  float total = 0, chosen = 0;
  for (int64_t e = 0; e < E; e++) total += std::exp(logits[e] - top);
  for (int64_t j = 0; j < k; j++) {  // the chosen logits become their probabilities
    q[j].first = std::exp(q[j].first - top) / total;
    chosen += q[j].first;
  }
  for (int64_t j = 0; j < k; j++) {
    ids[j] = q[j].second;
    store(weights + j, norm_topk ? q[j].first / chosen : q[j].first);
  }
  return true;
}

// One token's MoE block with its norm and residual: xn = rms_norm(x), the router's product xn [D] . router [E, D],
// route(), then x + experts(xn), in one parallel region (in Inductor's graph: a norm, the router's product, softmax,
// top-k, the experts and the add).
template <typename T>
void moe_routed(const T* x, const T* norm, float eps, const T* router, int64_t E, int64_t k, bool norm_topk,
                const T* w_gate_up, const T* w_down, int64_t D, int64_t I, float* logits, float* scratch, T* out) {
#pragma omp parallel
  {
    std::vector<float> tmp;
    std::vector<T> xn;
    normed(x, norm, eps, D, tmp, xn);  // every thread its own copy: no wait
#pragma omp for schedule(static)
    for (int64_t e = 0; e < E; e++) logits[e] = round_to(dot(router + e * D, xn.data(), D), out);
    // Every thread routes (the same numbers, in its own arrays): no second wait.
    std::vector<int64_t> ids(k);
    std::vector<T> weights(k);
    route(logits, E, k, norm_topk, ids.data(), weights.data());
    experts(xn.data(), ids.data(), weights.data(), k, w_gate_up, w_down, D, I, scratch, out, x);
  }
}

at::Tensor moe_decode(const at::Tensor& x_, const at::Tensor& ids_, const at::Tensor& weights_,
                      const at::Tensor& w_gate_up_, const at::Tensor& w_down_) {
  TORCH_CHECK(x_.dim() == 2 && x_.size(0) == 1 && ids_.numel() == weights_.numel(), "moe_decode: one token");
  TORCH_CHECK(x_.scalar_type() == w_gate_up_.scalar_type() && x_.scalar_type() == w_down_.scalar_type() &&
                  x_.scalar_type() == weights_.scalar_type() && ids_.scalar_type() == at::kLong,
              "moe_decode: x, weights and the experts' weights share one dtype; ids are int64");
  const at::Tensor x = x_.contiguous(), ids = ids_.contiguous(), weights = weights_.contiguous(),
                   w_gate_up = w_gate_up_.contiguous(), w_down = w_down_.contiguous();  // (no copies in decode)
  const int64_t k = ids.numel(), D = x.size(1), I = w_down.size(2), E = w_gate_up.size(0);
  TORCH_CHECK(w_gate_up.size(1) == 2 * I && w_gate_up.size(2) == D && w_down.size(0) == E && w_down.size(1) == D,
              "moe_decode: w_gate_up [E, 2I, D], w_down [E, D, I]");
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; j++) TORCH_CHECK(0 <= id[j] && id[j] < E, "moe_decode: expert id out of range");
  auto out = at::empty_like(x);
  float* scratch = scratch_floats(k * (3 * I + D));
  by_dtype(x, "moe_decode", [&](auto p) {
    moe(p(x), id, p(weights), k, p(w_gate_up), p(w_down), D, I, scratch, p(out));
  });
  return out;
}

at::Tensor moe_route_decode(const at::Tensor& x_, const at::Tensor& norm_, double eps, const at::Tensor& router_,
                            int64_t k, bool norm_topk, const at::Tensor& w_gate_up_, const at::Tensor& w_down_) {
  TORCH_CHECK(x_.dim() == 2 && x_.size(0) == 1 && norm_.numel() == x_.size(1),
              "moe_route_decode: one token, x [1, D], norm [D]");
  TORCH_CHECK(x_.scalar_type() == router_.scalar_type() && x_.scalar_type() == w_gate_up_.scalar_type() &&
                  x_.scalar_type() == w_down_.scalar_type() && x_.scalar_type() == norm_.scalar_type(),
              "moe_route_decode: x, the norm, the router and the experts' weights share one dtype");
  const at::Tensor x = x_.contiguous(), norm = norm_.contiguous(), router = router_.contiguous(),
                   w_gate_up = w_gate_up_.contiguous(), w_down = w_down_.contiguous();  // (no copies in decode)
  const int64_t D = x.size(1), I = w_down.size(2), E = w_gate_up.size(0);
  TORCH_CHECK(router.dim() == 2 && router.size(0) == E && router.size(1) == D && w_gate_up.size(1) == 2 * I &&
                  w_gate_up.size(2) == D && w_down.size(0) == E && w_down.size(1) == D,
              "moe_route_decode: router [E, D], w_gate_up [E, 2I, D], w_down [E, D, I]");
  TORCH_CHECK(0 < k && k <= E, "moe_route_decode: 1 <= k <= E experts per token");
  auto out = at::empty_like(x);
  float* logits = scratch_floats(E + k * (3 * I + D));
  by_dtype(x, "moe_route_decode", [&](auto p) {
    moe_routed(p(x), p(norm), static_cast<float>(eps), p(router), E, k, norm_topk, p(w_gate_up), p(w_down), D, I,
               logits, logits + E, p(out));
  });
  return out;
}

// x [K] @ w [N, K]^T -> out [N]: the rows of w over the threads.
template <typename T>
void matvec(const T* x, const T* w, int64_t N, int64_t K, T* out) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n++) store(out + n, dot(w + n * K, x, K));
}

at::Tensor linear_row(const at::Tensor& x_, const at::Tensor& w_) {
  TORCH_CHECK(x_.dim() == 2 && x_.size(0) == 1 && w_.dim() == 2 && w_.size(1) == x_.size(1),
              "linear_row: x [1, K], w [N, K]");
  TORCH_CHECK(x_.scalar_type() == w_.scalar_type(), "linear_row: x and w share one dtype");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  auto out = at::empty({1, w.size(0)}, x.options());
  by_dtype(x, "linear_row", [&](auto p) { matvec(p(x), p(w), w.size(0), w.size(1), p(out)); });
  return out;
}

// x [B, V] -> [B] int64: each row's argmax as torch's, the first of its largest, or its first NaN where it has one
// (dtypes but float32 and bfloat16: torch's). Greedy decoding's choice: torch's argmax of one row of 32000 logits took
// ~30 us in float32 and ~115 in bfloat16 (a scalar loop), this ~4.
template <typename T>
int64_t argmax_row(const T* x, int64_t V) {
  vf top_w = vf{} - INFINITY;
  vi nan_w = {};
  int64_t j = 0;
  for (; j + W <= V; j += W) {
    const vf v = vload_as(x + j);
    nan_w |= v != v;
    top_w = v > top_w ? v : top_w;
  }
  float top = -INFINITY;
  bool nan = false;
  for (int l = 0; l < W; l++) top = std::max(top, top_w[l]), nan |= nan_w[l] != 0;
  for (; j < V; j++) {
    const float v = load(x + j);
    nan |= v != v;
    top = std::max(top, v);
  }
  for (j = 0; j + W <= V; j += W) {  // the first lane holding the largest (or a NaN)
    const vf v = vload_as(x + j);
#if defined(__AVX512F__)
    const __mmask16 hit = nan ? _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q)
                              : _mm512_cmp_ps_mask((__m512)v, _mm512_set1_ps(top), _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
#else
    const vi hit = nan ? v != v : v == top;
    for (int l = 0; l < W; l++)
      if (hit[l]) return j + l;
#endif
  }
  for (; j < V; j++) {
    const float v = load(x + j);
    if (nan ? v != v : v == top) return j;
  }
  return 0;  // (unreachable for V > 0)
}

at::Tensor argmax_rows(const at::Tensor& x_) {
  TORCH_CHECK(x_.dim() == 2 && x_.size(1) > 0, "argmax_rows: x [B, V], V > 0");
  if (x_.scalar_type() != at::kFloat && x_.scalar_type() != at::kBFloat16) return x_.argmax(1);  // (other dtypes)
  const at::Tensor x = x_.stride(1) == 1 ? x_ : x_.contiguous();  // (rows apart: a prompt's last positions)
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  by_dtype(x, "argmax_rows", [&](auto p) {
    const auto* px = p(x);
    for (int64_t b = 0; b < x.size(0); b++) out.data_ptr<int64_t>()[b] = argmax_row(px + b * x.stride(0), x.size(1));
  });
  return out;
}

// A prompt's routing, as moebench.model.moe.route(x @ router^T, k, norm_topk): x [T, D] (the normed hidden states)
// and router [E, D] -> (ids [T, k] int64, weights [T, k] in x's dtype). Each row's logits are rounded to x's dtype,
// then route() chooses; a row whose choice is not clear-cut (route's answer) is chosen again as torch's top-k chooses
// (route_as_torch), so that a tie is broken as in the torch model (and transformers), or, where the logits cannot
// stand in for the probabilities there, afterwards by torch's own softmax and top-k on the same logits. (Those
// operators for a few rows cost ~0.15 ms a layer in a prompt, run from memory after the experts.)
std::tuple<at::Tensor, at::Tensor> route_rows(const at::Tensor& x_, const at::Tensor& router_, int64_t k,
                                              bool norm_topk) {
  TORCH_CHECK(x_.dim() == 2 && router_.dim() == 2 && router_.size(1) == x_.size(1) &&
                  x_.scalar_type() == router_.scalar_type(),
              "route_rows: x [T, D] and router [E, D] of one dtype");
  const at::Tensor x = x_.contiguous(), router = router_.contiguous();
  const int64_t T = x.size(0), D = x.size(1), E = router.size(0);
  TORCH_CHECK(0 < k && k <= E, "route_rows: 1 <= k <= E experts per token");
  auto ids = at::empty({T, k}, x.options().dtype(at::kLong)), weights = at::empty({T, k}, x.options());
  auto logits = at::empty({T, E}, x.options().dtype(at::kFloat));
  std::vector<char> unclear(T);
  by_dtype(x, "route_rows", [&](auto p) {
    const auto *px = p(x), *pr = p(router);
    auto* pw = p(weights);
    float* pl = logits.data_ptr<float>();
    int64_t* pi = ids.data_ptr<int64_t>();
#pragma omp parallel for schedule(static)
    for (int64_t t0 = 0; t0 < T; t0 += 4) {  // four tokens at a time
      const int64_t rows = std::min<int64_t>(4, T - t0);
      if (rows == 4) {
        dot_rows<4>(px + t0 * D, pr, E, D, pl + t0 * E, E);
      } else {
        for (int64_t t = t0; t < t0 + rows; t++) dot_rows<1>(px + t * D, pr, E, D, pl + t * E, E);
      }
      for (int64_t t = t0; t < t0 + rows; t++) {
        for (int64_t e = 0; e < E; e++) pl[t * E + e] = round_to(pl[t * E + e], pw);
        unclear[t] = !route(pl + t * E, E, k, norm_topk, pi + t * k, pw + t * k) &&
                     !route_as_torch(pl + t * E, E, k, norm_topk, pi + t * k, pw + t * k);
      }
    }
  });
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < T; t++)
    if (unclear[t]) rows.push_back(t);
  if (!rows.empty()) {  // moebench.model.moe.route's operations
    auto at_rows = at::empty({static_cast<int64_t>(rows.size())}, ids.options());
    std::memcpy(at_rows.data_ptr<int64_t>(), rows.data(), rows.size() * sizeof(int64_t));
    auto [w, i] = at::topk(at::softmax(logits.index_select(0, at_rows), -1), k);
    if (norm_topk) w = w.div(w.sum(-1, true));
    ids.index_copy_(0, at_rows, i);
    weights.index_copy_(0, at_rows, w.to(x.scalar_type()));
  }
  return {ids, weights};
}

// The dot product of a cache row k [hd] (T) with q [hd] (float32).
template <typename T>
inline float dot_q(const T* k, const float* q, int64_t hd) {
  vf a = {};
  int64_t d = 0;
  for (; d + W <= hd; d += W) a = vfma(vload_as(k + d), vload(q + d), a);
  float s = vsum(a);
  for (; d < hd; d++) s += load(k + d) * q[d];
  return s;
}

// G query heads sharing one key-value head against S cache slots (scores, softmax and the weighted sum in float32):
// head i's query qh + i * qstride [hd], the key and value rows kh + s * kstride, vh + s * vstride, the mask
// m[s * mstride] -> o + i * ostride [hd] (zeros where the mask hides every key); p [G S], qf [G hd]: the caller's
// scratch. Only the slots from the first key the mask shows to the last are read, each key row once for the G heads
// (four keys' scores at a time); the exponentials W at a time.
template <typename T>
void attend_heads(const T* qh, int64_t qstride, int64_t G, const T* kh, const T* vh, const bool* m, int64_t S,
                  int64_t hd, int64_t kstride, int64_t vstride, int64_t mstride, float scale, float* p, float* qf, T* o,
                  int64_t ostride) {
  int64_t lo = 0, hi = S;
  while (lo < hi && !m[lo * mstride]) lo++;
  while (hi > lo && !m[(hi - 1) * mstride]) hi--;
  if (lo == hi) {
    for (int64_t i = 0; i < G; i++)
      for (int64_t d = 0; d < hd; d++) store(o + i * ostride + d, 0.0f);
    return;
  }
  for (int64_t i = 0; i < G; i++)
    for (int64_t d = 0; d < hd; d++) qf[i * hd + d] = load(qh + i * qstride + d) * scale;
  int64_t s = lo;
  for (; s + 4 <= hi; s += 4) {
    const T *k0 = kh + s * kstride, *k1 = k0 + kstride, *k2 = k1 + kstride, *k3 = k2 + kstride;
    for (int64_t i = 0; i < G; i++) {  // the four rows stay in L1 for the next head
      const float* qi = qf + i * hd;
      vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
      int64_t d = 0;
      for (; d + W <= hd; d += W) {
        const vf q = vload(qi + d);
        a0 = vfma(vload_as(k0 + d), q, a0);
        a1 = vfma(vload_as(k1 + d), q, a1);
        a2 = vfma(vload_as(k2 + d), q, a2);
        a3 = vfma(vload_as(k3 + d), q, a3);
      }
      float r[4] = {vsum(a0), vsum(a1), vsum(a2), vsum(a3)};
      for (; d < hd; d++) {
        r[0] += load(k0 + d) * qi[d], r[1] += load(k1 + d) * qi[d];
        r[2] += load(k2 + d) * qi[d], r[3] += load(k3 + d) * qi[d];
      }
      for (int j = 0; j < 4; j++) p[i * S + s + j] = m[(s + j) * mstride] ? r[j] : -INFINITY;
    }
  }
  for (; s < hi; s++)
    for (int64_t i = 0; i < G; i++)
      p[i * S + s] = m[s * mstride] ? dot_q(kh + s * kstride, qf + i * hd, hd) : -INFINITY;
  for (int64_t i = 0; i < G; i++) {
    float* e = p + i * S;
    float top = -INFINITY;
    for (s = lo; s < hi; s++) top = std::max(top, e[s]);
    vf sum_w = {};
    for (s = lo; s + W <= hi; s += W) {
      const vf x = exp_nonpositive(vload(e + s) - top);
      vstore(e + s, x);
      sum_w += x;
    }
    float total = vsum(sum_w);
    for (; s < hi; s++) total += e[s] = e[s] == -INFINITY ? 0.0f : std::exp(e[s] - top);
    const float inv = 1.0f / total;
    T* oi = o + i * ostride;
    // The values' weighted sum: a loop over d GCC vectorises (bfloat16 widened its way: ~1.3x faster than vload_as
    // and sums held in registers, AVX2); acc: the head's query, done with.
    float* __restrict acc = qf + i * hd;
    std::fill(acc, acc + hd, 0.0f);
    for (s = lo; s < hi; s++) {
      const float w = e[s];
      if (w == 0) continue;
      const T* __restrict v = vh + s * vstride;
      for (int64_t d = 0; d < hd; d++) acc[d] += w * load(v + d);
    }
    for (int64_t d = 0; d < hd; d++) store(oi + d, acc[d] * inv);
  }
}

// Query heads a work item takes of the G sharing a key-value head (`groups` such groups, `threads` threads): all G,
// halved while that leaves a thread without work.
inline int64_t heads_per_item(int64_t G, int64_t groups, int64_t threads) {
  int64_t n = G;
  while (n % 2 == 0 && groups * (G / n) < threads) n /= 2;
  return n;
}

// One query per row attending to S cache slots: q [B, H, 1, hd], keys and values [B, Hkv, S, hd] (any strides but
// the last dim's), mask [B, 1, 1, S] -> out [B, H, 1, hd].
template <typename T>
void attend(const T* q, const T* k, const T* v, const bool* mask, int64_t B, int64_t H, int64_t Hkv, int64_t S,
            int64_t hd, const int64_t* qs, const int64_t* ks, const int64_t* vs, const int64_t* ms, float scale,
            T* out) {
  const int64_t n = heads_per_item(H / Hkv, B * Hkv, omp_get_max_threads());  // query heads an item takes
#pragma omp parallel
  {
    std::vector<float> p(n * S), qf(n * hd);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < B * H / n; item++) {
      const int64_t b = item / (H / n), h = item % (H / n) * n, g = h / (H / Hkv);  // g: the heads' key-value head
      attend_heads(q + b * qs[0] + h * qs[1], qs[1], n, k + b * ks[0] + g * ks[1], v + b * vs[0] + g * vs[1],
                   mask + b * ms[0], S, hd, ks[2], vs[2], ms[3], scale, p.data(), qf.data(), out + (b * H + h) * hd,
                   hd);
    }
  }
}

at::Tensor attend_row(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask,
                      double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && keys.dim() == 4 && values.sizes() == keys.sizes() &&
                  keys.size(0) == q.size(0) && keys.size(3) == q.size(3) && q.size(1) % keys.size(1) == 0,
              "attend_row: q [B, H, 1, hd], keys and values [B, Hkv, S, hd]");
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == q.size(0) && mask.size(3) == keys.size(2) &&
                  mask.scalar_type() == at::kBool, "attend_row: mask [B, 1, 1, S] bool");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && q.scalar_type() == values.scalar_type(),
              "attend_row: q, keys and values share one dtype");
  TORCH_CHECK(q.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1, "attend_row: rows of hd in a row");
  const int64_t B = q.size(0), H = q.size(1), Hkv = keys.size(1), S = keys.size(2), hd = q.size(3);
  auto out = at::empty({B, H, 1, hd}, q.options());
  const bool* m = mask.data_ptr<bool>();
  by_dtype(q, "attend_row", [&](auto p) {
    attend(p(q), p(keys), p(values), m, B, H, Hkv, S, hd, q.strides().data(), keys.strides().data(),
           values.strides().data(), mask.strides().data(), static_cast<float>(scale), p(out));
  });
  return out;
}


// norm_rope of a head of V vectors (hd = V W, V even) in registers, the same operations in the same order as below
// (below, the normed head goes through memory between the two halves' rotations).
template <int V, typename T>
void norm_rope_in_registers(const T* x, const T* w, float eps, const T* cos, const T* sin, T* out) {
  vf y[V], a0 = {}, a1 = {};
  for (int v = 0; v < V; v += 2) {
    y[v] = vload_as(x + v * W);
    y[v + 1] = vload_as(x + (v + 1) * W);
    a0 = vfma(y[v], y[v], a0);
    a1 = vfma(y[v + 1], y[v + 1], a1);
  }
  const float r = 1.0f / std::sqrt(vsum(a0 + a1) / (V * W) + eps);
  for (int v = 0; v < V; v++) y[v] = vround(vload_as(w + v * W) * vround(y[v] * r, x), x);
  for (int v = 0; v < V; v++) {
    const vf rot = v < V / 2 ? -y[v + V / 2] : y[v - V / 2];
    vstore_to(out + v * W, vround(y[v] * vload_as(cos + v * W), out) + vround(rot * vload_as(sin + v * W), out));
  }
}

// A head's RMSNorm then rotary embedding, rounded as the torch model rounds each operation (T: the weights' dtype):
// n = x * rsqrt(mean(x^2) + eps) -> T, y = w * n -> T, out = (y * cos -> T) + (rotate_half(y) * sin -> T) -> T.
template <typename T>
void norm_rope(const T* x, const T* w, float eps, const T* cos, const T* sin, int64_t hd, float* y, T* out) {
  if (hd == 4 * W) return norm_rope_in_registers<4>(x, w, eps, cos, sin, out);
  if (hd == 8 * W) return norm_rope_in_registers<8>(x, w, eps, cos, sin, out);
  rms_norm(x, w, eps, hd, y);
  const int64_t half = hd / 2;
  if (half % W == 0) {  // in vectors: each one's lanes all in one half
    for (int64_t d = 0; d < hd; d += W) {
      const vf rot = d < half ? -vload(y + d + half) : vload(y + d - half);
      vstore_to(out + d, vround(vload(y + d) * vload_as(cos + d), out) + vround(rot * vload_as(sin + d), out));
    }
    return;
  }
  for (int64_t d = 0; d < hd; d++) {
    const float rot = d < half ? -y[d + half] : y[d - half];
    store(out + d, round_to(y[d] * load(cos + d), out) + round_to(rot * load(sin + d), out));
  }
}

// One token's attention block with its norm and residual, in one parallel region: xn = rms_norm(x); q, k, v = xn's
// products with wq, wk, wv; q and k normed per head and rotated; k and v written to the cache's slot; each query head
// against the cache's first S slots (mask); out [D] = x + the heads' outputs through wo. cache_k and cache_v: the
// layer's [Hkv, slots, hd]; qkv: scratch for (H + 2 Hkv) hd elements, o for H hd.
template <typename T>
void attention_block(const T* x, const T* norm, float norm_eps, const T* wq, const T* wk, const T* wv,
                     const T* q_norm, const T* k_norm, float eps, const T* cos, const T* sin, T* cache_k, T* cache_v,
                     int64_t slot, int64_t slot_stride, int64_t head_stride, const bool* mask, int64_t mstride,
                     int64_t S, float scale, const T* wo, int64_t D, int64_t H, int64_t Hkv, int64_t hd, T* qkv, T* o,
                     T* out) {
  const int64_t Nq = H * hd, Nkv = Hkv * hd;
  const int64_t heads = heads_per_item(H / Hkv, Hkv, omp_get_max_threads());  // query heads an item takes
#pragma omp parallel
  {
    std::vector<float> p(heads * S), acc(heads * hd), tmp;
    std::vector<T> xn;
    normed(x, norm, norm_eps, D, tmp, xn);  // every thread its own copy: no wait
#pragma omp for schedule(static)
    for (int64_t n = 0; n < Nq + 2 * Nkv; n++) {
      const T* w = n < Nq ? wq + n * D : n < Nq + Nkv ? wk + (n - Nq) * D : wv + (n - Nq - Nkv) * D;
      store(qkv + n, dot(w, xn.data(), D));
    }
#pragma omp for schedule(static)
    for (int64_t j = 0; j < H + 2 * Hkv; j++) {  // each head: q normed and rotated in place, k and v to the cache
      if (j < H) {
        norm_rope(qkv + j * hd, q_norm, eps, cos, sin, hd, acc.data(), qkv + j * hd);
      } else if (j < H + Hkv) {
        norm_rope(qkv + j * hd, k_norm, eps, cos, sin, hd, acc.data(),
                  cache_k + (j - H) * head_stride + slot * slot_stride);
      } else {
        std::memcpy(cache_v + (j - H - Hkv) * head_stride + slot * slot_stride, qkv + j * hd, hd * sizeof(T));
      }
    }
#pragma omp for schedule(static)
    for (int64_t h = 0; h < H; h += heads) {
      const int64_t g = h / (H / Hkv);
      attend_heads(qkv + h * hd, hd, heads, cache_k + g * head_stride, cache_v + g * head_stride, mask, S, hd,
                   slot_stride, slot_stride, mstride, scale, p.data(), acc.data(), o + h * hd, hd);
    }
#pragma omp for schedule(static)
    for (int64_t d = 0; d < D; d++) store(out + d, load(x + d) + round_to(dot(wo + d * Nq, o, Nq), out));
  }
}


at::Tensor attention_decode(const at::Tensor& x_, const at::Tensor& norm_, double norm_eps, const at::Tensor& wq_,
                            const at::Tensor& wk_, const at::Tensor& wv_, const at::Tensor& q_norm_,
                            const at::Tensor& k_norm_, double eps, const at::Tensor& cos_,
                            const at::Tensor& sin_, at::Tensor& cache_k, at::Tensor& cache_v, int64_t layer,
                            const at::Tensor& slot, const at::Tensor& mask, double scale, const at::Tensor& wo_) {
  const char* shapes = "attention_decode: x [1, D], norm [D], wq [H hd, D], wk and wv [Hkv hd, D], q_norm and "
                       "k_norm [hd], cos and sin of hd elements, caches [L, 1, Hkv, slots, hd], slot [1], "
                       "mask [1, 1, 1, S] bool, wo [D, H hd]";
  TORCH_CHECK(x_.dim() == 2 && x_.size(0) == 1 && cache_k.dim() == 5 && cache_k.size(1) == 1 &&
                  cache_v.sizes() == cache_k.sizes() && slot.numel() == 1 && slot.scalar_type() == at::kLong &&
                  mask.dim() == 4 && mask.scalar_type() == at::kBool && mask.size(3) <= cache_k.size(3),
              shapes);
  const int64_t D = x_.size(1), hd = cache_k.size(4), Hkv = cache_k.size(2), H = wq_.size(0) / hd;
  TORCH_CHECK(wq_.dim() == 2 && wq_.size(1) == D && H * hd == wq_.size(0) && H % Hkv == 0 && hd % 2 == 0 &&
                  wk_.sizes() == wv_.sizes() && wk_.size(0) == Hkv * hd && wk_.size(1) == D && q_norm_.numel() == hd &&
                  k_norm_.numel() == hd && cos_.numel() == hd && sin_.numel() == hd && wo_.dim() == 2 &&
                  wo_.size(0) == D && wo_.size(1) == H * hd && norm_.numel() == D,
              shapes);
  const std::array<const at::Tensor*, 11> same = {&norm_, &wq_,     &wk_,     &wv_,     &q_norm_, &k_norm_,
                                                  &cos_,  &sin_,    &cache_k, &cache_v, &wo_};
  for (const at::Tensor* t : same)
    TORCH_CHECK(t->scalar_type() == x_.scalar_type(), "attention_decode: every tensor but slot and mask in x's dtype");
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous(), "attention_decode: contiguous caches");
  TORCH_CHECK(0 <= layer && layer < cache_k.size(0), "attention_decode: layer out of range");
  const int64_t s = *slot.data_ptr<int64_t>();  // (item() is a dispatcher call)
  TORCH_CHECK(0 <= s && s < mask.size(3), "attention_decode: the slot lies outside the mask's slots");
  const at::Tensor x = x_.contiguous(), norm = norm_.contiguous(), wq = wq_.contiguous(), wk = wk_.contiguous(),
                   wv = wv_.contiguous(), q_norm = q_norm_.contiguous(), k_norm = k_norm_.contiguous(),
                   cos = cos_.contiguous(), sin = sin_.contiguous(), wo = wo_.contiguous();  // (no copies in decode)
  auto out = at::empty_like(x);
  float* scratch = scratch_floats((2 * H + 2 * Hkv) * hd);  // (bfloat16 uses half of it)
  by_dtype(x, "attention_decode", [&](auto p) {
    auto qkv = reinterpret_cast<decltype(p(x))>(scratch);
    attention_block(p(x), p(norm), static_cast<float>(norm_eps), p(wq), p(wk), p(wv), p(q_norm), p(k_norm),
                    static_cast<float>(eps), p(cos), p(sin), p(cache_k) + layer * cache_k.stride(0),
                    p(cache_v) + layer * cache_v.stride(0), s, cache_k.stride(3), cache_k.stride(2),
                    mask.data_ptr<bool>(), mask.stride(3), mask.size(3),
                    static_cast<float>(scale), p(wo), D, H, Hkv, hd, qkv, qkv + (H + 2 * Hkv) * hd, p(out));
  });
  return out;
}


// A prompt's q, k and v after their products: q and k normed per head and rotated (norm_rope: the torch model's
// roundings), k and v written into the layer's cache at their slots; q returned as [B, H, T, hd] (a view of
// [B, T, H, hd], as the torch model's). In the torch model that is ~20 operations a layer (two norms of ~7, the
// rotations, the cache's index_put_), each a pass over the prompt's q or k.
at::Tensor qk_norm_rope(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& q_norm_,
                        const at::Tensor& k_norm_, double eps, const at::Tensor& cos_, const at::Tensor& sin_,
                        at::Tensor& cache_k, at::Tensor& cache_v, int64_t layer, const at::Tensor& slots_) {
  const char* shapes = "qk_norm_rope: q [B, T, H hd], k and v [B, T, Hkv hd] (rows of any stride), q_norm and k_norm "
                       "[hd], cos and sin [B, T, hd], caches [L, >= B, Hkv, slots, hd], slots [T] int64";
  TORCH_CHECK(q_.dim() == 3 && k_.dim() == 3 && v_.sizes() == k_.sizes() && cache_k.dim() == 5 &&
                  cache_v.sizes() == cache_k.sizes() && slots_.dim() == 1 && slots_.scalar_type() == at::kLong,
              shapes);
  const int64_t B = q_.size(0), T = q_.size(1), Hkv = cache_k.size(2), hd = cache_k.size(4),
                H = q_.size(2) / hd;
  TORCH_CHECK(k_.size(0) == B && k_.size(1) == T && cache_k.size(1) >= B && k_.size(2) == Hkv * hd &&
                  q_.size(2) == H * hd && hd % 2 == 0 && q_norm_.numel() == hd && k_norm_.numel() == hd &&
                  cos_.numel() == B * T * hd && sin_.numel() == B * T * hd && slots_.size(0) == T &&
                  q_.stride(2) == 1 && k_.stride(2) == 1 && v_.stride(2) == 1,
              shapes);
  const std::array<const at::Tensor*, 8> same = {&k_, &v_, &q_norm_, &k_norm_, &cos_, &sin_, &cache_k, &cache_v};
  for (const at::Tensor* t : same)
    TORCH_CHECK(t->scalar_type() == q_.scalar_type(), "qk_norm_rope: every tensor but slots in q's dtype");
  TORCH_CHECK(cache_k.is_contiguous() && cache_v.is_contiguous(), "qk_norm_rope: contiguous caches");
  TORCH_CHECK(0 <= layer && layer < cache_k.size(0), "qk_norm_rope: layer out of range");
  const at::Tensor slots = slots_.contiguous(), q_norm = q_norm_.contiguous(), k_norm = k_norm_.contiguous(),
                   cos = cos_.contiguous(), sin = sin_.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; t++)
    TORCH_CHECK(0 <= sp[t] && sp[t] < cache_k.size(3), "qk_norm_rope: slot ", sp[t], " out of range");
  auto out = at::empty({B, T, H, hd}, q_.options());
  by_dtype(q_, "qk_norm_rope", [&](auto p) {
    const auto *q = p(q_), *k = p(k_), *v = p(v_), *qn = p(q_norm), *kn = p(k_norm), *c = p(cos), *sn = p(sin);
    auto *ck = p(cache_k) + layer * cache_k.stride(0), *cv = p(cache_v) + layer * cache_v.stride(0), *o = p(out);
    const int64_t cb = cache_k.stride(1), ch = cache_k.stride(2), cs = cache_k.stride(3);
#pragma omp parallel
    {
      std::vector<float> y(hd);
#pragma omp for schedule(static)
      for (int64_t bt = 0; bt < B * T; bt++) {
        const int64_t b = bt / T, t = bt % T;
        const auto *cr = c + bt * hd, *sr = sn + bt * hd;
        for (int64_t h = 0; h < H; h++)
          norm_rope(q + b * q_.stride(0) + t * q_.stride(1) + h * hd, qn, static_cast<float>(eps), cr, sr, hd,
                    y.data(), o + (bt * H + h) * hd);
        for (int64_t h = 0; h < Hkv; h++) {
          const int64_t at = b * cb + h * ch + sp[t] * cs;
          norm_rope(k + b * k_.stride(0) + t * k_.stride(1) + h * hd, kn, static_cast<float>(eps), cr, sr, hd,
                    y.data(), ck + at);
          std::memcpy(cv + at, v + b * v_.stride(0) + t * v_.stride(1) + h * hd, hd * sizeof(*cv));
        }
      }
    }
  });
  return out.transpose(1, 2);
}

// RMSNorm of each row of x [..., D] (a prompt's, eager): the torch model's RMSNorm.forward in one pass (~7 operations
// there), rows shared among the threads.
at::Tensor rms_norm_rows(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  TORCH_CHECK(x_.dim() >= 1 && w_.dim() == 1 && x_.size(-1) == w_.size(0) && x_.scalar_type() == w_.scalar_type(),
              "rms_norm_rows: x [..., D] and w [D] of one dtype");
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  const int64_t D = w.size(0), rows = D == 0 ? 0 : x.numel() / D;
  auto out = at::empty_like(x);
  by_dtype(x, "rms_norm_rows", [&](auto p) {
    const auto *px = p(x), *pw = p(w);
    auto* po = p(out);
#pragma omp parallel
    {
      std::vector<float> y(D);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < rows; r++) {
        rms_norm_to(px + r * D, pw, static_cast<float>(eps), D, y.data(), po + r * D);
      }
    }
  });
  return out;
}

// ---- Register tiles of bfloat16 pairs (AVX512-BF16) ---------------------------------------------------------
// out[r][0:16 C] = sum_k x[r][k] w[k][0:16 C] for R rows of x (bfloat16, row stride xs, K even) and w as pairs: row
// p of w ([., ws, 2], stride 2 ws) holds the weights of k = 2p and 2p + 1 of each column side by side. vdpbf16ps adds
// a pair of products of bfloat16 (exact in float32) to each of 16 float32 sums: twice float32 FMA's multiply-adds
// an instruction. With `ahead`, asks the L2 cache for its first `lines` lines over the steps, as `tile` does.
#if defined(__AVX512BF16__)
constexpr bool BF16_PANELS = true;

template <int R, int C>
void tile_bf16(const uint16_t* x, int64_t xs, int64_t K, const uint16_t* w, int64_t ws, const char* ahead,
               int64_t lines, float* out, int64_t os) {
  constexpr int KU = 4;  // pairs a step between the L2 requests
  __m512 acc[R][C];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  const uint64_t step = ahead != nullptr && pairs > 0 ? (static_cast<uint64_t>(lines) << 16) / pairs * KU : 0;
  uint64_t at = 0;
  int64_t asked = 0, p = 0;
  auto multiply_add = [&](int64_t p) __attribute__((always_inline)) {
    __m512bh wk[C];
    for (int c = 0; c < C; c++) wk[c] = (__m512bh)_mm512_loadu_si512(w + (p * ws + c * 16) * 2);
    for (int r = 0; r < R; r++) {
      int32_t pair;
      std::memcpy(&pair, x + r * xs + 2 * p, sizeof pair);
      const __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
      for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xr, wk[c]);
    }
  };
  for (; p + KU <= pairs; p += KU) {
    if (ahead != nullptr)
      for (const int64_t to = static_cast<int64_t>((at += step) >> 16); asked < to; asked++)
        _mm_prefetch(ahead + asked * 64, _MM_HINT_T1);
#pragma GCC unroll 4
    for (int u = 0; u < KU; u++) multiply_add(p + u);
  }
  for (; p < pairs; p++) multiply_add(p);
  for (; ahead != nullptr && asked < lines; asked++) _mm_prefetch(ahead + asked * 64, _MM_HINT_T1);
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) _mm512_storeu_ps(out + r * os + c * 16, acc[r][c]);
}
#else
constexpr bool BF16_PANELS = false;

template <int R, int C>  // (unreachable: every caller stands behind BF16_PANELS)
void tile_bf16(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, const char*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "bfloat16 pairs need AVX512-BF16");
}
#endif

// ---- AMX tiles (Intel's Advanced Matrix Extensions) --------------------------------------------------------
// On a core with AMX a bfloat16 product goes through its tile registers: one tdpbf16ps multiplies a 16 x 32 tile of
// rows by a 32 x 16 tile of weights (pairs, as tile_bf16's) into 16 x 16 float32 sums: 8192 multiply-adds an
// instruction, where a vdpbf16ps does 32 (and on Intel's cores at half the rate of float32 FMAs). Each operand is
// loaded 1 KiB at a time: the weights are kept in tile order, each tile's 16 rows of 64 bytes one after another
// (panels [N / NB, K / 32, NB / 16, 16, 32]: pair_panels in cpu_ops.py), and so are the rows moe_prompt gathers
// (tiled_at); linear_panels loads its x's rows strided (a copy in tile order cost more than it saved). Against the
// same tiles loaded strided from panels of pairs, a prompt's experts 1.14-1.18x faster (moebench-speed's layer, the
// Emerald Rapids VM, in-process A/B).
// amx_tile computes up to AMX_ROWS rows against a whole panel of NB columns: two row tiles (A: tiles 4 and 5) by two
// column tiles of weights (B: 6 and 7) into four tiles of sums (0-3), for each half of the panel in turn. Every tile
// is 16 rows of 64 bytes: a last row tile of fewer rows computes the padding rows after them too (their sums unread),
// so the configuration stays one; K must be a multiple of 32 (pair_depth()). AmxTiles loads the configuration when a
// thread first computes in a parallel region (the library's own AMX kernels load theirs in between) and releases the
// tiles when it ends. Linux must first let the process use the tiles (amx_permitted: arch_prctl; the library asks
// the same).
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
constexpr bool AMX_TILES = true;
constexpr int64_t AMX_ROWS = 32;
thread_local bool amx_configured = false;

bool amx_permitted() {
  static const bool permitted = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return permitted;
}

struct AmxTiles {
  AmxTiles() { amx_configured = false; }
  ~AmxTiles() {
    if (amx_configured) _tile_release();
    amx_configured = false;
  }
};

// (ldtilecfg by inline assembly that reads the whole 64 bytes: GCC 12's _tile_loadconfig tells the compiler that it
// reads 8, and a build that inlined it dropped the stores of the rows and widths as dead: SIGILL at the first tile.
// Its _tile_loadd declares no memory read at all: tiles_read() tells the compiler, before a product's first load, that
// memory is read, so that the stores of the rows before it are neither moved past the loads nor dropped.)
inline void tiles_read() { asm volatile("" : : : "memory"); }

inline void amx_configure() {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config = {};
  config.palette = 1;
  for (int t = 0; t < 8; t++) config.colsb[t] = 64, config.rows[t] = 16;
  asm volatile("ldtilecfg %0" : : "m"(config));
  amx_configured = true;
}

// out [rows, C] (row stride os; rows rounded up to 16) = x [rows, K] @ panel [K / 32, C / 16, 16, 32] (C: NB), rows
// <= AMX_ROWS, x in tile order (from the first of its row tiles) or row-major (`tiled` false: strided loads), asking
// the L2 cache for `lines` lines from `ahead` over the steps (as tile_bf16).
template <int C>
inline void amx_tile(const uint16_t* x, bool tiled, int64_t rows, int64_t K, const uint16_t* w, const char* ahead,
                     int64_t lines, float* out, int64_t os) {
  if (!amx_configured) amx_configure();
  tiles_read();
  const bool two = rows > 16;
  const uint16_t* x1 = x + 16 * K;  // the second row tile (in either layout)
  const int64_t step_a = tiled ? 16 : 1, stride_a = tiled ? 64 : K * 2;  // (a tile's 32 columns; its rows)
  const int64_t steps = K / 32 * (C / 32);  // a step: 32 of K for 32 columns
  const uint64_t step = ahead != nullptr && steps > 0 ? (static_cast<uint64_t>(lines) << 16) / steps : 0;
  uint64_t at = 0;
  int64_t asked = 0;
  for (int64_t c = 0; c < C; c += 32) {
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t k = 0; k < K; k += 32) {
      if (ahead != nullptr)
        for (const int64_t to = static_cast<int64_t>((at += step) >> 16); asked < to; asked++)
          _mm_prefetch(ahead + asked * 64, _MM_HINT_T1);
      const uint16_t* b = w + (k / 32 * (C / 16) + c / 16) * 512;
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + 512, 64);
      _tile_loadd(4, x + k * step_a, stride_a);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (two) {
        _tile_loadd(5, x1 + k * step_a, stride_a);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, out + c, os * 4);
    _tile_stored(1, out + c + 16, os * 4);
    if (two) {
      _tile_stored(2, out + 16 * os + c, os * 4);
      _tile_stored(3, out + 16 * os + c + 16, os * 4);
    }
  }
  for (; ahead != nullptr && asked < lines; asked++) _mm_prefetch(ahead + asked * 64, _MM_HINT_T1);
}

// c [M, N] (row stride ldc) = a [M, K] (row stride lda) @ b, b as pairs: row p (stride 2 ldb) holds the weights of k =
// 2p and 2p + 1 of each column side by side (tile_bf16's layout); M and N multiples of 16, K of 32. Attention's two
// products: 16 rows at a time, two column tiles at a time.
inline void amx_product(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float* c, int64_t ldc,
                        int64_t M, int64_t N, int64_t K) {
  if (!amx_configured) amx_configure();
  tiles_read();
  for (int64_t m = 0; m < M; m += 16)
    for (int64_t n = 0; n < N; n += 32) {
      const bool two = n + 16 < N;
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t k = 0; k < K; k += 32) {
        _tile_loadd(4, a + m * lda + k, lda * 2);
        _tile_loadd(6, b + (k / 2 * ldb + n) * 2, ldb * 4);
        _tile_dpbf16ps(0, 4, 6);
        if (two) {
          _tile_loadd(7, b + (k / 2 * ldb + n + 16) * 2, ldb * 4);
          _tile_dpbf16ps(1, 4, 7);
        }
      }
      _tile_stored(0, c + m * ldc + n, ldc * 4);
      if (two) _tile_stored(1, c + m * ldc + n + 16, ldc * 4);
    }
}
#else
constexpr bool AMX_TILES = false;
constexpr int64_t AMX_ROWS = 1;
bool amx_permitted() { return false; }
struct AmxTiles {};

template <int C>
inline void amx_tile(const uint16_t*, bool, int64_t, int64_t, const uint16_t*, const char*, int64_t, float*,
                     int64_t) {  // (unreachable: every caller stands behind AMX_TILES)
  TORCH_CHECK(false, "AMX tiles need AMX");
}

inline void amx_product(const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, int64_t, int64_t,
                        int64_t) {  // (as amx_tile)
  TORCH_CHECK(false, "AMX tiles need AMX");
}
#endif

// Element (r, c) of a matrix [M, K] in tile order: tile (r / 16, c / 32) at (r / 16 K / 32 + c / 32) 512.
inline int64_t tiled_at(int64_t r, int64_t c, int64_t K) {
  return (r / 16 * (K / 32) + c / 32) * 512 + r % 16 * 32 + c % 32;
}

// What K bfloat16 panels of pairs need to be a multiple of here: 2 (tile_bf16), 32 (AMX tiles); 0: none are taken.
int64_t pair_depth() { return !BF16_PANELS ? 0 : !AMX_TILES ? 2 : amx_permitted() ? 32 : 0; }

// ---- Attention of many queries (context encoding) -------------------------------------------------------------
// The library's CPU flash attention runs its tiles through MKL (~160 GFLOP/s on the Zen 5 VM for a 402-token
// prompt, counting every key; half of them are masked). Here each work item is one head's block of MQ queries
// against the key range its mask lets it see: scores by register tiles (the keys transposed once per call),
// softmax in float32, the weighted sum of values by register tiles. bfloat16 inputs are widened to float32 as they
// are packed and the arithmetic is float32 throughout, the output rounded once; with AVX512-BF16 they stay bfloat16
// instead, both products on pairs (tile_bf16; a 402-token prompt's attention 16.7 -> 11.0 ms on the Zen 4 VM).

constexpr int KB = 2 * W;                // keys per block of scores
constexpr int QK_R = W == 16 ? 8 : 6;    // query rows of a score tile: QK_R x KB scores in registers
constexpr int PV_R = W == 16 ? 6 : 2;    // query rows of an output tile: PV_R x PV_C outputs in registers
constexpr int PV_C = 4 * W;              // output columns of a tile (the values' rows are padded to a multiple)
constexpr int MQ = 48;                   // queries per work item, a multiple of QK_R and PV_R

// out[r][0:C W] = sum_k x[r][k] w[k][0:C W] for R rows of x (row stride K) and rows of w (stride ws): R x C vectors of
// sums in registers. With `ahead`, asks the L2 cache for its first `lines` cache lines, evenly over the K steps: a few
// every KU steps (16.16 fixed point), outside the unrolled multiply-adds. (Asked for at every step, the bookkeeping
// took ports and registers the products need: a prompt's experts ~10% slower on the Xeon VM.)
template <int R, int C>
void tile(const float* x, int64_t K, const float* w, int64_t ws, const char* ahead, int64_t lines, float* out,
          int64_t os) {
  constexpr int KU = 8;
  vf acc[R][C] = {};
  const uint64_t step = ahead != nullptr && K > 0 ? (static_cast<uint64_t>(lines) << 16) / K * KU : 0;
  uint64_t at = 0;
  int64_t asked = 0, k = 0;
  auto multiply_add = [&](int64_t k) __attribute__((always_inline)) {
    vf wk[C];
    for (int c = 0; c < C; c++) wk[c] = vload(w + k * ws + c * W);
    for (int r = 0; r < R; r++) {
      const vf xr = vbroadcast(x + r * K + k);
      for (int c = 0; c < C; c++) acc[r][c] = vfma(xr, wk[c], acc[r][c]);
    }
  };
  for (; k + KU <= K; k += KU) {
    if (ahead != nullptr)
      for (const int64_t to = static_cast<int64_t>((at += step) >> 16); asked < to; asked++)
        _mm_prefetch(ahead + asked * 64, _MM_HINT_T1);
#pragma GCC unroll 8
    for (int u = 0; u < KU; u++) multiply_add(k + u);
  }
  for (; k < K; k++) multiply_add(k);
  for (; ahead != nullptr && asked < lines; asked++) _mm_prefetch(ahead + asked * 64, _MM_HINT_T1);
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) vstore(out + r * os + c * W, acc[r][c]);
}

// o[r][0:PV_C] = sum_j p[r][j] v[j][0:PV_C] over n keys, for R rows of p (row stride Sp) and rows of v (stride hdp).
template <int R>
inline void value_tile(const float* p, int64_t Sp, const float* v, int64_t hdp, int64_t n, float* o) {
  vf acc[R][4] = {};
  for (int64_t j = 0; j < n; j++) {
    const float* vj = v + j * hdp;
    const vf v0 = vload(vj), v1 = vload(vj + W), v2 = vload(vj + 2 * W), v3 = vload(vj + 3 * W);
    for (int r = 0; r < R; r++) {
      const vf pr = vbroadcast(p + r * Sp + j);
      acc[r][0] = vfma(pr, v0, acc[r][0]);
      acc[r][1] = vfma(pr, v1, acc[r][1]);
      acc[r][2] = vfma(pr, v2, acc[r][2]);
      acc[r][3] = vfma(pr, v3, acc[r][3]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < 4; c++) vstore(o + r * hdp + c * W, acc[r][c]);
}

// Lanes j..j+W-1 of a mask row (stride apart): nonzero where the key is seen (keys from S on are not).
inline vi seen_lanes(const bool* row, int64_t j, int64_t S, int64_t stride) {
  if (stride == 1 && j + W <= S) {  // the W bytes zero-extended in one instruction (GCC's own conversion of a byte
                                    // vector took ~60 scalar ones: ~20% of a prompt's attention)
#if defined(__AVX512F__)
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
#elif defined(__AVX2__)
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
#else
    typedef uint8_t vb __attribute__((vector_size(W)));
    vb bytes;
    std::memcpy(&bytes, row + j, W);
    return __builtin_convertvector(bytes, vi);
#endif
  }
  vi lanes = {};
  for (int l = 0; l < W; l++) lanes[l] = j + l < S && row[(j + l) * stride];
  return lanes;
}

// The first j in [lo, hi) where a mask row (stride apart) is set, or hi; the last, or lo - 1. Eight bytes at a time
// where the row's bytes are in a row (a causal prompt's rows: ~S^2 / 2 bytes read one at a time were ~3% of its
// attention).
inline int64_t first_seen(const bool* row, int64_t lo, int64_t hi, int64_t stride) {
  int64_t j = lo;
  for (uint64_t w; stride == 1 && j + 8 <= hi; j += 8)
    if (std::memcpy(&w, row + j, 8), w) return j + __builtin_ctzll(w) / 8;
  for (; j < hi; j++)
    if (row[j * stride]) return j;
  return hi;
}
inline int64_t last_seen(const bool* row, int64_t lo, int64_t hi, int64_t stride) {
  int64_t j = hi;
  for (uint64_t w; stride == 1 && j - 8 >= lo; j -= 8)
    if (std::memcpy(&w, row + j - 8, 8), w) return j - 8 + (63 - __builtin_clzll(w)) / 8;
  for (j--; j >= lo; j--)
    if (row[j * stride]) return j;
  return lo - 1;
}

// out[2 d + 0/1] = a[d], b[d] for d < n (b null: zeros): two rows of values side by side, as tile_bf16's pairs.
inline void interleave(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* out) {
  int64_t d = 0;
#if defined(__AVX512BW__)
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                      5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0),
                hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (; d + 32 <= n; d += 32) {
    const __m512i x = _mm512_loadu_si512(a + d), y = b != nullptr ? _mm512_loadu_si512(b + d) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + 2 * d, _mm512_permutex2var_epi16(x, lo, y));
    _mm512_storeu_si512(out + 2 * d + 32, _mm512_permutex2var_epi16(x, hi, y));
  }
#endif
  for (; d < n; d++) {
    out[2 * d] = a[d];
    out[2 * d + 1] = b != nullptr ? b[d] : 0;
  }
}

// q [B, H, T, hd], k and v [B, Hkv, S, hd], mask [B, ., T, S] (any strides but the rows': *s are the strides) ->
// out [B, T, H, hd] contiguous.
template <typename T>
void attend_many(const T* q, const T* k, const T* v, const bool* mask, int64_t B, int64_t H, int64_t Hkv,
                 int64_t Tq, int64_t S, int64_t hd, const int64_t* qs, const int64_t* ks, const int64_t* vs,
                 const int64_t* ms, float scale, T* out) {
  const int64_t Sp = (S + KB - 1) / KB * KB, hdp = (hd + PV_C - 1) / PV_C * PV_C, nq = (Tq + MQ - 1) / MQ;
  // bfloat16 with AVX512-BF16: the products on pairs (tile_bf16), the keys as pairs along hd ([hd / 2, Sp, 2]), the
  // values as pairs along the keys ([Sp / 2, hdp, 2]), the probabilities rounded to bfloat16 as the library's
  // attention rounds them for its second product; the scale applied to the scores.
  constexpr bool BF16_DOTS = BF16_PANELS && std::is_same_v<T, uint16_t>;
  const bool pairs = BF16_DOTS && hd % 2 == 0;
  // ... with AMX, both products on its tiles (amx_product), 16 rows at a time
  const bool amx = pairs && AMX_TILES && hd % 32 == 0 && pair_depth() == 32;
  const int64_t widened = pairs ? 0 : B * Hkv * Sp, paired = pairs ? B * Hkv * Sp : 0;
  // Keys transposed, values padded: float32 (every element written below, no zeros first).
  const auto kt = std::make_unique_for_overwrite<float[]>(widened * hd);
  const auto vp = std::make_unique_for_overwrite<float[]>(widened * hdp);
  const auto kp = std::make_unique_for_overwrite<uint16_t[]>(paired * hd);  // (the same: every element written)
  const auto vq = std::make_unique_for_overwrite<uint16_t[]>(paired * hdp);
  std::vector<int64_t> lo(B * nq), hi(B * nq);  // the key range each block of queries sees (multiples of KB)
  std::vector<int64_t> ends(B * Tq);             // each query's: one past its last seen key, rounded up to W
  auto row = [&](int64_t b, int64_t t) { return mask + b * ms[0] + t * ms[2]; };
#pragma omp parallel
  {
#pragma omp for schedule(static) nowait
    for (int64_t bg = 0; bg < B * Hkv; bg++) {
      const T *kh = k + bg / Hkv * ks[0] + bg % Hkv * ks[1], *vh = v + bg / Hkv * vs[0] + bg % Hkv * vs[1];
      if constexpr (BF16_DOTS) {
        if (pairs) {
          uint16_t *kpg = kp.get() + bg * hd * Sp, *vqg = vq.get() + bg * Sp * hdp;
          for (int64_t j = 0; j < S; j++)  // each key's hd / 2 pairs, one 32-bit copy each
            for (int64_t d = 0; d < hd; d += 2) std::memcpy(kpg + (d / 2 * Sp + j) * 2, kh + j * ks[2] + d, 4);
          for (int64_t d = 0; d < hd; d += 2)  // (zeros past the last key)
            std::fill(kpg + (d / 2 * Sp + S) * 2, kpg + (d / 2 * Sp + Sp) * 2, uint16_t{0});
          for (int64_t j = 0; j < Sp; j += 2) {  // rows j and j + 1 side by side (zeros past the last and past hd)
            uint16_t* row = vqg + j / 2 * hdp * 2;
            const int64_t n = j < S ? hd : 0;
            if (n) interleave(vh + j * vs[2], j + 1 < S ? vh + (j + 1) * vs[2] : nullptr, hd, row);
            std::fill(row + 2 * n, row + 2 * hdp, uint16_t{0});
          }
          continue;
        }
      }
      float *ktg = kt.get() + bg * hd * Sp, *vpg = vp.get() + bg * Sp * hdp;
      for (int64_t j0 = 0; j0 < Sp; j0 += W)  // W keys at a time: their rows stay in L1 while each d's W are written
        for (int64_t d = 0; d < hd; d++)
          for (int64_t j = j0; j < j0 + W; j++) ktg[d * Sp + j] = j < S ? load(kh + j * ks[2] + d) : 0.0f;
      for (int64_t j = 0; j < Sp; j++) {  // (zeros past the last key and past hd)
        const int64_t n = j < S ? hd : 0;
        for (int64_t d = 0; d < n; d++) vpg[j * hdp + d] = load(vh + j * vs[2] + d);
        std::fill(vpg + j * hdp + n, vpg + (j + 1) * hdp, 0.0f);
      }
    }
#pragma omp for schedule(static)
    for (int64_t bq = 0; bq < B * nq; bq++) {
      const int64_t b = bq / nq, t0 = bq % nq * MQ, t1 = std::min(t0 + MQ, Tq);
      int64_t first = S, last = -1;
      for (int64_t t = t0; t < t1; t++) {
        first = first_seen(row(b, t), 0, first, ms[3]);
        last = std::max(last, last_seen(row(b, t), last + 1, S, ms[3]));
      }
      lo[bq] = first / KB * KB;
      hi[bq] = last < first ? lo[bq] : (last / KB + 1) * KB;
      for (int64_t t = t0; t < t1; t++) {  // (from the block's last key down: a causal row's few steps)
        const int64_t j = last_seen(row(b, t), first, last + 1, ms[3]);
        ends[b * Tq + t] = j >= first ? (j / W + 1) * W : lo[bq];
      }
    }
    std::vector<float> qb(MQ * hd), sc(MQ * Sp), ob(MQ * hdp), total(MQ);
    std::vector<uint16_t> qp(pairs ? MQ * hd : 0), pp(pairs ? MQ * Sp : 0);  // (pairs: q's rows, the probabilities)
    AmxTiles tiles;
    // Items: (query block, batch row, head), the last query blocks (the most keys, when causal) first. Each tile of
    // rows takes the keys up to its rows' last (a causal block's diagonal: about half its keys), each row's softmax
    // its own, the probabilities past them zeros.
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < nq * B * H; item++) {
      const int64_t qi = nq - 1 - item / (B * H), b = item % (B * H) / H, h = item % H, g = h / (H / Hkv);
      const int64_t t0 = qi * MQ, rows = std::min<int64_t>(MQ, Tq - t0), j0 = lo[b * nq + qi], j1 = hi[b * nq + qi];
      T* o = out + ((b * Tq + t0) * H + h) * hd;
      if (j1 == j0) {  // every key masked: zeros, as the library's attention gives
        for (int64_t r = 0; r < rows; r++)
          for (int64_t d = 0; d < hd; d++) store(o + r * H * hd + d, 0.0f);
        continue;
      }
      int64_t end[MQ];  // one past each row's keys (multiples of W; j0: none)
      for (int64_t r = 0; r < MQ; r++) end[r] = r < rows ? ends[b * Tq + t0 + r] : j0;
      auto tile_end = [&](int64_t r, int64_t n, int64_t to) {  // rows r.. r + n - 1's last key, rounded up to `to`
        int64_t e = j0;
        for (int64_t i = r; i < r + n; i++) e = std::max(e, end[i]);
        return j0 + (e - j0 + to - 1) / to * to;
      };
      const T* qh = q + b * qs[0] + h * qs[1] + t0 * qs[2];
      const int64_t rows_qk = (rows + QK_R - 1) / QK_R * QK_R;
      float post = 1.0f;  // the scores' scale where q is not scaled first
      if constexpr (BF16_DOTS) {
        if (pairs) {
          for (int64_t r = 0; r < MQ; r++)
            for (int64_t d = 0; d < hd; d++) qp[r * hd + d] = r < rows ? qh[r * qs[2] + d] : 0;
          const uint16_t* kpg = kp.get() + (b * Hkv + g) * hd * Sp;
          if (amx)
            for (int64_t r = 0; r < rows; r += 16)
              amx_product(qp.data() + r * hd, hd, kpg + j0 * 2, Sp, sc.data() + r * Sp + j0, Sp, 16,
                          tile_end(r, 16, KB) - j0, hd);
          else
            for (int64_t r = 0; r < rows_qk; r += QK_R)
              for (int64_t j = j0, e = tile_end(r, QK_R, KB); j < e; j += KB)
                tile_bf16<QK_R, KB / 16>(qp.data() + r * hd, hd, hd, kpg + j * 2, Sp, nullptr, 0,
                                         sc.data() + r * Sp + j, Sp);
          post = scale;
        }
      }
      if (!pairs) {
        for (int64_t r = 0; r < MQ; r++)
          for (int64_t d = 0; d < hd; d++) qb[r * hd + d] = r < rows ? load(qh + r * qs[2] + d) * scale : 0.0f;
        const float* ktg = kt.get() + (b * Hkv + g) * hd * Sp;
        for (int64_t r = 0; r < rows_qk; r += QK_R)
          for (int64_t j = j0, e = tile_end(r, QK_R, KB); j < e; j += KB)
            tile<QK_R, 2>(qb.data() + r * hd, hd, ktg + j, Sp, nullptr, 0, sc.data() + r * Sp + j, Sp);
      }
      for (int64_t r = 0; r < rows; r++) {  // softmax of each row over its keys: e^(s - max), in sc (or pp: pairs)
        float* s = sc.data() + r * Sp;
        const bool* mr = mask + b * ms[0] + (t0 + r) * ms[2];
        vf top_w = vf{} - INFINITY;  // masked scores to -inf, and each lane's largest
        for (int64_t j = j0; j < end[r]; j += W) {
          const vf sj = seen_lanes(mr, j, S, ms[3]) != 0 ? vload(s + j) * post : vf{} - INFINITY;
          vstore(s + j, sj);
          top_w = sj > top_w ? sj : top_w;
        }
        float top = -INFINITY;
        for (int l = 0; l < W; l++) top = std::max(top, top_w[l]);
        if (top == -INFINITY) {  // a query that sees no key: zeros
          end[r] = j0;
          total[r] = 0;
          continue;
        }
        vf sum_w = {};
        for (int64_t j = j0; j < end[r]; j += W) {
          const vf e = exp_nonpositive(vload(s + j) - top);
          if (pairs)  // (rounded to bfloat16, as the library's attention rounds them)
            vstore_to(pp.data() + r * Sp + j, e);
          else
            vstore(s + j, e);
          sum_w += e;
        }
        float sum = 0;
        for (int l = 0; l < W; l++) sum += sum_w[l];
        total[r] = sum;
      }
      // The weighted sums of the values: PV_R rows a tile (with AMX 16, their keys rounded up to 32, AMX's steps)
      const int64_t tile_r = amx ? 16 : PV_R, rows_pv = (rows + tile_r - 1) / tile_r * tile_r;
      for (int64_t r = 0; r < rows_pv; r += tile_r) {
        const int64_t e = tile_end(r, tile_r, amx ? 32 : W), keys = e - j0;
        if (keys == 0) {
          std::fill(ob.data() + r * hdp, ob.data() + (r + tile_r) * hdp, 0.0f);
          continue;
        }
        for (int64_t i = r; i < r + tile_r; i++) {  // zeros from each row's last key to the tile's
          if (pairs)
            std::fill(pp.data() + i * Sp + end[i], pp.data() + i * Sp + e, uint16_t{0});
          else
            std::fill(sc.data() + i * Sp + end[i], sc.data() + i * Sp + e, 0.0f);
        }
        if constexpr (BF16_DOTS) {
          if (amx) {
            amx_product(pp.data() + r * Sp + j0, Sp, vq.get() + (b * Hkv + g) * Sp * hdp + j0 * hdp, hdp,
                        ob.data() + r * hdp, hdp, 16, hdp, keys);
          } else if (pairs) {
            const uint16_t* vqg = vq.get() + (b * Hkv + g) * Sp * hdp + j0 * hdp;
            for (int64_t c = 0; c < hdp; c += PV_C)
              tile_bf16<PV_R, PV_C / 16>(pp.data() + r * Sp + j0, Sp, keys, vqg + c * 2, hdp, nullptr, 0,
                                         ob.data() + r * hdp + c, hdp);
          }
        }
        if (!pairs) {
          const float* vpg = vp.get() + (b * Hkv + g) * Sp * hdp + j0 * hdp;
          for (int64_t c = 0; c < hdp; c += PV_C)
            value_tile<PV_R>(sc.data() + r * Sp + j0, Sp, vpg + c, hdp, keys, ob.data() + r * hdp + c);
        }
      }
      for (int64_t r = 0; r < rows; r++) {
        const float inv = total[r] > 0 ? 1.0f / total[r] : 0.0f;
        for (int64_t d = 0; d < hd; d++) store(o + r * H * hd + d, ob[r * hdp + d] * inv);
      }
    }
  }
}

at::Tensor attend_block(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask,
                        double scale) {
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes() && keys.size(0) == q.size(0) &&
                  keys.size(3) == q.size(3) && q.size(1) % keys.size(1) == 0,
              "attend_block: q [B, H, T, hd], keys and values [B, Hkv, S, hd]");
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == q.size(0) && mask.size(1) == 1 && mask.size(2) == q.size(2) &&
                  mask.size(3) == keys.size(2) && mask.scalar_type() == at::kBool,
              "attend_block: mask [B, 1, T, S] bool");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && q.scalar_type() == values.scalar_type(),
              "attend_block: q, keys and values share one dtype");
  TORCH_CHECK(q.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1, "attend_block: rows of hd in a row");
  const int64_t B = q.size(0), H = q.size(1), Hkv = keys.size(1), T = q.size(2), S = keys.size(2), hd = q.size(3);
  auto out = at::empty({B, T, H, hd}, q.options());
  const bool* m = mask.data_ptr<bool>();
  by_dtype(q, "attend_block", [&](auto p) {
    attend_many(p(q), p(keys), p(values), m, B, H, Hkv, T, S, hd, q.strides().data(), keys.strides().data(),
                values.strides().data(), mask.strides().data(), static_cast<float>(scale), p(out));
  });
  return out.transpose(1, 2);
}

// ---- Products of a few dozen rows (a prompt's experts, float32) -----------------------------------------------
// A 402-token prompt gives each of moebench-speed's 32 experts ~50 rows: oneDNN's float32 product reaches ~400
// GFLOP/s on them with the weights in the cache, ~330 with them read from memory (Zen 5 VM, 2 threads). Here the
// weights are packed into panels of NB output columns ([N / NB, K, NB], by the caller, into huge pages); each panel
// is read from memory once, while the tiles of rows of the panel before it ask the L2 cache for it, and the tiles
// find it there: ~430 and ~360-400 GFLOP/s.
// A register tile: LR rows x NB columns (6 x 64 with AVX-512: 24 sums, 4 weight vectors and a broadcast, 29 of the
// 32 registers (GCC 12 still reads two sums from the stack now and then); ~5% faster than 8 x 32 on the Xeon VM,
// with 10 loads every 24 multiply-adds instead of 10 every 16). With AVX2: 6 x 16 (12 sums, 2 weight vectors and a
// broadcast, 15 of the 16 registers; a prompt's experts 1.49x faster than with 4 x 16 on an AMD EPYC Zen 3 VM: 25.7
// against 38.2 ms a layer). Weights whose dims are not multiples of NB take the torch loop instead (every preset's
// are).
constexpr int NB = W == 16 ? 4 * W : 2 * W;  // output columns of a panel
constexpr int LR = 6;                        // rows of a register tile

template <int... R>
constexpr auto tiles(std::integer_sequence<int, R...>) {
  return std::array{tile<R + 1, NB / W>...};
}

template <int... R>
constexpr auto tiles_bf16(std::integer_sequence<int, R...>) {
  return std::array{tile_bf16<R + 1, NB / 16>...};
}

// The register tiles of 1 to LR rows for tile_rows<P>.
template <typename P>
constexpr auto row_tiles() {
  if constexpr (std::is_same_v<P, float>)
    return tiles(std::make_integer_sequence<int, LR>{});
  else
    return tiles_bf16(std::make_integer_sequence<int, LR>{});
}

// out [rows, NB] (row stride os) = x [rows, K] (row stride K; with AMX tiles in tile order where `tiled`) @ panel
// [K, NB], in float32, rows <= LR: one register tile. It asks the L2 cache for `lines` cache lines from `ahead` (its
// share of the next panel, or null): the tiles of a panel spread the next one's reads from memory over the whole of
// its arithmetic (the first tile alone asking for all of it stalled on the memory: ~75 against ~110 GFLOP/s a core on
// the Xeon VM). P: float, or (with AVX512-BF16) uint16_t for bfloat16 rows and panels of pairs [K / 2, NB, 2]
// (tile_bf16; with AMX, amx_tile: the panels in tile order, up to AMX_ROWS rows).
template <typename P>
constexpr bool TILED = std::is_same_v<P, uint16_t> && AMX_TILES;

template <typename P>
void tile_rows(const P* x, bool tiled, int64_t rows, int64_t K, const P* panel, const char* ahead, int64_t lines,
               float* out, int64_t os) {
  static constexpr auto row_tile = row_tiles<P>();
  if constexpr (std::is_same_v<P, float>)
    row_tile[rows - 1](x, K, panel, NB, ahead, lines, out, os);
  else if constexpr (TILED<P>)
    amx_tile<NB>(x, tiled, rows, K, panel, ahead, lines, out, os);
  else
    row_tile[rows - 1](x, K, K, panel, NB, ahead, lines, out, os);
}

// The rows of sums tile_rows may store (its callers' buffers): LR, or with AMX AMX_ROWS.
constexpr int64_t TILE_ROWS = std::max<int64_t>(LR, AMX_ROWS);

// Where element (r, c) of rows [M, K] is in the buffers tile_rows<P> takes, and the rows such a buffer needs room for.
template <typename P>
inline int64_t element_at(int64_t r, int64_t c, int64_t K) {
  return TILED<P> ? tiled_at(r, c, K) : r * K + c;
}

template <typename P>
inline int64_t rows_room(int64_t M) {
  return TILED<P> ? (M + 15) / 16 * 16 : M;
}

// f(r, rows, l0, l1) for M rows in tiles of at most LR rows, as equal as can be (50 rows: five of 6 and four of 5,
// not eight of 6 and one of 2: a tile of 2 rows has too few sums in flight to keep the multiply-add units busy), and
// each tile's share [l0, l1) of `lines` cache lines to ask for. With AMX tiles (TILED<P>): AMX_ROWS rows at a time
// from row 0.
template <typename P, typename F>
void row_tiles_of(int64_t M, int64_t lines, F f) {
  if constexpr (TILED<P>) {
    for (int64_t r = 0; r < M; r += AMX_ROWS) {
      const int64_t end = std::min(r + AMX_ROWS, M);
      f(r, end - r, lines * r / M, lines * end / M);
    }
    return;
  }
  const int64_t tiles_ = (M + LR - 1) / LR;
  for (int64_t i = 0; i < tiles_; i++)
    f(M * i / tiles_, M * (i + 1) / tiles_ - M * i / tiles_, lines * i / tiles_, lines * (i + 1) / tiles_);
}

// Where a tile asks for its share [l0, l1) of `next` (or nothing, null).
template <typename P>
inline const char* ahead_of(const P* next, int64_t l0) {
  return next != nullptr ? reinterpret_cast<const char*>(next) + l0 * 64 : nullptr;
}

// The shape of a weight [N, K]'s panels here: float32 [N / NB, K, NB], or bfloat16 panels of pairs [N / NB, K / 2, NB,
// 2] (tile_bf16), with AMX tiles in their order [N / NB, K / 32, NB / 16, 16, 32].
std::vector<int64_t> panels_shape(bool pairs, int64_t N, int64_t K) {
  if (!pairs) return {N / NB, K, NB};
  if (AMX_TILES) return {N / NB, K / 32, NB / 16, 16, 32};
  return {N / NB, K / 2, NB, 2};
}
// ... as text, for the panels of [N, K]
std::string pairs_shape(const std::string& N, const std::string& K) {
  const std::string nb = std::to_string(NB);
  return AMX_TILES ? "[" + N + " / " + nb + ", " + K + " / 32, " + std::to_string(NB / 16) + ", 16, 32]"
                   : "[" + N + " / " + nb + ", " + K + " / 2, " + nb + ", 2]";
}

// Room for n elements from a 64-byte boundary in v (each of the tiles' rows whole cache lines), kept for the next call.
template <typename P>
P* aligned_room(std::vector<P>& v, int64_t n) {
  v.resize(n + 64 / sizeof(P));
  return reinterpret_cast<P*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t{63});
}

// Copies row r of x [., K] to `to`, where element_at<P> puts it.
template <typename P, typename T>
inline void copy_row(const T* x, int64_t r, int64_t K, P* to) {
  if constexpr (TILED<P>)
    for (int64_t c = 0; c < K; c += 32) std::memcpy(to + tiled_at(r, c, K), x + c, 64);
  else
    for (int64_t c = 0; c < K; c++) to[r * K + c] = std::is_same_v<P, float> ? load(x + c) : x[c];
}

// x [M, K] @ w [N, K]^T, w given as panels [N / NB, K, NB] -> out [M, N]; float32. With AVX512-BF16, a bfloat16 x
// with bfloat16 panels of pairs [N / NB, K / 2, NB, 2] instead (with AMX tiles in their order: panels_shape) -> out
// [M, N] in bfloat16 (sums in float32, each rounded once, as oneDNN's bfloat16 products round them). With `residual`
// [M, N] (x's dtype): residual + the product, the product rounded first, as the torch model's `residual + linear(x)`.
at::Tensor linear_panels(const at::Tensor& x_, const at::Tensor& panels_, const std::optional<at::Tensor>& residual_) {
  const bool pairs = panels_.scalar_type() == at::kBFloat16;
  TORCH_CHECK(pairs ? x_.scalar_type() == at::kBFloat16 : x_.scalar_type() == at::kFloat && panels_.scalar_type() ==
                  at::kFloat, "linear_panels: float32, or bfloat16 x with bfloat16 panels of pairs");
  TORCH_CHECK(x_.dim() == 2 && panels_.dim() >= 1 &&
                  panels_.sizes() == panels_shape(pairs, panels_.size(0) * NB, x_.size(1)),
              "linear_panels: x [M, K], panels [N / ", NB, ", K, ", NB, "] (or, bfloat16 pairs, ",
              pairs_shape("N", "K"), ")");
  TORCH_CHECK(!pairs || (pair_depth() > 0 && x_.size(1) % pair_depth() == 0),
              "linear_panels: bfloat16 panels need AVX512-BF16 (with AMX: K a multiple of 32)");
  const at::Tensor x = x_.contiguous(), panels = panels_.contiguous();
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0), N = P * NB;
  TORCH_CHECK(!residual_ || (residual_->dim() == 2 && residual_->size(0) == M && residual_->size(1) == N &&
                             residual_->scalar_type() == x.scalar_type()),
              "linear_panels: residual [M, N] in x's dtype");
  const at::Tensor residual = residual_ ? residual_->contiguous() : at::Tensor();
  auto out = at::empty({M, N}, x.options());
  auto run = [&](auto xp, auto wp, auto rp, auto op) {
    using P_ = std::remove_cv_t<std::remove_pointer_t<decltype(wp)>>;
    // AMX tiles read 16 rows at a time: rows past the last whole AMX_ROWS come from a copy with room for them
    // (x's own rows as they are, the tiles' loads strided: a copy of x in tile order cost more than it saved).
    const int64_t whole = TILED<P_> ? M / AMX_ROWS * AMX_ROWS : M;
#pragma omp parallel
    {
      // Each thread its share of the panels, in order: the next one is its own.
      const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      const int64_t p0 = P * t / threads, p1 = P * (t + 1) / threads;
      alignas(64) float g[TILE_ROWS * NB];  // a tile's sums
      AmxTiles amx;
      thread_local std::vector<P_> last_;
      P_* last = whole < M ? aligned_room(last_, AMX_ROWS * K) : nullptr;
      if (last != nullptr) std::copy(xp + whole * K, xp + M * K, last);
      for (int64_t p = p0; p < p1; p++) {
        const P_ *panel = wp + p * K * NB, *next = p + 1 < p1 ? panel + K * NB : nullptr;
        row_tiles_of<P_>(M, K * NB * static_cast<int64_t>(sizeof(P_)) / 64, [&](int64_t r, int64_t rows, int64_t l0,
                                                                                int64_t l1) {
          tile_rows(r < whole ? xp + r * K : last, false, rows, K, panel, ahead_of(next, l0), l1 - l0, g, NB);
          for (int64_t j = 0; j < rows; j++) {
            const int64_t at = (r + j) * N + p * NB;
            for (int64_t c = 0; c < NB; c += W) {
              const vf y = vround(vload(g + j * NB + c), op);
              vstore_to(op + at + c, rp != nullptr ? y + vload_as(rp + at + c) : y);
            }
          }
        });
      }
    }
  };
  if (pairs) {
    auto bf = [](const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    run(static_cast<const uint16_t*>(bf(x)), static_cast<const uint16_t*>(bf(panels)),
        static_cast<const uint16_t*>(residual.defined() ? bf(residual) : nullptr), bf(out));
  } else {
    run(static_cast<const float*>(x.data_ptr<float>()), static_cast<const float*>(panels.data_ptr<float>()),
        static_cast<const float*>(residual.defined() ? residual.data_ptr<float>() : nullptr), out.data_ptr<float>());
  }
  return out;
}

int64_t panel_width() { return NB; }

// ---- Products of a few dozen bfloat16 rows on AVX512-BF16 (a bfloat16 prompt's experts) -----------------------
// oneDNN's bfloat16 product of an expert's ~50 rows runs at 222-271 GFLOP/s on the Zen 4 VM, of the 427 its large
// products reach. tile_rows<uint16_t> does it as for float32, with bfloat16 panels of pairs
// ([N / NB, K / 2, NB, 2]) and tile_bf16: ~370. With AMX, amx_tile on the same pairs in tile order.

// ---- A prompt's experts in one call (moe_prompt) ----------------------------------------------------------------
// The MoE block's experts for T tokens, float32 arithmetic, as moebench.model.moe.experts_forward computes them with
// one linear_panels product at a time (and the torch operations between them): the T k (token, expert) pairs sorted
// by expert (stable); each expert's rows gathered (bfloat16 widened), gate and up products panel by panel, a tile of
// rows of each in turn, silu(gate) * up done on the two tiles' sums in registers' reach; the down product, each
// tile's sums times their pair's weight and rounded to x's dtype as they leave it; then summed per token in float32
// in the sorted order and rounded once (as torch's index_add_ of the rounded rows: its CPU kernel sums bfloat16 in
// float32). (Whole panels of gate's and up's sums, then silu, then the weights in another pass: 1-3% slower on the
// Zen 4 VM, a panel's rows of sums passing through L2 twice.)
// The experts are shared among the threads, the largest first; each is computed by one thread alone, so the result
// does not depend on the number of threads. Gone: two products per expert and the torch operations around them
// (their dispatch and their buffers' page faults). The panels are float32 for bfloat16 weights too: widened in the
// cache, panel by panel, a bfloat16 prompt's experts ran 7-12% slower on the Xeon VM, for all they read half the bytes.

// g * sigmoid(g) * u on W lanes: e^-|g| from exp_nonpositive, so that no lane overflows.
inline vf silu_times(vf g, vf u) {
  const vf zero = {}, z = exp_nonpositive(g > zero ? zero - g : g);
  return (g >= zero ? g : g * z) / (1.0f + z) * u;
}

template <typename T, typename P>
void moe_prompt_impl(const T* x, int64_t Tn, int64_t D, int64_t k, const int64_t* ids, const T* weights,
                     const P* gate_up, const P* down, int64_t E, int64_t I, const T* residual, T* out) {
  const int64_t pairs = Tn * k, P1 = I / NB, P2 = D / NB;
  std::vector<int64_t> start(E + 1, 0), order(pairs), pos(pairs), experts(E);
  for (int64_t i = 0; i < pairs; i++) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < E, "moe_prompt: expert id out of range: ", ids[i]);
    start[ids[i] + 1]++;
  }
  for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < pairs; i++) order[pos[i] = fill[ids[i]]++] = i;
  for (int64_t e = 0; e < E; e++) experts[e] = e;
  std::stable_sort(experts.begin(), experts.end(),
                   [&](int64_t a, int64_t b) { return start[a + 1] - start[a] > start[b + 1] - start[b]; });
  thread_local std::vector<T> ys_;  // each pair's weighted output (rounded to x's dtype), in the sorted order
  T* ys = aligned_room(ys_, pairs * D);  // (rows from a 64-byte boundary: the streaming stores below need it)
  const int64_t bytes = NB * static_cast<int64_t>(sizeof(P)), lines1 = D * bytes / 64, lines2 = I * bytes / 64;
#pragma omp parallel
  {
    thread_local std::vector<P> xe_, h_;  // (bfloat16 panels: the rows and silu(gate) * up in bfloat16)
    alignas(64) float g[TILE_ROWS * NB], u[TILE_ROWS * NB];  // a tile's sums
    AmxTiles amx;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < E; i++) {
      const int64_t e = experts[i], s = start[e], n = start[e + 1] - s;
      if (n == 0) continue;
      P *xe = aligned_room(xe_, rows_room<P>(n) * D), *h = aligned_room(h_, rows_room<P>(n) * I);
      for (int64_t r = 0; r < n; r++) copy_row(x + order[s + r] / k * D, r, D, xe);
      const P *w1 = gate_up + e * 2 * I * D, *w2 = down + e * D * I;
      for (int64_t q = 0; q < P1; q++) {  // gate's panel q and up's panel q, a tile of rows at a time: h's columns q NB
        const P *gate = w1 + q * D * NB, *up = w1 + (q + P1) * D * NB;
        const P *next_gate = q + 1 < P1 ? gate + D * NB : w2, *next_up = q + 1 < P1 ? up + D * NB : nullptr;
        row_tiles_of<P>(n, lines1, [&](int64_t r, int64_t rows, int64_t l0, int64_t l1) {
          tile_rows(xe + element_at<P>(r, 0, D), TILED<P>, rows, D, gate, ahead_of(next_gate, l0), l1 - l0, g, NB);
          tile_rows(xe + element_at<P>(r, 0, D), TILED<P>, rows, D, up, ahead_of(next_up, l0), l1 - l0, u, NB);
          for (int64_t j = 0; j < rows; j++)
            for (int c = 0; c < NB; c += W)  // (W columns: contiguous in tile order too)
              vstore_to(h + element_at<P>(r + j, q * NB + c, I),
                        silu_times(vload(g + j * NB + c), vload(u + j * NB + c)));
        });
      }
      T* ye = ys + s * D;
      for (int64_t p = 0; p < P2; p++) {  // the down product's panel p, each tile's rows times their pair's weight
        const P *panel = w2 + p * I * NB, *next = p + 1 < P2 ? panel + I * NB : nullptr;
        row_tiles_of<P>(n, lines2, [&](int64_t r, int64_t rows, int64_t l0, int64_t l1) {
          tile_rows(h + element_at<P>(r, 0, I), TILED<P>, rows, I, panel, ahead_of(next, l0), l1 - l0, g, NB);
          for (int64_t j = 0; j < rows; j++) {
            const vf wr = vf{} + load(weights + order[s + r + j]);
            for (int c = 0; c < NB; c += W) vstream_to(ye + (r + j) * D + p * NB + c, vload(g + j * NB + c) * wr);
          }
        });
      }
      _mm_sfence();  // (the streaming stores before the sum's reads, on the other threads too)
    }
#pragma omp for
    for (int64_t t = 0; t < Tn; t++) {
      int64_t at[64];  // the token's pairs by their place in the sorted order
      for (int64_t j = 0; j < k; j++) at[j] = pos[t * k + j];
      std::sort(at, at + k);
      for (int64_t d = 0; d < D; d += W) {
        vf acc = {};
        for (int64_t j = 0; j < k; j++) acc += vload_as(ys + at[j] * D + d);
        if (residual) acc = vround(acc, out) + vload_as(residual + t * D + d);  // (as residual + the rounded sum)
        vstore_to(out + t * D + d, acc);
      }
    }
  }
}

// x [T, D] (float32 or bfloat16), ids [T, k] (int64), weights [T, k] (x's dtype), gate_up [E, 2I / NB, D, NB] and
// down [E, D / NB, I, NB]: each expert's weights as float32 panels -> [T, D]. With AVX512-BF16 a bfloat16 x may come
// with bfloat16 panels of pairs instead, gate_up [E, 2I / NB, D / 2, NB, 2] and down [E, D / NB, I / 2, NB, 2] (with
// AMX tiles in their order: panels_shape; pair_depth()): its rows and silu(gate) * up stay bfloat16, as the library's
// products take them.
at::Tensor moe_prompt(const at::Tensor& x_, const at::Tensor& ids_, const at::Tensor& weights_,
                      const at::Tensor& gate_up_, const at::Tensor& down_, const std::optional<at::Tensor>& residual_) {
  TORCH_CHECK(x_.dim() == 2 && ids_.dim() == 2 && ids_.size(0) == x_.size(0) && weights_.sizes() == ids_.sizes() &&
                  ids_.size(1) <= 64 && ids_.scalar_type() == at::kLong && weights_.scalar_type() == x_.scalar_type(),
              "moe_prompt: x [T, D], ids [T, k] int64 (k <= 64), weights [T, k] in x's dtype");
  const bool pairs = gate_up_.scalar_type() == at::kBFloat16;
  const int64_t E = gate_up_.dim() > 0 ? gate_up_.size(0) : 0, D = x_.size(1);
  const int64_t I = E > 0 && D > 0 ? down_.numel() / (E * D) : 0;
  auto each_expert = [&](int64_t N, int64_t K) {
    std::vector<int64_t> shape = panels_shape(pairs, N, K);
    shape.insert(shape.begin(), E);
    return shape;
  };
  TORCH_CHECK(I > 0 && I % NB == 0 && D % NB == 0 && down_.scalar_type() == gate_up_.scalar_type() &&
                  (pairs ? x_.scalar_type() == at::kBFloat16 : gate_up_.scalar_type() == at::kFloat) &&
                  gate_up_.sizes() == each_expert(2 * I, D) && down_.sizes() == each_expert(D, I),
              "moe_prompt: float32 panels gate_up [E, 2I / ", NB, ", D, ", NB, "] and down [E, D / ", NB, ", I, ", NB,
              "], I a multiple of ", NB, " (or, for a bfloat16 x, bfloat16 panels of pairs ",
              pairs_shape("E, 2I", "D"), " and ", pairs_shape("E, D", "I"), ")");
  TORCH_CHECK(!pairs || pair_depth() > 0, "moe_prompt: bfloat16 panels need AVX512-BF16");
  TORCH_CHECK(!residual_ || (residual_->sizes() == x_.sizes() && residual_->scalar_type() == x_.scalar_type()),
              "moe_prompt: residual [T, D] in x's dtype");
  const at::Tensor x = x_.contiguous(), ids = ids_.contiguous(), weights = weights_.contiguous(),
                   gate_up = gate_up_.contiguous(), down = down_.contiguous();
  const at::Tensor residual = residual_ ? residual_->contiguous() : at::Tensor();
  auto out = at::empty_like(x);
  if (pairs) {
    const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    moe_prompt_impl(xp, x.size(0), x.size(1), ids.size(1), ids.data_ptr<int64_t>(),
                    reinterpret_cast<const uint16_t*>(weights.data_ptr<at::BFloat16>()),
                    reinterpret_cast<const uint16_t*>(gate_up.data_ptr<at::BFloat16>()),
                    reinterpret_cast<const uint16_t*>(down.data_ptr<at::BFloat16>()), E, I,
                    residual.defined() ? reinterpret_cast<const uint16_t*>(residual.data_ptr<at::BFloat16>()) : nullptr,
                    reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
    return out;
  }
  by_dtype(x, "moe_prompt", [&](auto p) {
    moe_prompt_impl(p(x), x.size(0), x.size(1), ids.size(1), ids.data_ptr<int64_t>(), p(weights),
                    gate_up.data_ptr<float>(), down.data_ptr<float>(), E, I,
                    residual.defined() ? p(residual) : nullptr, p(out));
  });
  return out;
}

// A prompt's whole attention block with its norm and residual (eager, CPU), one call for Attention.forward's five
// (the norm, the projections, qk_norm_rope, attend_block, the output projection with the residual add): x [B, T, D],
// the q, k and v projections' panels (one fused [q; k; v] or three), the cache's slots, mask and rotation as those
// operators take them; wo: the output projection's panels.
at::Tensor attention_block_prompt(const at::Tensor& x, const at::Tensor& norm, double norm_eps,
                                  const std::vector<at::Tensor>& qkv, const at::Tensor& q_norm,
                                  const at::Tensor& k_norm, double eps, const at::Tensor& cos, const at::Tensor& sin,
                                  at::Tensor& cache_k, at::Tensor& cache_v, int64_t layer, const at::Tensor& slots,
                                  const at::Tensor& mask, double scale, const at::Tensor& wo) {
  TORCH_CHECK(x.dim() == 3 && (qkv.size() == 1 || qkv.size() == 3) && cache_k.dim() == 5 && mask.dim() == 4,
              "attention_block_prompt: x [B, T, D], the panels of [q; k; v] or of q, k and v, caches [L, B, Hkv, "
              "slots, hd], mask [B, 1, T, S]");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), Nkv = cache_k.size(2) * cache_k.size(4);
  const at::Tensor xn = rms_norm_rows(x, norm, norm_eps).view({B * T, D});
  at::Tensor q, k, v;
  if (qkv.size() == 1) {
    const at::Tensor y = linear_panels(xn, qkv[0], std::nullopt).view({B, T, -1});
    const int64_t Nq = y.size(2) - 2 * Nkv;
    q = y.narrow(2, 0, Nq), k = y.narrow(2, Nq, Nkv), v = y.narrow(2, Nq + Nkv, Nkv);
  } else {
    q = linear_panels(xn, qkv[0], std::nullopt).view({B, T, -1});
    k = linear_panels(xn, qkv[1], std::nullopt).view({B, T, -1});
    v = linear_panels(xn, qkv[2], std::nullopt).view({B, T, -1});
  }
  const at::Tensor rotated = qk_norm_rope(q, k, v, q_norm, k_norm, eps, cos, sin, cache_k, cache_v, layer, slots);
  const int64_t S = mask.size(3);
  const at::Tensor o = attend_block(rotated, cache_k.select(0, layer).narrow(2, 0, S),
                                    cache_v.select(0, layer).narrow(2, 0, S), mask, scale);
  return linear_panels(o.transpose(1, 2).reshape({B * T, -1}), wo, x.reshape({B * T, D})).view({B, T, D});
}

// A prompt's whole MoE block with its norm and residual (eager, CPU): x + experts(rms_norm(x)), routed as route_rows
// routes, in one call for SparseMoE.forward's three (between operators the Python of the block ran on caches the
// experts' weights had just swept: ~0.1 ms a layer). gate_up and down: moe_prompt's panels.
at::Tensor moe_block_prompt(const at::Tensor& x, const at::Tensor& norm, double eps, const at::Tensor& router,
                            int64_t k, bool norm_topk, const at::Tensor& gate_up, const at::Tensor& down) {
  TORCH_CHECK(x.dim() == 2, "moe_block_prompt: x [T, D]");
  const at::Tensor xn = rms_norm_rows(x, norm, eps);
  const auto [ids, weights] = route_rows(xn, router, k, norm_topk);
  return moe_prompt(xn, ids, weights, gate_up, down, x);
}

}  // namespace

// C entry points of the decode steps' operators for Inductor's C++ wrapper (cpu_ops.py names them in its config
// aot_inductor.custom_ops_to_c_shims): a compiled step calls aoti_torch_cpu_<operator> directly, its arguments in the
// schema's order (a bool as int32_t), instead of looking the operator up by name in the dispatcher and boxing its
// arguments (the embedded model's decode step 1.03-1.09x faster). An exception becomes an error code, as there; the
// profiler records each call as it records the dispatcher's (by the operator's name, with its arguments).
namespace {
at::Tensor& in(AtenTensorHandle handle) { return *torch::aot_inductor::tensor_handle_to_tensor_pointer(handle); }
}  // namespace

#define C_SHIM(name, ...)                                                                  \
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({                                             \
    RECORD_FUNCTION("moebench_cpu::" #name, std::vector<c10::IValue>({__VA_ARGS__}));      \
    *out = torch::aot_inductor::new_tensor_handle(name(__VA_ARGS__));                      \
  })

extern "C" {
AOTITorchError aoti_torch_cpu_attend_row(AtenTensorHandle q, AtenTensorHandle keys, AtenTensorHandle values,
                                         AtenTensorHandle mask, double scale, AtenTensorHandle* out) {
  C_SHIM(attend_row, in(q), in(keys), in(values), in(mask), scale);
}

AOTITorchError aoti_torch_cpu_moe_decode(AtenTensorHandle x, AtenTensorHandle ids, AtenTensorHandle weights,
                                         AtenTensorHandle w_gate_up, AtenTensorHandle w_down, AtenTensorHandle* out) {
  C_SHIM(moe_decode, in(x), in(ids), in(weights), in(w_gate_up), in(w_down));
}

AOTITorchError aoti_torch_cpu_moe_route_decode(AtenTensorHandle x, AtenTensorHandle norm, double eps,
                                               AtenTensorHandle router, int64_t k, int32_t norm_topk,
                                               AtenTensorHandle w_gate_up, AtenTensorHandle w_down,
                                               AtenTensorHandle* out) {
  C_SHIM(moe_route_decode, in(x), in(norm), eps, in(router), k, norm_topk != 0, in(w_gate_up), in(w_down));
}

AOTITorchError aoti_torch_cpu_attention_decode(AtenTensorHandle x, AtenTensorHandle norm, double norm_eps,
                                               AtenTensorHandle wq, AtenTensorHandle wk, AtenTensorHandle wv,
                                               AtenTensorHandle q_norm, AtenTensorHandle k_norm, double eps,
                                               AtenTensorHandle cos, AtenTensorHandle sin, AtenTensorHandle cache_k,
                                               AtenTensorHandle cache_v, int64_t layer, AtenTensorHandle slot,
                                               AtenTensorHandle mask, double scale, AtenTensorHandle wo,
                                               AtenTensorHandle* out) {
  C_SHIM(attention_decode, in(x), in(norm), norm_eps, in(wq), in(wk), in(wv), in(q_norm), in(k_norm), eps, in(cos),
         in(sin), in(cache_k), in(cache_v), layer, in(slot), in(mask), scale, in(wo));
}

AOTITorchError aoti_torch_cpu_linear_row(AtenTensorHandle x, AtenTensorHandle w, AtenTensorHandle* out) {
  C_SHIM(linear_row, in(x), in(w));
}
}

TORCH_LIBRARY(moebench_cpu, m) {
  m.def("attend_row(Tensor q, Tensor keys, Tensor values, Tensor mask, float scale) -> Tensor");
  m.def("moe_decode(Tensor x, Tensor ids, Tensor weights, Tensor w_gate_up, Tensor w_down) -> Tensor");
  m.def("moe_route_decode(Tensor x, Tensor norm, float eps, Tensor router, int k, bool norm_topk, Tensor w_gate_up, "
        "Tensor w_down) -> Tensor");
  m.def("attention_decode(Tensor x, Tensor norm, float norm_eps, Tensor wq, Tensor wk, Tensor wv, Tensor q_norm, "
        "Tensor k_norm, float eps, Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, int layer, "
        "Tensor slot, Tensor mask, float scale, Tensor wo) -> Tensor");
  m.def("linear_row(Tensor x, Tensor w) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("route_rows(Tensor x, Tensor router, int k, bool norm_topk) -> (Tensor, Tensor)");
  m.def("rms_norm_rows(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("qk_norm_rope(Tensor q, Tensor k, Tensor v, Tensor q_norm, Tensor k_norm, float eps, Tensor cos, Tensor sin, "
        "Tensor(a!) cache_k, Tensor(b!) cache_v, int layer, Tensor slots) -> Tensor");
  m.def("attend_block(Tensor q, Tensor keys, Tensor values, Tensor mask, float scale) -> Tensor");
  m.def("linear_panels(Tensor x, Tensor panels, Tensor? residual=None) -> Tensor");
  m.def("moe_prompt(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down, Tensor? residual=None) -> "
        "Tensor");
  m.def("attention_block_prompt(Tensor x, Tensor norm, float norm_eps, Tensor[] qkv, Tensor q_norm, Tensor k_norm, "
        "float eps, Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, int layer, Tensor slots, "
        "Tensor mask, float scale, Tensor wo) -> Tensor");
  m.def("moe_block_prompt(Tensor x, Tensor norm, float eps, Tensor router, int k, bool norm_topk, Tensor gate_up, "
        "Tensor down) -> Tensor");
  m.def("panel_width() -> int", &panel_width);
  m.def("pair_depth() -> int", &pair_depth);
}

TORCH_LIBRARY_IMPL(moebench_cpu, CPU, m) {
  m.impl("moe_decode", &moe_decode);
  m.impl("moe_route_decode", &moe_route_decode);
  m.impl("linear_row", &linear_row);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("route_rows", &route_rows);
  m.impl("rms_norm_rows", &rms_norm_rows);
  m.impl("qk_norm_rope", &qk_norm_rope);
  m.impl("attend_row", &attend_row);
  m.impl("attention_decode", &attention_decode);
  m.impl("attend_block", &attend_block);
  m.impl("linear_panels", &linear_panels);
  m.impl("moe_prompt", &moe_prompt);
  m.impl("moe_block_prompt", &moe_block_prompt);
  m.impl("attention_block_prompt", &attention_block_prompt);
}
