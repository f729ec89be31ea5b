// Decode-step kernels for XLA:CPU, called through the XLA FFI.
//
// Matmuls y[M, N] = x[M, K] @ W[N, K].T for few rows M (one per sequence in a decode step),
// with W stored as float32, bfloat16, int8 codes (per-row or per-group scales) or packed int4
// codes (per-group float16 scale and offset). Every weight is read once per call and multiplied
// into the M rows in registers (converted to float32, or, for int4 with AVX-512 VNNI or AVX2,
// in int8 dot products against two-level int8 activations): decode is bound by reading the weights,
// and XLA:CPU has no such fused kernel (it converts an int8 or bf16 weight to a float32 copy).
//
// Decode attention: one query token per row, RoPE, the cache write and attention in one call,
// over a contiguous [B, K, S, H] KV cache or a paged pool [K, P, S_page, H] through page tables
// (scores, softmax and the weighted sum of values in one pass per KV head), in place of the
// dozen small XLA ops, the scatter and (for pages) the gather that the XLA math compiles to.
//
// Reading at memory bandwidth takes both cores and enough loads in flight: rows are split into
// one contiguous range per thread, run by helper threads that stay awake between the kernels of
// a decode step (Helpers), and each weight row is prefetched ahead of use (PrefetchAhead).
//
// Built at first use by jinfer/cpu_kernels/build.py with -march=native. With AVX-512 or AVX2
// the inner loops use intrinsics, through one set of vector helpers (Floats, Bytes) for both
// widths; elsewhere plain loops the compiler vectorizes.
// Preconditions (checked in Python): K and every group size are multiples of 32; int4 groups
// hold whole 32-input blocks, whose 16 bytes store input pairs (2j low nibble, 2j+1 high).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // _mm_prefetch, _mm_pause on any x86-64; AVX-512 intrinsics below
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define JINFER_AVX512 1
#define JINFER_SIMD 1
#if defined(__AVX512VNNI__)
#define JINFER_INT8_DOT 1  // int4 kernel in int8 dot products (vpdpbusd)
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define JINFER_AVX2 1  // AMD Zen 2/3, most laptops: the same loops at 8 lanes
#define JINFER_SIMD 1
#define JINFER_INT8_DOT 1  // int4 kernel in int8 dot products (vpmaddubsw + vpmaddwd)
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRowTile = 4;            // input rows multiplied per weight load

// One vector of float32 lanes and the few operations the kernels use on it: 16 lanes with
// AVX-512, 8 with AVX2 + FMA, so each vector loop is written once for both. Without either
// the kernels run plain loops the compiler vectorizes.
#if defined(JINFER_AVX512)
using Floats = __m512;
constexpr int kLanes = 16;
inline Floats Zero() { return _mm512_setzero_ps(); }
inline Floats Set1(float v) { return _mm512_set1_ps(v); }
inline Floats Load(const float* p) { return _mm512_loadu_ps(p); }
inline void Store(float* p, Floats v) { _mm512_storeu_ps(p, v); }
inline Floats Add(Floats a, Floats b) { return _mm512_add_ps(a, b); }
inline Floats Sub(Floats a, Floats b) { return _mm512_sub_ps(a, b); }
inline Floats Mul(Floats a, Floats b) { return _mm512_mul_ps(a, b); }
inline Floats Div(Floats a, Floats b) { return _mm512_div_ps(a, b); }
inline Floats Max(Floats a, Floats b) { return _mm512_max_ps(a, b); }
inline Floats Min(Floats a, Floats b) { return _mm512_min_ps(a, b); }
inline Floats Fma(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }
inline float ReduceAdd(Floats v) { return _mm512_reduce_add_ps(v); }
inline float ReduceMax(Floats v) { return _mm512_reduce_max_ps(v); }
// kLanes consecutive bfloat16 / int8 / unsigned bytes widened to float32.
inline Floats WidenBF16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline Floats WidenHalves(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Floats WidenInt8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// The low (high) nibbles of kLanes bytes as float32.
inline Floats LowNibbles(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, _mm_set1_epi8(0x0F))));
}
inline Floats HighNibbles(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F))));
}
inline Floats Round(Floats v) {
  return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// x * 2^n for integral n (e^x's exponent step).
inline Floats TimesPowerOfTwo(Floats x, Floats n) { return _mm512_scalef_ps(x, n); }
// The even and odd elements of 2 * kLanes floats at p.
inline void Deinterleave(const float* p, Floats* even, Floats* odd) {
  const __m512i even_index = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd_index = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const Floats a = Load(p), b = Load(p + kLanes);
  *even = _mm512_permutex2var_ps(a, even_index, b);
  *odd = _mm512_permutex2var_ps(a, odd_index, b);
}

// Bytes: one vector of kLanes * 4 bytes, for the int4 kernel's int8 dot products.
using Bytes = __m512i;
constexpr int kBytes = 64;
inline Bytes ZeroBytes() { return _mm512_setzero_si512(); }
inline Bytes LoadBytes(const void* p) { return _mm512_loadu_si512(p); }
// The first `available` of kBytes bytes at p (none if it is <= 0), zeros after; reads no
// byte past them.
inline Bytes LoadBytesUpTo(const uint8_t* p, int64_t available) {
  if (available >= kBytes) return LoadBytes(p);
  if (available <= 0) return ZeroBytes();
  return _mm512_maskz_loadu_epi8(~0ULL >> (64 - available), p);
}
inline Bytes LowNibbleBytes(Bytes b) { return _mm512_and_si512(b, _mm512_set1_epi8(0x0F)); }
inline Bytes HighNibbleBytes(Bytes b) {
  return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(0x0F));
}
// sum + per int32 lane, the 4-byte dot products of unsigned a1 and signed b1, and of a2 and b2
// (|sum of one lane's 8 products| < 2^15 for 4-bit a: no saturation in either path).
inline Bytes DotTwo(Bytes sum, Bytes a1, Bytes b1, Bytes a2, Bytes b2) {
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum, a1, b1), a2, b2);
}
inline Bytes ShiftLanesLeft8(Bytes v) { return _mm512_slli_epi32(v, 8); }
inline Floats LanesToFloats(Bytes v) { return _mm512_cvtepi32_ps(v); }
// kLanes / 4 per-block scales at p, each over its block's 4 lanes.
inline Floats SpreadBlockScales(const float* p) {
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(p)));
}
// Rounded lanes stored as kLanes int8 (in range by construction).
inline void StoreInt8(Floats rounded, int8_t* out) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(rounded)));
}
inline Floats Abs(Floats v) { return _mm512_andnot_ps(_mm512_set1_ps(-0.0f), v); }
#elif defined(JINFER_AVX2)
using Floats = __m256;
constexpr int kLanes = 8;
inline Floats Zero() { return _mm256_setzero_ps(); }
inline Floats Set1(float v) { return _mm256_set1_ps(v); }
inline Floats Load(const float* p) { return _mm256_loadu_ps(p); }
inline void Store(float* p, Floats v) { _mm256_storeu_ps(p, v); }
inline Floats Add(Floats a, Floats b) { return _mm256_add_ps(a, b); }
inline Floats Sub(Floats a, Floats b) { return _mm256_sub_ps(a, b); }
inline Floats Mul(Floats a, Floats b) { return _mm256_mul_ps(a, b); }
inline Floats Div(Floats a, Floats b) { return _mm256_div_ps(a, b); }
inline Floats Max(Floats a, Floats b) { return _mm256_max_ps(a, b); }
inline Floats Min(Floats a, Floats b) { return _mm256_min_ps(a, b); }
inline Floats Fma(Floats a, Floats b, Floats c) { return _mm256_fmadd_ps(a, b, c); }
inline float ReduceAdd(Floats v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float ReduceMax(Floats v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
inline __m128i Load8Bytes(const void* p) {
  return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
}
inline Floats WidenBF16(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline Floats WidenHalves(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Floats WidenInt8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(Load8Bytes(p)));
}
inline Floats LowNibbles(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(Load8Bytes(p), _mm_set1_epi8(0x0F))));
}
inline Floats HighNibbles(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
      _mm_and_si128(_mm_srli_epi16(Load8Bytes(p), 4), _mm_set1_epi8(0x0F))));
}
inline Floats Round(Floats v) {
  return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// n integral in [-126, 127] (Exp's clamp): 2^n built from its exponent bits.
inline Floats TimesPowerOfTwo(Floats x, Floats n) {
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256i bits = _mm256_slli_epi32(biased, 23);
  return _mm256_mul_ps(x, _mm256_castsi256_ps(bits));
}
inline void Deinterleave(const float* p, Floats* even, Floats* odd) {
  const Floats a = Load(p), b = Load(p + kLanes);  // per 128-bit half: a0 a2 b0 b2, then order
  *even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
  *odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}

using Bytes = __m256i;
constexpr int kBytes = 32;
inline Bytes ZeroBytes() { return _mm256_setzero_si256(); }
inline Bytes LoadBytes(const void* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline Bytes LoadBytesUpTo(const uint8_t* p, int64_t available) {
  if (available >= kBytes) return LoadBytes(p);
  if (available <= 0) return ZeroBytes();
  alignas(32) uint8_t part[kBytes] = {};
  std::memcpy(part, p, available);
  return LoadBytes(part);
}
inline Bytes LowNibbleBytes(Bytes b) { return _mm256_and_si256(b, _mm256_set1_epi8(0x0F)); }
inline Bytes HighNibbleBytes(Bytes b) {
  return _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(0x0F));
}
// Byte pairs into int16 (vpmaddubsw), both products' pairs added, then pairs of those into the
// int32 lanes (vpmaddwd by ones): the same lanes as two vpdpbusd.
inline Bytes DotTwo(Bytes sum, Bytes a1, Bytes b1, Bytes a2, Bytes b2) {
  const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(a1, b1), _mm256_maddubs_epi16(a2, b2));
  return _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
inline Bytes ShiftLanesLeft8(Bytes v) { return _mm256_slli_epi32(v, 8); }
inline Floats LanesToFloats(Bytes v) { return _mm256_cvtepi32_ps(v); }
inline Floats SpreadBlockScales(const float* p) {
  return _mm256_set_m128(_mm_set1_ps(p[1]), _mm_set1_ps(p[0]));
}
inline void StoreInt8(Floats rounded, int8_t* out) {
  const __m256i words = _mm256_packs_epi32(_mm256_cvtps_epi32(rounded), _mm256_setzero_si256());
  const __m256i bytes = _mm256_packs_epi16(words, _mm256_setzero_si256());  // 4 per 128-bit half
  const int32_t low = _mm256_extract_epi32(bytes, 0), high = _mm256_extract_epi32(bytes, 4);
  std::memcpy(out, &low, 4);
  std::memcpy(out + 4, &high, 4);
}
inline Floats Abs(Floats v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
#endif

// Helper threads for the kernels' loops over output rows. A decode step calls a kernel every
// 50-300 us, and a helper woken from sleep (XLA's intra-op pool, or any condition variable)
// arrives tens of microseconds late: at 2 cores that left a 2 MB matmul running mostly on the
// calling thread, at half the memory bandwidth. These helpers spin for kSpinMicros after each
// job, so back-to-back kernels find them awake, and then sleep.
class Helpers {
 public:
  static constexpr int64_t kSpinMicros = 300;

  // Created at first use with XLA's intra-op thread count (the caller is one of them).
  static Helpers& Get(int64_t threads) {
    static Helpers* helpers = new Helpers(threads - 1);  // never destroyed: detached threads
    return *helpers;
  }

  int64_t threads() const { return count_ + 1; }

  // Runs chunk(c) for every c in [0, num_chunks) on the caller and the helpers.
  template <typename Fn>
  void Run(int64_t num_chunks, Fn& chunk) {
    std::unique_lock<std::mutex> owner(run_mutex_, std::try_to_lock);
    if (count_ == 0 || num_chunks == 1 || num_chunks > kMaxChunks || !owner.owns_lock()) {
      for (int64_t c = 0; c < num_chunks; ++c) chunk(c);  // the helpers serve another kernel
      return;
    }
    fn_.store(&Call<Fn>, std::memory_order_relaxed);
    context_.store(&chunk, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t job = ((claim_.load(std::memory_order_relaxed) >> 32) + 1) & 0xFFFFFFFF;
    // Publishes the job (seq_cst: also ordered before reading sleepers_).
    claim_.store(job << 32 | static_cast<uint64_t>(num_chunks) << 16);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    Work(job);
    while (done_.load(std::memory_order_acquire) < num_chunks) Pause();
  }

 private:
  using ChunkFn = void (*)(void* context, int64_t c);
  static constexpr int64_t kMaxChunks = 0xFFFF;

  explicit Helpers(int64_t count) : count_(std::max<int64_t>(count, 0)) {
    for (int64_t i = 0; i < count_; ++i) std::thread([this] { Loop(); }).detach();
  }

  template <typename Fn>
  static void Call(void* context, int64_t c) { (*static_cast<Fn*>(context))(c); }

  static void Pause() {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }

  // Claims chunks of job `job` until none is left. The claim word holds (job << 32 | number of
  // chunks << 16 | next chunk), so a claim is valid only for the job it names, whatever a late
  // thread believes. The job's function is read after a valid claim: its caller then still
  // waits for that chunk, so the function cannot have been replaced by a later job's.
  void Work(uint64_t job) {
    uint64_t claim = claim_.load(std::memory_order_acquire);
    while ((claim >> 32) == job && (claim & 0xFFFF) < ((claim >> 16) & 0xFFFF)) {
      if (claim_.compare_exchange_weak(claim, claim + 1, std::memory_order_acq_rel)) {
        fn_.load(std::memory_order_relaxed)(context_.load(std::memory_order_relaxed),
                                            static_cast<int64_t>(claim & 0xFFFF));
        done_.fetch_add(1, std::memory_order_release);
        claim = claim_.load(std::memory_order_acquire);
      }
    }
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto spin_until =
          std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      uint64_t job;
      for (int i = 0; (job = claim_.load(std::memory_order_acquire) >> 32) == seen; ++i) {
        Pause();
        if (i % 256 == 255 && std::chrono::steady_clock::now() > spin_until) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return (claim_.load() >> 32) != seen; });
          sleepers_.fetch_sub(1);
        }
      }
      seen = job;
      Work(job);
    }
  }

  const int64_t count_;
  std::mutex run_mutex_;  // one job at a time
  std::atomic<ChunkFn> fn_{nullptr};
  std::atomic<void*> context_{nullptr};
  std::atomic<uint64_t> claim_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int64_t> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
};

// Runs fn(begin, end) over [0, n) on the calling thread and the helpers; `pool` (XLA's
// intra-op pool) sets how many threads there are. By default each thread takes one contiguous
// range of rows (whole 4-row tiles): the weight rows it streams are then consecutive in memory,
// so prefetching ahead fetches its own next rows rather than another thread's. `chunk` > 0
// hands out chunks of that many instead (uneven work, such as attention over ragged rows).
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, Fn fn, int64_t chunk = 0) {
  Helpers& helpers = Helpers::Get(pool.num_threads());
  if (chunk == 0) chunk = (n / helpers.threads() + kRowTile - 1) / kRowTile * kRowTile;
  chunk = std::max<int64_t>(chunk, 1);
  auto run_chunk = [&](int64_t c) { fn(c * chunk, std::min(n, (c + 1) * chunk)); };
  helpers.Run((n + chunk - 1) / chunk, run_chunk);
}

// Per-thread scratch floats that keep their memory between calls: kernels run many chunks per
// call (a range of weight rows, a (row, KV head) of attention) and need not allocate for each.
// Buffers 0-2 serve attention, 3-4 the int4 kernel, 5 a matmul's prepared input.
inline float* Scratch(int which, size_t n) {
  thread_local std::vector<float> buffers[6];
  std::vector<float>& buffer = buffers[which];
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// Decode streams every weight from memory once. The hardware prefetchers alone keep too few
// cache misses in flight for a core to reach its share of memory bandwidth (int8 rows read at
// 6 GB/s per core without this, 10 GB/s with it), so the kernels ask for the bytes
// kPrefetchBytes ahead of each weight row they read; rows of a tile are contiguous in memory.
// Into L2 (T1), not L1: a core's few L1 fill buffers capped the prefetches in flight. Measured
// on SmolLM2's shapes (2-core AMD EPYC, weights 3x the L3): int8 rows at 52% of a plain read's
// bandwidth with T0 at 8 KB ahead, 86-90% with T1 at 8-16 KB; int4 53% -> 81-99% with T1 at
// 16 KB; a batch-1 decode step 24% shorter (int4, int8 LM head) and 26% (float32).
constexpr int64_t kPrefetchBytes = 16384;

inline void PrefetchAhead(const void* weights) {
#if defined(__x86_64__)
  _mm_prefetch(static_cast<const char*>(weights) + kPrefetchBytes, _MM_HINT_T1);
#endif
}

#ifdef JINFER_SIMD
// e^x per lane: 2^(x log2 e) split into an integer power n and 2^f, |f| <= 1/2, by a degree-6
// polynomial (relative error about 2e-7). Arguments are clamped to [-87, 88] (e^-87 is about
// 1.6e-38, e^88 about 1.7e38), so n stays a normal float's exponent; a NaN argument gives
// e^-87, not NaN (scores are finite unless the model already produced NaN).
inline Floats Exp(Floats x) {
  const Floats t = Mul(Min(Max(x, Set1(-87.0f)), Set1(88.0f)), Set1(1.44269504f));
  const Floats n = Round(t);
  const Floats f = Sub(t, n);
  Floats p = Set1(1.5403530e-4f);
  for (const float c : {1.3333558e-3f, 9.6181291e-3f, 5.5504109e-2f, 2.4022651e-1f,
                        6.9314718e-1f, 1.0f})
    p = Fma(p, f, Set1(c));
  return TimesPowerOfTwo(p, n);
}
#endif

// What a matmul call does around y = x @ W.T, so a decoder layer needs no XLA ops between its
// kernels (each costs about a microsecond to launch, 12 per layer): the input may be the SwiGLU
// of x's interleaved (gate, up) pairs (the MLP's down projection), then RMS-normalized (the
// pre-attention and pre-MLP norms), and the output may add a residual [M, N].
struct MatmulFusion {
  bool swiglu = false;
  const float* norm_weight = nullptr;  // [K], or none
  float norm_eps = 0.0f;
  const float* residual = nullptr;  // [M, N], or none
};

// Where a matmul's rows go: y[m, n] = value (+ residual[m, n]).
struct Output {
  float* y;
  const float* residual;
  int64_t N;
  void Store(int64_t m, int64_t n, float value) const {
    y[m * N + n] = residual == nullptr ? value : value + residual[m * N + n];
  }
};

inline float Silu(float g) { return g / (1.0f + std::exp(-g)); }

// The input rows [M, K] of a fused matmul, from x [M, K] (or [M, 2K] with swiglu): x itself
// when nothing is fused, else the prepared rows in the calling thread's scratch. The norm is
// x * rsqrt(mean(x^2) + eps) * weight in float32, as `jinfer.models.llama.rms_norm`.
const float* PrepareInput(const float* x, int64_t M, int64_t K, const MatmulFusion& f) {
  if (!f.swiglu && f.norm_weight == nullptr) return x;
  float* in = Scratch(5, M * K);
  for (int64_t m = 0; m < M; ++m) {
    float* row = in + m * K;
    if (f.swiglu) {
      const float* pairs = x + m * 2 * K;
      int64_t k = 0;
#ifdef JINFER_SIMD
      for (; k + kLanes <= K; k += kLanes) {
        Floats gate, up;
        Deinterleave(pairs + 2 * k, &gate, &up);
        const Floats sigmoid = Div(Set1(1.0f), Add(Set1(1.0f), Exp(Sub(Zero(), gate))));
        Store(row + k, Mul(Mul(gate, sigmoid), up));
      }
#endif
      for (; k < K; ++k) row[k] = Silu(pairs[2 * k]) * pairs[2 * k + 1];
    } else {
      std::memcpy(row, x + m * K, K * sizeof(float));
    }
    if (f.norm_weight != nullptr) {
      float squares = 0.0f;
      for (int64_t k = 0; k < K; ++k) squares += row[k] * row[k];
      const float inv_rms = 1.0f / std::sqrt(squares / static_cast<float>(K) + f.norm_eps);
      for (int64_t k = 0; k < K; ++k) row[k] = row[k] * inv_rms * f.norm_weight[k];
    }
  }
  return in;
}

// Per-format weight rows. Each loads kLanes consecutive inputs of one row as float32 (Load)
// and knows its scalar value (At) for the portable path.
struct F32Row {
  const float* w;
  const void* Address(int64_t k) const { return w + k; }
  float At(int64_t k) const { return w[k]; }
#ifdef JINFER_SIMD
  Floats Load(int64_t k) const { return ::Load(w + k); }
#endif
};

struct BF16Row {
  const uint16_t* w;
  const void* Address(int64_t k) const { return w + k; }
  float At(int64_t k) const {
    uint32_t bits = static_cast<uint32_t>(w[k]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
#ifdef JINFER_SIMD
  Floats Load(int64_t k) const { return WidenBF16(w + k); }
#endif
};

struct Int8Row {
  const int8_t* w;
  const void* Address(int64_t k) const { return w + k; }
  float At(int64_t k) const { return w[k]; }
#ifdef JINFER_SIMD
  Floats Load(int64_t k) const { return WidenInt8(w + k); }
#endif
};

// sum over one group [k0, k0 + len) of x[i, k] * w[k], for MT rows of x (stride ldx), added
// times `scale` into acc. len is a multiple of 32.
#ifdef JINFER_SIMD
template <int MT, typename Row>
inline void AccumulateGroup(const float* x, int64_t ldx, const Row& row, int64_t k0, int64_t len,
                            Floats scale, Floats* acc) {
  Floats even[MT], odd[MT];  // two chains per row hide the FMA latency
  for (int i = 0; i < MT; ++i) even[i] = odd[i] = Zero();
  for (int64_t k = k0; k < k0 + len; k += 2 * kLanes) {
    PrefetchAhead(row.Address(k));
    const Floats w0 = row.Load(k), w1 = row.Load(k + kLanes);
    for (int i = 0; i < MT; ++i) {
      even[i] = Fma(Load(x + i * ldx + k), w0, even[i]);
      odd[i] = Fma(Load(x + i * ldx + k + kLanes), w1, odd[i]);
    }
  }
  for (int i = 0; i < MT; ++i) acc[i] = Fma(Add(even[i], odd[i]), scale, acc[i]);
}
#endif

// out[i] = sum_k x[i, k] * w[k] * scale(k) for MT rows; scale is per group of `group` inputs
// (group_scales, one per group) or none (nullptr).
template <int MT, typename Row>
inline void DotRows(const float* x, int64_t ldx, int64_t K, const Row& row, int64_t group,
                    const float* group_scales, float* out) {
#ifdef JINFER_SIMD
  Floats acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = Zero();
  if (group_scales == nullptr) {
    AccumulateGroup<MT>(x, ldx, row, 0, K, Set1(1.0f), acc);
  } else {
    for (int64_t g = 0; g * group < K; ++g)
      AccumulateGroup<MT>(x, ldx, row, g * group, group, Set1(group_scales[g]), acc);
  }
  for (int i = 0; i < MT; ++i) out[i] = ReduceAdd(acc[i]);
#else
  for (int i = 0; i < MT; ++i) out[i] = 0.0f;
  for (int64_t g0 = 0; g0 < K; g0 += group) {
    const float s = group_scales == nullptr ? 1.0f : group_scales[g0 / group];
    for (int i = 0; i < MT; ++i) {
      float part = 0.0f;
      for (int64_t k = g0; k < g0 + group; ++k) part += x[i * ldx + k] * row.At(k);
      out[i] += part * s;
    }
  }
#endif
}

// One x row against four weight rows (M = 1, the common decode step): four independent
// accumulator chains and one x load per four weight loads.
template <typename Row>
inline void DotFourRows(const float* x, int64_t K, const Row* rows, int64_t group,
                        const float* group_scales, int64_t groups_per_row, float* out) {
#ifdef JINFER_SIMD
  Floats acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = Zero();
  for (int64_t g0 = 0; g0 < K; g0 += group) {
    Floats part[4];
    for (int i = 0; i < 4; ++i) part[i] = Zero();
    for (int64_t k = g0; k < g0 + group; k += kLanes) {
      const Floats xv = Load(x + k);
      for (int i = 0; i < 4; ++i) PrefetchAhead(rows[i].Address(k));
      for (int i = 0; i < 4; ++i) part[i] = Fma(xv, rows[i].Load(k), part[i]);
    }
    for (int i = 0; i < 4; ++i) {
      acc[i] = group_scales == nullptr
                   ? Add(acc[i], part[i])
                   : Fma(part[i], Set1(group_scales[i * groups_per_row + g0 / group]), acc[i]);
    }
  }
  for (int i = 0; i < 4; ++i) out[i] = ReduceAdd(acc[i]);
#else
  for (int i = 0; i < 4; ++i) {
    DotRows<1>(x, K, K, rows[i], group,
               group_scales == nullptr ? nullptr : group_scales + i * groups_per_row, out + i);
  }
#endif
}

// y[m, n] = row_scale[n] * sum_k x[m, k] * w_n[k] (* group scale), for rows n in [n0, n1)
// (stored through `y`, which may add a residual).
// make_row(n) gives row n's weights; row_scales (per output row) may be null.
template <typename MakeRow>
void MatmulRows(const float* x, int64_t M, int64_t K, int64_t N, MakeRow make_row, int64_t group,
                const float* group_scales, const float* row_scales, const Output& y, int64_t n0,
                int64_t n1) {
  const int64_t groups_per_row = K / group;
  float out[kRowTile];
  if (M == 1) {
    for (; n0 + 4 <= n1; n0 += 4) {
      const decltype(make_row(n0)) rows[4] = {make_row(n0), make_row(n0 + 1), make_row(n0 + 2),
                                              make_row(n0 + 3)};
      DotFourRows(x, K, rows, group,
                  group_scales == nullptr ? nullptr : group_scales + n0 * groups_per_row,
                  groups_per_row, out);
      for (int i = 0; i < 4; ++i)
        y.Store(0, n0 + i, out[i] * (row_scales == nullptr ? 1.0f : row_scales[n0 + i]));
    }
  }
  for (int64_t n = n0; n < n1; ++n) {  // M > 1, or the last rows of a chunk
    const auto row = make_row(n);
    const float* gs = group_scales == nullptr ? nullptr : group_scales + n * groups_per_row;
    for (int64_t m = 0; m < M; m += kRowTile) {
      const int64_t mt = std::min<int64_t>(kRowTile, M - m);
      const float* xm = x + m * K;
      switch (mt) {
        case 4: DotRows<4>(xm, K, K, row, group, gs, out); break;
        case 3: DotRows<3>(xm, K, K, row, group, gs, out); break;
        case 2: DotRows<2>(xm, K, K, row, group, gs, out); break;
        default: DotRows<1>(xm, K, K, row, group, gs, out); break;
      }
      const float s = row_scales == nullptr ? 1.0f : row_scales[n];
      for (int64_t i = 0; i < mt; ++i) y.Store(m + i, n, out[i] * s);
    }
  }
}

ffi::Error CheckShapes(int64_t M, int64_t K, int64_t x_k, int64_t y_m, int64_t y_n, int64_t N) {
  if (x_k != K || y_m != M || y_n != N)
    return ffi::Error::InvalidArgument("jinfer cpu matmul: x, w and y shapes do not agree");
  if (K % 32 != 0) return ffi::Error::InvalidArgument("jinfer cpu matmul: K must divide by 32");
  return ffi::Error::Success();
}

// A matmul call's operands: x [M, K] ([M, 2K] with swiglu), a norm weight [K] (or empty: no
// norm) and a residual [M, N] (or empty). Checks the shapes; the fusion and y's rows out.
ffi::Error ReadMatmul(const ffi::Buffer<ffi::F32>& x, int64_t K, int64_t N,
                      const ffi::Buffer<ffi::F32>& norm_weight, float norm_eps,
                      const ffi::Buffer<ffi::F32>& residual, bool swiglu,
                      ffi::ResultBuffer<ffi::F32>& y, MatmulFusion* fusion, Output* out) {
  const int64_t M = x.dimensions()[0], x_k = x.dimensions()[1] / (swiglu ? 2 : 1);
  if (auto e = CheckShapes(M, K, x_k, y->dimensions()[0], y->dimensions()[1], N); e.failure())
    return e;
  if (swiglu && x.dimensions()[1] != 2 * K)
    return ffi::Error::InvalidArgument("jinfer cpu matmul: swiglu takes x [M, 2K]");
  if (norm_weight.element_count() != 0 && norm_weight.element_count() != static_cast<size_t>(K))
    return ffi::Error::InvalidArgument("jinfer cpu matmul: the norm weight must have K elements");
  if (residual.element_count() != 0 && residual.element_count() != static_cast<size_t>(M * N))
    return ffi::Error::InvalidArgument("jinfer cpu matmul: the residual must be [M, N]");
  fusion->swiglu = swiglu;
  fusion->norm_weight = norm_weight.element_count() ? norm_weight.typed_data() : nullptr;
  fusion->norm_eps = norm_eps;
  fusion->residual = residual.element_count() ? residual.typed_data() : nullptr;
  *out = Output{y->typed_data(), fusion->residual, N};
  return ffi::Error::Success();
}

// The FFI operands and attributes every matmul handler takes after its weights.
#define JINFER_MATMUL_FUSION_PARAMS                                                        \
  ffi::Buffer<ffi::F32> norm_weight, ffi::Buffer<ffi::F32> residual,                        \
      ffi::ResultBuffer<ffi::F32> y, float norm_eps, bool swiglu

template <ffi::DataType W, typename Row, typename Elem>
ffi::Error FloatMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<W> w,
                       JINFER_MATMUL_FUSION_PARAMS) {
  const int64_t M = x.dimensions()[0], K = w.dimensions()[1], N = w.dimensions()[0];
  MatmulFusion fusion;
  Output out;
  if (auto e = ReadMatmul(x, K, N, norm_weight, norm_eps, residual, swiglu, y, &fusion, &out);
      e.failure())
    return e;
  const float* xp = PrepareInput(x.typed_data(), M, K, fusion);
  const Elem* wp = reinterpret_cast<const Elem*>(w.untyped_data());
  ParallelFor(pool, N, [=](int64_t n0, int64_t n1) {
    MatmulRows(xp, M, K, N, [=](int64_t n) { return Row{wp + n * K}; }, K, nullptr, nullptr, out,
               n0, n1);
  });
  return ffi::Error::Success();
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> codes,
                      ffi::AnyBuffer scales, JINFER_MATMUL_FUSION_PARAMS) {
  const int64_t M = x.dimensions()[0], K = codes.dimensions()[1], N = codes.dimensions()[0];
  MatmulFusion fusion;
  Output out;
  if (auto e = ReadMatmul(x, K, N, norm_weight, norm_eps, residual, swiglu, y, &fusion, &out);
      e.failure())
    return e;
  const bool per_group = scales.dimensions().size() == 2;
  const int64_t group = per_group ? K / scales.dimensions()[1] : K;
  if (group % 32 != 0) return ffi::Error::InvalidArgument("jinfer int8 matmul: group % 32 != 0");
  const float* xp = PrepareInput(x.typed_data(), M, K, fusion);
  const int8_t* wp = codes.typed_data();
  const float* sp = reinterpret_cast<const float*>(scales.untyped_data());
  ParallelFor(pool, N, [=](int64_t n0, int64_t n1) {
    MatmulRows(xp, M, K, N, [=](int64_t n) { return Int8Row{wp + n * K}; }, group,
               per_group ? sp : nullptr, per_group ? nullptr : sp, out, n0, n1);
  });
  return ffi::Error::Success();
}

// IEEE float16 -> float32 (int4 scales and offsets are stored in 16 bits, as GGUF's Q4_1).
inline float HalfToFloat(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float f = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -f : f;
  }
  const uint32_t bits = exponent == 31 ? sign | 0x7F800000u | (mantissa << 13)
                                       : sign | ((exponent + 112) << 23) | (mantissa << 13);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

constexpr int64_t kMaxGroups = 2048;  // int4 groups per weight row (K <= 65536 at groups of 32)

// A row's G float16 scales or offsets as float32 (vector conversion, off the FMA chains).
inline void HalvesToFloats(const uint16_t* h, int64_t G, float* out) {
  int64_t g = 0;
#ifdef JINFER_SIMD
  for (; g + kLanes <= G; g += kLanes) Store(out + g, WidenHalves(h + g));
#endif
  for (; g < G; ++g) out[g] = HalfToFloat(h[g]);
}

// sum_k x[i, k] * code[k] * scale(group of k) for MT rows of shuffled x (stride K) against one
// packed int4 weight row: each 32-code block is decoded to floats once and multiplied into all
// MT rows, so a batch costs one decode per weight, as the float path's loads do. A block's 16
// bytes hold its even inputs in the low nibbles (x[k, k + 16)) and odd in the high ones.
template <int MT>
inline void Int4DotRows(const float* xs, int64_t K, const uint8_t* row, int64_t group,
                        const float* scales, float* out) {
#ifdef JINFER_SIMD
  // The group's scale is folded into the decoded block (2 multiplies) rather than applied to
  // per-group partial sums of every x row (MT adds and FMAs per block).
  Floats even[MT], odd[MT];
  for (int i = 0; i < MT; ++i) even[i] = odd[i] = Zero();
  for (int64_t g0 = 0; g0 < K; g0 += group) {
    const Floats scale = Set1(scales[g0 / group]);
    for (int64_t k = g0; k < g0 + group; k += 32) {
      PrefetchAhead(row + k / 2);
      for (int c = 0; c < 16; c += kLanes) {
        const Floats lo = Mul(LowNibbles(row + k / 2 + c), scale);
        const Floats hi = Mul(HighNibbles(row + k / 2 + c), scale);
        for (int i = 0; i < MT; ++i) {
          even[i] = Fma(Load(xs + i * K + k + c), lo, even[i]);
          odd[i] = Fma(Load(xs + i * K + k + 16 + c), hi, odd[i]);
        }
      }
    }
  }
  for (int i = 0; i < MT; ++i) out[i] = ReduceAdd(Add(even[i], odd[i]));
#else
  for (int i = 0; i < MT; ++i) out[i] = 0.0f;
  for (int64_t g0 = 0; g0 < K; g0 += group) {
    for (int i = 0; i < MT; ++i) {
      const float* xm = xs + i * K;
      float part = 0.0f;
      for (int64_t k = g0; k < g0 + group; k += 32)
        for (int j = 0; j < 16; ++j)
          part += xm[k + j] * (row[k / 2 + j] & 0x0F) + xm[k + 16 + j] * (row[k / 2 + j] >> 4);
      out[i] += part * scales[g0 / group];
    }
  }
#endif
}

// One x row against four int4 weight rows (M = 1, the common decode step): four independent
// accumulator chains (one row's chain alone waits on each group's FMA latency) and one x load
// per four decoded blocks. scales: the four rows' G float scales, row after row.
inline void Int4DotFourRows(const float* xs, int64_t K, const uint8_t* const* rows,
                            int64_t group, const float* scales, int64_t G, float* out) {
#ifdef JINFER_SIMD
  Floats acc[4];
  for (int r = 0; r < 4; ++r) acc[r] = Zero();
  for (int64_t g0 = 0; g0 < K; g0 += group) {
    Floats part[4];
    for (int r = 0; r < 4; ++r) part[r] = Zero();
    for (int64_t k = g0; k < g0 + group; k += 32) {
      for (int r = 0; r < 4; ++r) PrefetchAhead(rows[r] + k / 2);
      for (int c = 0; c < 16; c += kLanes) {
        const Floats x_even = Load(xs + k + c), x_odd = Load(xs + k + 16 + c);
        for (int r = 0; r < 4; ++r) {
          const uint8_t* p = rows[r] + k / 2 + c;
          part[r] = Fma(x_odd, HighNibbles(p), Fma(x_even, LowNibbles(p), part[r]));
        }
      }
    }
    for (int r = 0; r < 4; ++r) acc[r] = Fma(part[r], Set1(scales[r * G + g0 / group]), acc[r]);
  }
  for (int r = 0; r < 4; ++r) out[r] = ReduceAdd(acc[r]);
#else
  for (int r = 0; r < 4; ++r) Int4DotRows<1>(xs, K, rows[r], group, scales + r * G, out + r);
#endif
}

#ifdef JINFER_INT8_DOT
// x rows for the int4 kernel's integer dot products. Each block of 32 inputs is stored as two
// int8 levels, x ~ d * (q1 + q2 / 256) with d = max|x| / 127: q1 rounds x / d, q2 rounds the
// remainder in 256ths of d, so each input keeps about 15 bits, close to float accuracy (plain
// int8 activations, as llama.cpp's Q8 blocks, would keep 8). Layout, per 128 inputs (a "quad"
// of 4 blocks, matching one 64-byte load of packed codes whose low nibbles are the even
// inputs and high nibbles the odd ones): q1 of the even inputs (16 per block, block after
// block), q1 of the odd inputs, then q2 likewise; 256 bytes per quad. lane_scales holds d / 256
// for each block's 4 lanes of an int8 dot product's int32 result. K is padded to whole quads
// with zeros.
struct TwoLevelX {
  int64_t quads;
  std::vector<int8_t> codes;        // [M, quads, 256]
  std::vector<float> lane_scales;   // [M, quads, 16]
  int64_t padded_groups;            // G rounded up to 16
  std::vector<float> group_sums;    // [M, padded_groups]: sums of the represented x per group
};

// q1 and q2 of kLanes inputs already scaled by 1 / d, stored as kLanes bytes each; returns
// what they represent, in units of d.
inline Floats StoreTwoLevel(Floats scaled, int8_t* q1_out, int8_t* q2_out) {
  const Floats q1 = Round(scaled);
  const Floats q2 = Min(Max(Round(Mul(Sub(scaled, q1), Set1(256.0f))), Set1(-127.0f)), Set1(127.0f));
  StoreInt8(q1, q1_out);
  StoreInt8(q2, q2_out);
  return Fma(q2, Set1(1.0f / 256.0f), q1);
}

TwoLevelX QuantizeTwoLevel(const float* x, int64_t M, int64_t K, int64_t group) {
  TwoLevelX out;
  out.quads = (K + 127) / 128;
  out.codes.assign(M * out.quads * 256, 0);
  out.lane_scales.assign(M * out.quads * 16, 0.0f);
  out.padded_groups = (K / group + 15) / 16 * 16;
  out.group_sums.assign(M * out.padded_groups, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < K / 32; ++b) {
      const float* block = x + m * K + b * 32;
      Floats amax_lanes = Zero();
      for (int c = 0; c < 32; c += kLanes) amax_lanes = Max(amax_lanes, Abs(Load(block + c)));
      const float amax = ReduceMax(amax_lanes);
      const float d = amax / 127.0f;
      // Blocks below 127 * FLT_MIN count as zeros: 127 / amax would overflow to inf.
      const Floats inv = Set1(amax > 127.0f * FLT_MIN ? 127.0f / amax : 0.0f);
      const int64_t quad = b / 4, slot = b % 4;
      // Input 2i is the low nibble of byte i: even inputs first, then odd, per level.
      int8_t* q = out.codes.data() + (m * out.quads + quad) * 256 + slot * 16;
      Floats represented = Zero();
      for (int c = 0; c < 16; c += kLanes) {  // even and odd inputs [c, c + kLanes) of 16
        Floats even, odd;
        Deinterleave(block + 2 * c, &even, &odd);
        represented = Add(represented, Add(StoreTwoLevel(Mul(even, inv), q + c, q + 128 + c),
                                           StoreTwoLevel(Mul(odd, inv), q + 64 + c, q + 192 + c)));
      }
      std::fill_n(out.lane_scales.data() + (m * out.quads + quad) * 16 + slot * 4, 4, d / 256.0f);
      out.group_sums[m * out.padded_groups + b * 32 / group] += d * ReduceAdd(represented);
    }
  }
  return out;
}

// R int4 weight rows times MT two-level x rows in integer dot products, kBytes of each row's
// codes (a quad's 64 bytes in one or two steps) at a time, split into nibbles: per (row, x
// row) the dot products of codes x q1 even/odd, shifted by 8 bits, plus codes x q2 even/odd,
// whose int32 lanes (4 per block) are converted once and scaled by the block's weight scale
// times d / 256. block_scales[r]: row r's scale of each 32-input block, zero-padded to whole
// quads. The offsets' term, sum_g offset[g] * sum of x over group g, joins the same
// accumulators (offsets[r]: row r's, zero-padded to x.padded_groups).
template <int R, int MT>
inline void Int4DotTwoLevel(const TwoLevelX& x, int64_t m0, const uint8_t* const* rows,
                            int64_t row_bytes, const float* const* block_scales,
                            const float* const* offsets, float* out) {
  const int64_t quads = x.quads;
  Floats acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MT; ++i) acc[r][i] = Zero();
  for (int64_t b = 0; b < row_bytes; b += kBytes) {  // each row's codes, kBytes at a time
    const int64_t q = b / 64, c = b % 64;
    const auto x_levels = [&](int64_t i, Bytes* levels) {  // q1 even, odd; q2 even, odd
      const int8_t* xq = x.codes.data() + ((m0 + i) * quads + q) * 256 + c;
      for (int l = 0; l < 4; ++l) levels[l] = LoadBytes(xq + 64 * l);
      return Load(x.lane_scales.data() + ((m0 + i) * quads + q) * 16 + c / 4);
    };
    const auto row_codes = [&](int r, Bytes* lo, Bytes* hi) {
      const uint8_t* p = rows[r] + b;
      PrefetchAhead(p);
      const Bytes codes = LoadBytesUpTo(p, row_bytes - b);
      *lo = LowNibbleBytes(codes);
      *hi = HighNibbleBytes(codes);
      return SpreadBlockScales(block_scales[r] + b / 16);
    };
    // acc += the int32 lanes of codes . q1 * 256 + codes . q2, times their scales.
    const auto accumulate = [](Bytes lo, Bytes hi, const Bytes* levels, Floats scale, Floats* acc) {
      const Bytes high = ShiftLanesLeft8(DotTwo(ZeroBytes(), lo, levels[0], hi, levels[1]));
      *acc = Fma(LanesToFloats(DotTwo(high, lo, levels[2], hi, levels[3])), scale, *acc);
    };
    if constexpr (MT == 1) {
      // Each row's codes meet one x row: split where they are used (R rows' split codes held
      // at once would overflow AVX2's 16 registers).
      Bytes levels[4];
      const Floats x_scale = x_levels(0, levels);
      for (int r = 0; r < R; ++r) {
        Bytes lo, hi;
        const Floats w_scale = row_codes(r, &lo, &hi);
        accumulate(lo, hi, levels, Mul(w_scale, x_scale), &acc[r][0]);
      }
    } else {  // each row's codes split once for MT x rows
      Bytes lo[R], hi[R];
      Floats w_scale[R];
      for (int r = 0; r < R; ++r) w_scale[r] = row_codes(r, &lo[r], &hi[r]);
      for (int i = 0; i < MT; ++i) {
        Bytes levels[4];
        const Floats x_scale = x_levels(i, levels);
        for (int r = 0; r < R; ++r)
          accumulate(lo[r], hi[r], levels, Mul(w_scale[r], x_scale), &acc[r][i]);
      }
    }
  }
  for (int64_t g = 0; g < x.padded_groups; g += kLanes) {
    for (int i = 0; i < MT; ++i) {
      const Floats sums = Load(x.group_sums.data() + (m0 + i) * x.padded_groups + g);
      for (int r = 0; r < R; ++r) acc[r][i] = Fma(Load(offsets[r] + g), sums, acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < MT; ++i) out[r * MT + i] = ReduceAdd(acc[r][i]);
}

// Every x row against rows [n0, n1): weight rows by R (4 at one x row, where independent
// accumulators hide latency; 2 with x rows in tiles of 4, one code split for 4 x rows).
template <int R>
void Int4RowsTwoLevel(const TwoLevelX& x, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1,
                  const uint8_t* wp, const uint16_t* sp, const uint16_t* op, int64_t G,
                  const Output& y) {
  const int64_t group = K / G, blocks = x.quads * 4;
  const int64_t padded_groups = x.padded_groups;
  // Zero-filled: blocks and groups past K pad the last quad.
  float* scales = std::fill_n(Scratch(3, R * blocks + G), R * blocks, 0.0f) - R * blocks;
  float* halves = scales + R * blocks;
  float* offsets = std::fill_n(Scratch(4, R * padded_groups), R * padded_groups, 0.0f) -
                   R * padded_groups;
  float out[R * 4];
  for (int64_t n = n0; n + R <= n1; n += R) {
    const uint8_t* rows[R];
    const float* block_scales[R];
    const float* row_offsets[R];
    for (int r = 0; r < R; ++r) {
      rows[r] = wp + (n + r) * (K / 2);
      block_scales[r] = scales + r * blocks;
      if (group == 32) {
        HalvesToFloats(sp + (n + r) * G, G, scales + r * blocks);
      } else {  // each group's scale for each of its blocks
        HalvesToFloats(sp + (n + r) * G, G, halves);
        for (int64_t g = 0; g < G; ++g)
          std::fill_n(scales + r * blocks + g * (group / 32), group / 32, halves[g]);
      }
      HalvesToFloats(op + (n + r) * G, G, offsets + r * padded_groups);
      row_offsets[r] = offsets + r * padded_groups;
    }
    for (int64_t m = 0; m < M; m += 4) {
      const int64_t mt = std::min<int64_t>(4, M - m);
      switch (mt) {
        case 4: Int4DotTwoLevel<R, 4>(x, m, rows, K / 2, block_scales, row_offsets, out); break;
        case 3: Int4DotTwoLevel<R, 3>(x, m, rows, K / 2, block_scales, row_offsets, out); break;
        case 2: Int4DotTwoLevel<R, 2>(x, m, rows, K / 2, block_scales, row_offsets, out); break;
        default: Int4DotTwoLevel<R, 1>(x, m, rows, K / 2, block_scales, row_offsets, out); break;
      }
      for (int r = 0; r < R; ++r)
        for (int64_t i = 0; i < mt; ++i) y.Store(m + i, n + r, out[r * mt + i]);
    }
  }
}
#endif  // JINFER_INT8_DOT

// int4: w[n, k] = code * scale[n, g] + offset[n, g], scales and offsets float16. The offsets
// term is offset[n, g] * sum_{k in g} x[m, k], so per-group sums of x are taken once per call.
// Within each 32-input block x is reordered to [16 even inputs, 16 odd inputs] so the low and
// high nibbles of the block's 16 bytes multiply contiguous x.
ffi::Error Int4Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                      ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::F16> offsets,
                      JINFER_MATMUL_FUSION_PARAMS) {
  const int64_t M = x.dimensions()[0], K = codes.dimensions()[1] * 2, N = codes.dimensions()[0];
  MatmulFusion fusion;
  Output out;
  if (auto e = ReadMatmul(x, K, N, norm_weight, norm_eps, residual, swiglu, y, &fusion, &out);
      e.failure())
    return e;
  const int64_t G = scales.dimensions()[1], group = K / G;
  if (group % 32 != 0) return ffi::Error::InvalidArgument("jinfer int4 matmul: group % 32 != 0");
  if (G > kMaxGroups) return ffi::Error::InvalidArgument("jinfer int4 matmul: too many groups");
  const float* xp = PrepareInput(x.typed_data(), M, K, fusion);
  const uint8_t* wp = codes.typed_data();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.untyped_data());
  const uint16_t* op = reinterpret_cast<const uint16_t*>(offsets.untyped_data());
#ifdef JINFER_INT8_DOT
  {
    const TwoLevelX xq = QuantizeTwoLevel(xp, M, K, group);
    const TwoLevelX* xqp = &xq;
    ParallelFor(pool, N, [=](int64_t n0, int64_t n1) {
      int64_t n = n0;
      if (M == 1) {
        const int64_t n4 = n0 + (n1 - n0) / 4 * 4;
        Int4RowsTwoLevel<4>(*xqp, M, K, N, n, n4, wp, sp, op, G, out);
        n = n4;
      } else {
        const int64_t n2 = n0 + (n1 - n0) / 2 * 2;
        Int4RowsTwoLevel<2>(*xqp, M, K, N, n, n2, wp, sp, op, G, out);
        n = n2;
      }
      Int4RowsTwoLevel<1>(*xqp, M, K, N, n, n1, wp, sp, op, G, out);
    });
    return ffi::Error::Success();
  }
#endif
  // Plain locals: ParallelFor returns only after every claimed chunk is done.
  std::vector<float> shuffled(M * K), group_sums(M * G, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t block = k & ~int64_t{31}, j = k & 31;
      shuffled[m * K + block + (j & 1) * 16 + j / 2] = xp[m * K + k];
      group_sums[m * G + k / group] += xp[m * K + k];
    }
  }
  const float* xs = shuffled.data();
  const float* sums = group_sums.data();
  const Output y_rows = out;
  ParallelFor(pool, N, [=](int64_t n0, int64_t n1) {
    float out[kRowTile];
    float row_scales[4 * kMaxGroups], row_offsets[kMaxGroups];
    // The offsets term for x row m, sum_g offset[n, g] * sums[m, g], of the row n whose
    // offsets are in row_offsets.
    const auto offset_term = [&](int64_t m) {
      float total = 0.0f;
      for (int64_t g = 0; g < G; ++g) total += row_offsets[g] * sums[m * G + g];
      return total;
    };
    if (M == 1) {
      for (; n0 + 4 <= n1; n0 += 4) {
        const uint8_t* rows[4];
        for (int r = 0; r < 4; ++r) rows[r] = wp + (n0 + r) * (K / 2);
        HalvesToFloats(sp + n0 * G, 4 * G, row_scales);
        Int4DotFourRows(xs, K, rows, group, row_scales, G, out);
        for (int r = 0; r < 4; ++r) {
          HalvesToFloats(op + (n0 + r) * G, G, row_offsets);
          y_rows.Store(0, n0 + r, out[r] + offset_term(0));
        }
      }
    }
    for (int64_t n = n0; n < n1; ++n) {  // M > 1, or the last rows of a chunk
      const uint8_t* row = wp + n * (K / 2);
      HalvesToFloats(sp + n * G, G, row_scales);
      HalvesToFloats(op + n * G, G, row_offsets);
      for (int64_t m = 0; m < M; m += kRowTile) {
        const int64_t mt = std::min<int64_t>(kRowTile, M - m);
        const float* xm = xs + m * K;
        switch (mt) {
          case 4: Int4DotRows<4>(xm, K, row, group, row_scales, out); break;
          case 3: Int4DotRows<3>(xm, K, row, group, row_scales, out); break;
          case 2: Int4DotRows<2>(xm, K, row, group, row_scales, out); break;
          default: Int4DotRows<1>(xm, K, row, group, row_scales, out); break;
        }
        for (int64_t i = 0; i < mt; ++i) y_rows.Store(m + i, n, out[i] + offset_term(m + i));
      }
    }
  });
  return ffi::Error::Success();
}


// Scalar (portable) attention pieces: q . k over H inputs, and out += p * v.
template <typename Row>
inline float Dot(const float* q, const Row& k, int64_t H) {
  float dot = 0.0f;
  for (int64_t h = 0; h < H; ++h) dot += q[h] * k.At(h);
  return dot;
}

template <typename Row>
inline void AddScaled(float p, const Row& v, int64_t H, float* out) {
  for (int64_t h = 0; h < H; ++h) out[h] += p * v.At(h);
}

#ifdef JINFER_SIMD

// The vector path of AttendOneHead for H % kLanes == 0, G query heads at a time (a
// compile-time count, so their accumulators stay in registers: with a run-time count they lived
// on the stack and every FMA waited on a store, 3x slower): every key row is loaded (and, for
// bfloat16, widened) once for all G query heads, and every value row once per 4 heads; the
// scores' exponentials run kLanes at a time; the weighted sum of values stays in registers (up
// to 4 heads by 4 vectors of columns at a time) and is normalised once at the end.
constexpr int64_t kMaxGroupsInRegisters = 8;

// The cache slots a step reads are mostly in memory, not in cache (the weights streamed since
// the last step evicted them): each slot's row is asked for, into L2, this many slots ahead of
// its use (SmolLM2 at batch 1: 12.8 -> 11.5 us per layer; 8 slots into L1 gained 3%).
constexpr int64_t kSlotsAhead = 16;

template <typename Elem>
inline void PrefetchSlot(const Elem* row, int64_t H) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < H * static_cast<int64_t>(sizeof(Elem)); b += 64)
    _mm_prefetch(bytes + b, _MM_HINT_T1);
}

// out[g, h:h + kLanes * TILES] for GN heads from the scores' weights over the visible slots.
template <int GN, int TILES, typename Row, typename ValueAt>
inline void WeightedValues(const float* weights_GxS, ValueAt v_at, int64_t visible, int64_t h,
                           const float* inv_total, int64_t H, float* out_GxH) {
  Floats acc[GN][TILES];
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < TILES; ++c) acc[g][c] = Zero();
  for (int64_t s = 0; s < visible; ++s) {
    if (h == 0 && s + kSlotsAhead < visible) PrefetchSlot(v_at(s + kSlotsAhead), H);
    const Row v{v_at(s)};
    Floats value[TILES];
    for (int c = 0; c < TILES; ++c) value[c] = v.Load(h + c * kLanes);
    for (int g = 0; g < GN; ++g) {
      const Floats weight = Set1(weights_GxS[g * visible + s]);
      for (int c = 0; c < TILES; ++c) acc[g][c] = Fma(weight, value[c], acc[g][c]);
    }
  }
  for (int g = 0; g < GN; ++g) {
    const Floats norm = Set1(inv_total[g]);
    for (int c = 0; c < TILES; ++c)
      Store(out_GxH + g * H + h + c * kLanes, Mul(acc[g][c], norm));
  }
}

template <int GN, typename Row, typename ValueAt>
void WeightedValuesAllColumns(const float* weights_GxS, ValueAt v_at, int64_t visible,
                              const float* inv_total, int64_t H, float* out_GxH) {
  int64_t h = 0;
  for (; h + 4 * kLanes <= H; h += 4 * kLanes)
    WeightedValues<GN, 4, Row>(weights_GxS, v_at, visible, h, inv_total, H, out_GxH);
  switch ((H - h) / kLanes) {
    case 3: WeightedValues<GN, 3, Row>(weights_GxS, v_at, visible, h, inv_total, H, out_GxH); break;
    case 2: WeightedValues<GN, 2, Row>(weights_GxS, v_at, visible, h, inv_total, H, out_GxH); break;
    case 1: WeightedValues<GN, 1, Row>(weights_GxS, v_at, visible, h, inv_total, H, out_GxH); break;
    default: break;
  }
}

template <int G, typename Row, typename KeyAt, typename ValueAt>
void AttendOneHeadVector(const float* q_GxH, KeyAt k_at, ValueAt v_at, int64_t visible,
                         int64_t H, float* out_GxH, float* scores_GxS) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  for (int64_t s = 0; s < visible; ++s) {
    if (s + kSlotsAhead < visible) PrefetchSlot(k_at(s + kSlotsAhead), H);
    const Row k{k_at(s)};
    Floats acc[G];
    for (int g = 0; g < G; ++g) acc[g] = Zero();
    for (int64_t h = 0; h < H; h += kLanes) {
      const Floats key = k.Load(h);
      for (int g = 0; g < G; ++g) acc[g] = Fma(Load(q_GxH + g * H + h), key, acc[g]);
    }
    for (int g = 0; g < G; ++g) scores_GxS[g * visible + s] = ReduceAdd(acc[g]) * scale;
  }
  float inv_total[G];
  for (int g = 0; g < G; ++g) {
    float* row = scores_GxS + g * visible;
    Floats max_lanes = Set1(-INFINITY);
    int64_t s = 0;
    for (; s + kLanes <= visible; s += kLanes) max_lanes = Max(max_lanes, Load(row + s));
    float max_score = ReduceMax(max_lanes);
    for (int64_t t = s; t < visible; ++t) max_score = std::max(max_score, row[t]);
    const Floats shift = Set1(max_score);
    Floats total_lanes = Zero();
    for (s = 0; s + kLanes <= visible; s += kLanes) {
      const Floats e = Exp(Sub(Load(row + s), shift));
      Store(row + s, e);
      total_lanes = Add(total_lanes, e);
    }
    float tail_total = 0.0f;
    if (s < visible) {  // the last slots, through a buffer
      float tail[kLanes] = {};
      std::copy(row + s, row + visible, tail);
      Store(tail, Exp(Sub(Load(tail), shift)));
      for (int64_t t = 0; t < visible - s; ++t) tail_total += row[s + t] = tail[t];
    }
    inv_total[g] = 1.0f / (ReduceAdd(total_lanes) + tail_total);
  }
  constexpr int kFull = G / 4, kRest = G % 4;  // values for 4 heads at a time, then the rest
  for (int b = 0; b < kFull; ++b)
    WeightedValuesAllColumns<4, Row>(scores_GxS + 4 * b * visible, v_at, visible,
                                     inv_total + 4 * b, H, out_GxH + 4 * b * H);
  if constexpr (kRest > 0)
    WeightedValuesAllColumns<kRest, Row>(scores_GxS + 4 * kFull * visible, v_at, visible,
                                         inv_total + 4 * kFull, H, out_GxH + 4 * kFull * H);
}

// AttendOneHeadVector for a run-time count of 1..kMaxGroupsInRegisters query heads.
template <typename Row, typename KeyAt, typename ValueAt>
void AttendGroupsVector(const float* q_GxH, KeyAt k_at, ValueAt v_at, int64_t groups,
                        int64_t visible, int64_t H, float* out_GxH, float* scores_GxS) {
  switch (groups) {
#define JINFER_GROUPS_CASE(G)                                                              \
  case G:                                                                                  \
    return AttendOneHeadVector<G, Row>(q_GxH, k_at, v_at, visible, H, out_GxH, scores_GxS);
    JINFER_GROUPS_CASE(1) JINFER_GROUPS_CASE(2) JINFER_GROUPS_CASE(3) JINFER_GROUPS_CASE(4)
    JINFER_GROUPS_CASE(5) JINFER_GROUPS_CASE(6) JINFER_GROUPS_CASE(7) JINFER_GROUPS_CASE(8)
#undef JINFER_GROUPS_CASE
    default: return;
  }
}
#endif

// out[g, :] = softmax_s(q[g] . k[s] / sqrt(H)) @ v over slots s < visible, for the G query heads
// of one KV head; k_at(s) / v_at(s) give the H elements of slot s. scores_GxS holds G * visible.
template <typename Row, typename KeyAt, typename ValueAt>
void AttendOneHead(const float* q_GxH, KeyAt k_at, ValueAt v_at, int64_t groups,
                   int64_t visible, int64_t H, float* out_GxH, float* scores_GxS) {
#ifdef JINFER_SIMD
  if (H % kLanes == 0) {  // query heads in blocks of up to kMaxGroupsInRegisters
    for (int64_t g0 = 0; g0 < groups; g0 += kMaxGroupsInRegisters)
      AttendGroupsVector<Row>(q_GxH + g0 * H, k_at, v_at,
                              std::min(kMaxGroupsInRegisters, groups - g0), visible, H,
                              out_GxH + g0 * H, scores_GxS);
    return;
  }
#endif
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  float* scores = scores_GxS;
  for (int64_t g = 0; g < groups; ++g) {
    const float* q = q_GxH + g * H;
    float* out = out_GxH + g * H;
    float max_score = -INFINITY;
    for (int64_t s = 0; s < visible; ++s) {
      scores[s] = Dot(q, Row{k_at(s)}, H) * scale;
      max_score = std::max(max_score, scores[s]);
    }
    float total = 0.0f;
    for (int64_t s = 0; s < visible; ++s) total += scores[s] = std::exp(scores[s] - max_score);
    for (int64_t h = 0; h < H; ++h) out[h] = 0.0f;
    for (int64_t s = 0; s < visible; ++s) AddScaled(scores[s] / total, Row{v_at(s)}, H, out);
  }
}

// Runs heads(begin, end) over the B * K (row, KV head) pairs, threaded when `work` (cache
// elements read) is worth waking the helpers for.
template <typename Heads>
void ForEachHead(ffi::ThreadPool pool, int64_t pairs, int64_t work, Heads heads) {
  if (work < (int64_t{1} << 14)) {
    heads(0, pairs);
  } else {
    ParallelFor(pool, pairs, heads, /*chunk=*/1);
  }
}

// float32 -> bfloat16 bits, rounding to nearest even as XLA's convert does; NaN stays NaN.
// (Integer tests only: -ffast-math may assume floats are never NaN.)
inline uint16_t ToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float RoundToBF16(float f) {
  const uint32_t u = static_cast<uint32_t>(ToBF16(f)) << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

inline void StoreElem(float x, float* dst) { *dst = x; }
inline void StoreElem(float x, uint16_t* dst) { *dst = ToBF16(x); }

// Half-rotation RoPE (pairs i, i + H/2) of x [H] by cos/sin [H/2] into out [H]; with
// round_to_bf16 the result is rounded as a bfloat16 model's activations are.
inline void RotateHalf(const float* x, const float* cos, const float* sin, int64_t H,
                       bool round_to_bf16, float* out) {
  const int64_t half = H / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i] * cos[i] - x[i + half] * sin[i];
    const float b = x[i + half] * cos[i] + x[i] * sin[i];
    out[i] = round_to_bf16 ? RoundToBF16(a) : a;
    out[i + half] = round_to_bf16 ? RoundToBF16(b) : b;
  }
}

// Where a cache keeps slot s of (row b, KV head kv): contiguous [B, K, S, H] buffers, or paged
// pools [K, P, S_page, H] with page tables [B, M] (slot s of row b in page tables[b, s / S_page]
// at s % S_page; an entry holding no page, NO_PAGE or any id outside the pool, gives null).
template <typename Elem>
struct ContiguousSlots {
  static constexpr bool kRowsShareSlots = false;  // row b reads and writes only its own
  Elem* base;
  int64_t K, S, H;
  int64_t capacity() const { return S; }
  Elem* at(int64_t b, int64_t kv, int64_t s) const { return base + ((b * K + kv) * S + s) * H; }
};

template <typename Elem>
struct PagedSlots {
  static constexpr bool kRowsShareSlots = true;  // rows may be tokens of one sequence
  Elem* base;
  const int32_t* tables;
  int64_t P, page_size, M, H;
  int64_t capacity() const { return M * page_size; }
  Elem* at(int64_t b, int64_t kv, int64_t s) const {
    const int32_t page = tables[b * M + s / page_size];
    if (page < 0 || page >= P) return nullptr;
    return base + ((kv * P + page) * page_size + s % page_size) * H;
  }
};

// A whole decode-step attention from the q/k/v projection, in one call instead of the RoPE,
// scatter and attention ops XLA runs per layer: qkv [B, K, G + 2, H] holds each KV head's G
// query heads, its key and its value. First every row's key (RoPE'd by cos/sin [B, H/2] of its
// position) and value are stored at its position (dropped outside the cache or on a missing
// page, as XLA's scatter mode="drop"); then, per (row, KV head), the RoPE'd queries attend
// over slots 0..position (a missing page reads as zeros, as the XLA gather path does). Over
// pages, two passes, because an engine's packed prefill gives each token of a chunk its own
// row, and a token attends to the rows before it; over a contiguous cache each (row, KV head)
// writes and then attends in one pass. The caches are aliased outputs, written in place.
template <typename Row, typename Elem, typename Slots>
void RopeWriteAttend(ffi::ThreadPool& pool, const float* qkv, const float* cos, const float* sin,
                     const Slots& k_slots, const Slots& v_slots, const int32_t* pos, int64_t B,
                     int64_t K, int64_t groups, int64_t H, bool round_to_bf16, float* out) {
  const int64_t capacity = k_slots.capacity(), N = K * groups;
  const auto write = [&](int64_t bk) {  // (row b, KV head kv)'s key and value at its position
    const int64_t b = bk / K, kv = bk % K;
    if (pos[b] < 0 || pos[b] >= capacity) return;
    Elem* k_dst = k_slots.at(b, kv, pos[b]);
    Elem* v_dst = v_slots.at(b, kv, pos[b]);
    if (k_dst == nullptr) return;
    float* k_H = Scratch(2, H);
    const float* src = qkv + bk * (groups + 2) * H;  // [G + 2, H] of (row b, KV head kv)
    RotateHalf(src + groups * H, cos + b * (H / 2), sin + b * (H / 2), H, round_to_bf16, k_H);
    const float* v_H = src + (groups + 1) * H;
    for (int64_t h = 0; h < H; ++h) {
      StoreElem(k_H[h], k_dst + h);
      StoreElem(v_H[h], v_dst + h);
    }
  };
  if constexpr (Slots::kRowsShareSlots) {
    ParallelFor(pool, B * K, [&](int64_t begin, int64_t end) {
      for (int64_t bk = begin; bk < end; ++bk) write(bk);
    }, /*chunk=*/1);
  }
  const std::vector<Elem> zeros(H, Elem{0});
  const Elem* zero_row = zeros.data();
  auto heads = [&](int64_t begin, int64_t end) {
    float* scores = Scratch(0, groups * capacity);
    float* q_GxH = Scratch(1, groups * H);
    for (int64_t bk = begin; bk < end; ++bk) {
      if constexpr (!Slots::kRowsShareSlots) write(bk);
      const int64_t b = bk / K, kv = bk % K;
      const float* src = qkv + bk * (groups + 2) * H;
      for (int64_t g = 0; g < groups; ++g)
        RotateHalf(src + g * H, cos + b * (H / 2), sin + b * (H / 2), H, round_to_bf16,
                   q_GxH + g * H);
      const auto at = [&, b, kv](const Slots& slots) {
        return [&slots, zero_row, b, kv](int64_t s) -> const Elem* {
          const Elem* row = slots.at(b, kv, s);
          return row == nullptr ? zero_row : row;
        };
      };
      // A padding row (position < 0) sees slot 0 only: finite values, discarded by the caller.
      const int64_t visible = std::clamp<int64_t>(pos[b] + 1, 1, capacity);
      AttendOneHead<Row>(q_GxH, at(k_slots), at(v_slots), groups, visible, H,
                         out + (b * N + kv * groups) * H, scores);
    }
  };
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += std::clamp<int64_t>(pos[b] + 1, 1, capacity) * K * H;
  ForEachHead(pool, B * K, work, heads);
}

// XLA aliases the caches to the outputs; were it ever not to, start from the inputs.
template <typename Buffer, typename Result>
void StartFromInput(const Buffer& in, Result& out) {
  if (in.untyped_data() != out->untyped_data())
    std::memcpy(out->untyped_data(), in.untyped_data(), in.size_bytes());
}

template <ffi::DataType D, typename Row, typename Elem>
ffi::Error DecodeRopeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                               ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                               ffi::Buffer<D> k_in, ffi::Buffer<D> v_in,
                               ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out,
                               ffi::ResultBuffer<D> k_out, ffi::ResultBuffer<D> v_out,
                               bool round_to_bf16) {
  const auto kd = k_in.dimensions(), vd = v_in.dimensions(), qd = qkv.dimensions();
  const int64_t B = kd[0], K = kd[1], S = kd[2], H = kd[3], groups = qd[2] - 2;
  if (qd[0] != B || qd[1] != K || groups < 1 || qd[3] != H || H % 2 != 0 ||
      cos.dimensions()[0] != B || cos.dimensions()[1] != H / 2 || sin.dimensions()[0] != B ||
      sin.dimensions()[1] != H / 2 || vd[0] != B || vd[1] != K || vd[2] != S || vd[3] != H ||
      positions.dimensions()[0] != B)
    return ffi::Error::InvalidArgument("jinfer decode rope attention: qkv, cos/sin, caches disagree");
  StartFromInput(k_in, k_out);
  StartFromInput(v_in, v_out);
  const ContiguousSlots<Elem> k_slots{reinterpret_cast<Elem*>(k_out->untyped_data()), K, S, H};
  const ContiguousSlots<Elem> v_slots{reinterpret_cast<Elem*>(v_out->untyped_data()), K, S, H};
  RopeWriteAttend<Row, Elem>(pool, qkv.typed_data(), cos.typed_data(), sin.typed_data(), k_slots,
                             v_slots, positions.typed_data(), B, K, groups, H, round_to_bf16,
                             out->typed_data());
  return ffi::Error::Success();
}

template <ffi::DataType D, typename Row, typename Elem>
ffi::Error PagedDecodeRopeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                                    ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                                    ffi::Buffer<D> k_in, ffi::Buffer<D> v_in,
                                    ffi::Buffer<ffi::S32> tables,
                                    ffi::Buffer<ffi::S32> positions,
                                    ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<D> k_out,
                                    ffi::ResultBuffer<D> v_out, bool round_to_bf16) {
  const auto kd = k_in.dimensions(), vd = v_in.dimensions(), qd = qkv.dimensions();
  const int64_t K = kd[0], P = kd[1], Sp = kd[2], H = kd[3], groups = qd[2] - 2;
  const int64_t B = tables.dimensions()[0], M = tables.dimensions()[1];
  if (qd[0] != B || qd[1] != K || groups < 1 || qd[3] != H || H % 2 != 0 ||
      cos.dimensions()[0] != B || cos.dimensions()[1] != H / 2 || sin.dimensions()[0] != B ||
      sin.dimensions()[1] != H / 2 || vd[0] != K || vd[1] != P || vd[2] != Sp || vd[3] != H ||
      positions.dimensions()[0] != B)
    return ffi::Error::InvalidArgument(
        "jinfer paged decode rope attention: qkv, cos/sin, pools, tables disagree");
  StartFromInput(k_in, k_out);
  StartFromInput(v_in, v_out);
  const int32_t* tp = tables.typed_data();
  const PagedSlots<Elem> k_slots{reinterpret_cast<Elem*>(k_out->untyped_data()), tp, P, Sp, M, H};
  const PagedSlots<Elem> v_slots{reinterpret_cast<Elem*>(v_out->untyped_data()), tp, P, Sp, M, H};
  RopeWriteAttend<Row, Elem>(pool, qkv.typed_data(), cos.typed_data(), sin.typed_data(), k_slots,
                             v_slots, positions.typed_data(), B, K, groups, H, round_to_bf16,
                             out->typed_data());
  return ffi::Error::Success();
}

ffi::Error F32Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     JINFER_MATMUL_FUSION_PARAMS) {
  return FloatMatmul<ffi::F32, F32Row, float>(pool, x, w, norm_weight, residual, y, norm_eps,
                                              swiglu);
}

ffi::Error BF16Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      JINFER_MATMUL_FUSION_PARAMS) {
  return FloatMatmul<ffi::BF16, BF16Row, uint16_t>(pool, x, w, norm_weight, residual, y,
                                                   norm_eps, swiglu);
}

ffi::Error F32RopeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                            ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> k_out, ffi::ResultBuffer<ffi::F32> v_out,
                            bool round_to_bf16) {
  return DecodeRopeAttention<ffi::F32, F32Row, float>(pool, qkv, cos, sin, k, v, positions, out,
                                                       k_out, v_out, round_to_bf16);
}

ffi::Error BF16RopeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                             ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                             ffi::Buffer<ffi::BF16> k, ffi::Buffer<ffi::BF16> v,
                             ffi::Buffer<ffi::S32> positions, ffi::ResultBuffer<ffi::F32> out,
                             ffi::ResultBuffer<ffi::BF16> k_out,
                             ffi::ResultBuffer<ffi::BF16> v_out, bool round_to_bf16) {
  return DecodeRopeAttention<ffi::BF16, BF16Row, uint16_t>(pool, qkv, cos, sin, k, v, positions,
                                                           out, k_out, v_out, round_to_bf16);
}

ffi::Error F32PagedRopeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                                 ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                                 ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                 ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> positions,
                                 ffi::ResultBuffer<ffi::F32> out,
                                 ffi::ResultBuffer<ffi::F32> k_out,
                                 ffi::ResultBuffer<ffi::F32> v_out, bool round_to_bf16) {
  return PagedDecodeRopeAttention<ffi::F32, F32Row, float>(
      pool, qkv, cos, sin, k, v, tables, positions, out, k_out, v_out, round_to_bf16);
}

ffi::Error BF16PagedRopeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                                  ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                                  ffi::Buffer<ffi::BF16> k, ffi::Buffer<ffi::BF16> v,
                                  ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> positions,
                                  ffi::ResultBuffer<ffi::F32> out,
                                  ffi::ResultBuffer<ffi::BF16> k_out,
                                  ffi::ResultBuffer<ffi::BF16> v_out, bool round_to_bf16) {
  return PagedDecodeRopeAttention<ffi::BF16, BF16Row, uint16_t>(
      pool, qkv, cos, sin, k, v, tables, positions, out, k_out, v_out, round_to_bf16);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JinferMatmulF32, F32Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm weight [K] or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual [M, N] or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("norm_eps")
                                  .Attr<bool>("swiglu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JinferMatmulBF16, BF16Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm weight [K] or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual [M, N] or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("norm_eps")
                                  .Attr<bool>("swiglu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JinferMatmulInt8, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm weight [K] or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual [M, N] or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("norm_eps")
                                  .Attr<bool>("swiglu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JinferMatmulInt4, Int4Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // norm weight [K] or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual [M, N] or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("norm_eps")
                                  .Attr<bool>("swiglu"));

// RoPE attention handlers: (qkv, cos, sin, k cache, v cache, [page tables,] positions) ->
// (out, k cache, v cache), the caches aliased.
#define JINFER_ROPE_ATTENTION_INPUTS(T)                                                      \
  ffi::Ffi::Bind()                                                                           \
      .Ctx<ffi::ThreadPool>()                                                                \
      .Arg<ffi::Buffer<ffi::F32>>()                                                          \
      .Arg<ffi::Buffer<ffi::F32>>()                                                          \
      .Arg<ffi::Buffer<ffi::F32>>()                                                          \
      .Arg<ffi::Buffer<T>>()                                                                 \
      .Arg<ffi::Buffer<T>>()
#define JINFER_ROPE_ATTENTION_OUTPUTS(T)                                                     \
  Arg<ffi::Buffer<ffi::S32>>()                                                               \
      .Ret<ffi::Buffer<ffi::F32>>()                                                          \
      .Ret<ffi::Buffer<T>>()                                                                 \
      .Ret<ffi::Buffer<T>>()                                                                 \
      .Attr<bool>("round_to_bf16")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JinferDecodeRopeAttentionF32, F32RopeAttention,
                              JINFER_ROPE_ATTENTION_INPUTS(ffi::F32)
                                  .JINFER_ROPE_ATTENTION_OUTPUTS(ffi::F32));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JinferDecodeRopeAttentionBF16, BF16RopeAttention,
                              JINFER_ROPE_ATTENTION_INPUTS(ffi::BF16)
                                  .JINFER_ROPE_ATTENTION_OUTPUTS(ffi::BF16));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JinferPagedDecodeRopeAttentionF32, F32PagedRopeAttention,
                              JINFER_ROPE_ATTENTION_INPUTS(ffi::F32)
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .JINFER_ROPE_ATTENTION_OUTPUTS(ffi::F32));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JinferPagedDecodeRopeAttentionBF16, BF16PagedRopeAttention,
                              JINFER_ROPE_ATTENTION_INPUTS(ffi::BF16)
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .JINFER_ROPE_ATTENTION_OUTPUTS(ffi::BF16));
