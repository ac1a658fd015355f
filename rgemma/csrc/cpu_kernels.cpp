// Matrix-vector kernels for decoding on x86 CPUs with AVX2 and FMA.
//
// rgemma/backends/native.py builds this file once per instruction-set level,
// and the code below takes what each level has (`#if defined(__AVX512F__)`
// and the like): 16-lane float products with AVX-512, integer dot products
// in one instruction with VNNI (vpdpbusd: AVX512-VNNI or AVX-VNNI), and bf16 dot products with
// AVX512-BF16 (vdpbf16ps, the activations rounded to bf16 for them).
// Everything else is AVX2 on every level.
//
// y (M, N) = x (M, K) @ W (N, K)^T for a few rows of x (decode: one token per
// sequence). Decoding reads every weight once per step, so it is bound by
// memory bandwidth if the arithmetic keeps up: each kernel streams its weights
// once and uses each loaded block for every row of x while it is in registers.
//
// Weight formats (the layouts rgemma/quantize.py writes):
//   float: float32 or bfloat16 (N, K), widened to float32 in registers.
//   int8:  int8 (N, K) in -127..127 and a float32 scale per output row:
//          w = q * scale[n].
//   int4:  uint8 (N, K / 2) holding q in 0..15, and float16 scale and minimum
//          per group of G inputs (N, K / G), G a multiple of 64:
//          w = q * scale + minimum. In each block of 64 inputs (32 bytes),
//          byte i holds input i in its low nibble and input i + 32 in its high
//          nibble, so a mask and a shift unpack a block into two vectors.
//
// Widening int8 or int4 weights to float costs more instructions than the
// bandwidth leaves time for, so the quantized kernels keep the products in
// integers, as llama.cpp does: each row of x is quantized to int8 in blocks
// (scale max|x| / 127, round to nearest even), maddubs sums pairs of u8 x s8
// products into s16 and madd pairs of those into s32 (VNNI: vpdpbusd does
// both), and float multiply-adds apply the scales. Blocks are 256 inputs
// against int8 weights, whose scale is per row: the integer sums run over a
// whole block before one multiply-add applies x's scale (as llama.cpp's
// 256-input q8_K activations). Against int4 weights, whose scales change
// every 64 inputs, blocks are 64 inputs. With AVX512-VNNI, int8 weights meet x
// in 512-bit products as unsigned q + 128, and a per-row sum of x takes the
// 128 off (int8_tile). tests/test_kernels.py holds the same arithmetic in
// PyTorch and compares the two.
//
// Threads: torch's intra-op pool (at::parallel_for), over strips of output rows of
// every product that reads the same input at once (run_jobs).

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // inputs per inner step of the float kernels
constexpr int64_t kRowsPerTask = 32;
// Rows are short (a few KB), too short for the hardware prefetcher to ramp up
// on each, so every block read also prefetches the same place kRowsAhead rows
// further on, where the rows read next lie in memory.
constexpr int64_t kRowsAhead = 4;

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Parallel regions ------------------------------------------------------------------
//
// A region runs a list of jobs: the products that read the same input
// (linear_x and linear_y; q, k and v; the MLP's gate and up; the two RG-LRU
// gates) share one fork and join. Threads take runs of units (strips of weight
// rows, heads) from a shared counter, each run a share of what is left and
// never across two jobs, instead of one fixed half each: with fixed halves the
// thread that finished first waited a tenth of a step for the other
// (docs/PERFORMANCE.md has this file's measurements).

struct Job {
  int64_t units;    // strips of weight rows, or heads
  int64_t min_run;  // the fewest units a thread takes at once
  std::function<void(int64_t, int64_t)> run;  // does units [begin, end)
};

void run_jobs(const std::vector<Job>& jobs) {
  std::vector<int64_t> first(jobs.size() + 1, 0);  // each job's first unit in the whole list
  int64_t min_runs = 0;  // how many threads the work can keep busy at most
  for (size_t j = 0; j < jobs.size(); ++j) {
    first[j + 1] = first[j] + jobs[j].units;
    min_runs += (jobs[j].units + jobs[j].min_run - 1) / jobs[j].min_run;
  }
  const int64_t total = first.back(), threads = at::get_num_threads();
  std::atomic<int64_t> next{0};
  auto take = [&](size_t& job, int64_t& begin, int64_t& end) {  // the next run; false when none is left
    begin = next.load();
    do {
      if (begin >= total) return false;
      job = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
      end = std::min(first[job + 1], begin + std::max(jobs[job].min_run, (total - begin) / (2 * threads)));
    } while (!next.compare_exchange_weak(begin, end));
    return true;
  };
  at::parallel_for(0, std::min(threads, min_runs), 1, [&](int64_t, int64_t) {
    size_t job;
    int64_t begin, end;
    while (take(job, begin, end)) jobs[job].run(begin - first[job], end - first[job]);
  });
}

// The job of tiles.run<R, MB>(rows, m, n, ahead) for every strip of R weight
// rows (Rows, fewer at the end) and every 4 rows of x (fewer at the end):
// weight rows n.. against x rows m... Runs are at least kRowsPerTask rows.
// Strips of several rows share each load of x. The integer kernels, which do
// more work per byte of weights, read one row at a time instead: that read
// faster for int4 and slower for bf16 than 4 rows side by side.
template <int Rows, typename Row, typename MakeRow, typename Tiles>
Job tiles_job(int64_t M, int64_t N, MakeRow make_row, Tiles tiles) {
  const int64_t ahead = N > 1 ? (make_row(1).bytes(0) - make_row(0).bytes(0)) * kRowsAhead : 0;
  return {(N + Rows - 1) / Rows, (kRowsPerTask + Rows - 1) / Rows, [=](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t n0 = s * Rows, count = std::min<int64_t>(Rows, N - n0);
      Row rows[Rows];
      for (int64_t r = 0; r < count; ++r) rows[r] = make_row(n0 + r);
      auto strip = [&](auto x_rows, int64_t m) {  // the strip against x rows m .. m + x_rows
        constexpr int MB = decltype(x_rows)::value;
        if (count == Rows)
          tiles.template run<Rows, MB>(rows, m, n0, ahead);
        else
          for (int64_t r = 0; r < count; ++r) tiles.template run<1, MB>(rows + r, m, n0 + r, ahead);
      };
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) strip(std::integral_constant<int, 4>{}, m);
      if (m + 2 <= M) strip(std::integral_constant<int, 2>{}, m), m += 2;
      if (m < M) strip(std::integral_constant<int, 1>{}, m);
    }
  }};
}

// Float weights --------------------------------------------------------------
//
// The products of float weights take the widest float vectors the level has:
// 16 lanes and 32 registers with AVX-512, 8 and 16 with AVX2.

#if defined(__AVX512F__)
using Floats = __m512;
constexpr int kTileAccumulators = 16;
inline Floats zero_floats() { return _mm512_setzero_ps(); }
inline Floats load_floats(const float* p) { return _mm512_loadu_ps(p); }
inline Floats widen_bfloat16(const at::BFloat16* p) {  // bf16 is f32's top half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline Floats multiply_add(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum_lanes(Floats v) { return _mm512_reduce_add_ps(v); }
#else
using Floats = __m256;
constexpr int kTileAccumulators = 8;
inline Floats zero_floats() { return _mm256_setzero_ps(); }
inline Floats load_floats(const float* p) { return _mm256_loadu_ps(p); }
inline Floats widen_bfloat16(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline Floats multiply_add(Floats a, Floats b, Floats c) { return _mm256_fmadd_ps(a, b, c); }
inline float sum_lanes(Floats v) { return horizontal_sum(v); }
#endif
constexpr int kLanes = sizeof(Floats) / sizeof(float);

struct Float32Eights {
  const float* w;
  __m256 eight(int64_t offset) const { return _mm256_loadu_ps(w + offset); }
  Floats lanes(int64_t offset) const { return load_floats(w + offset); }
  float at(int64_t offset) const { return w[offset]; }
  const char* bytes(int64_t offset) const { return reinterpret_cast<const char*>(w + offset); }
};

struct BFloat16Eights {
  const at::BFloat16* w;
  __m256 eight(int64_t offset) const {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + offset));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));  // bf16 is f32's top half
  }
  Floats lanes(int64_t offset) const { return widen_bfloat16(w + offset); }
  float at(int64_t offset) const { return static_cast<float>(w[offset]); }
  const char* bytes(int64_t offset) const { return reinterpret_cast<const char*>(w + offset); }
};

// y[m, r] for R weight rows and MB rows of x. Each vector of weights is
// widened once for all MB rows of x, which stay in registers meanwhile: R * MB
// accumulators, MB inputs and one weight vector fit the registers up to
// R * MB = kTileAccumulators. At 4 rows of x, where a bf16 product is bound by
// arithmetic more than by memory, 2 x 4 tiles read fastest on AVX2, ahead of
// 4 x 2 tiles and of x reloaded per row.
template <int R, int MB, typename Eights>
void float_tile(const Eights* rows, const float* x, float* y, int64_t ldy, int64_t K, int64_t ahead) {
  Floats acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = zero_floats();
  const int64_t whole = K - K % kBlock;
  for (int64_t k = 0; k < whole; k += kBlock) {
    for (int r = 0; r < R; ++r) _mm_prefetch(rows[r].bytes(k) + ahead, _MM_HINT_T1);
    for (int j = 0; j < kBlock; j += kLanes) {
      Floats xs[MB];
      for (int m = 0; m < MB; ++m) {
        xs[m] = load_floats(x + m * K + k + j);
        asm("" : "+v"(xs[m]));  // keeps it in a register: GCC would reload it for every row of weights
      }
      for (int r = 0; r < R; ++r) {
        const Floats w = rows[r].lanes(k + j);
        for (int m = 0; m < MB; ++m) acc[r][m] = multiply_add(w, xs[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      float dot = sum_lanes(acc[r][m]);
      for (int64_t k = whole; k < K; ++k) dot += rows[r].at(k) * x[m * K + k];
      y[m * ldy + r] = dot;
    }
}

struct FloatTiles {
  const float* x;
  float* y;
  int64_t N, K;
  template <int R, int MB, typename Eights>
  void run(const Eights* rows, int64_t m, int64_t n, int64_t ahead) const {
    if constexpr (R * MB > kTileAccumulators) {  // past the registers: two strips of half the rows
      run<R / 2, MB>(rows, m, n, ahead);
      run<R / 2, MB>(rows + R / 2, m, n + R / 2, ahead);
    } else {
      float_tile<R, MB>(rows, x + m * K, y + m * N + n, N, K, ahead);
    }
  }
};

#if defined(__AVX512BF16__)
// bfloat16 weights on CPUs with bf16 dot products (vdpbf16ps: 32 products of
// bf16 pairs added into 16 float32 lanes per instruction, against three
// instructions per 16 weights widened to float32). The activations meet the
// weights rounded to bf16, as in the bf16 GEMMs these CPUs prefill with;
// products and sums stay float32. Measured (docs/PERFORMANCE.md), also
// passing x's rounding error as a second bf16 part kept 16 bits of x but
// cost a third of the speed at 4 rows and more.
struct BFloat16X {
  const at::BFloat16* x16;  // (MB, K) rows, K apart, rounded to nearest even
  const float* x;           // the float32 rows, for the inputs past the last whole 32
};

template <int R, int MB>
void bfloat16_tile(const BFloat16Eights* rows, BFloat16X x, float* y, int64_t ldy, int64_t K, int64_t ahead) {
  constexpr int64_t kStep = 32;  // bf16 values in a 512-bit vector
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  const int64_t whole = K - K % kStep;
  for (int64_t k = 0; k < whole; k += kStep) {
    __m512bh xs[MB];
    for (int m = 0; m < MB; ++m) xs[m] = (__m512bh)_mm512_loadu_si512(x.x16 + m * K + k);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(rows[r].bytes(k) + ahead, _MM_HINT_T1);
      const __m512bh w = (__m512bh)_mm512_loadu_si512(rows[r].w + k);
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], w, xs[m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      float dot = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t k = whole; k < K; ++k) dot += rows[r].at(k) * static_cast<float>(at::BFloat16(x.x[m * K + k]));
      y[m * ldy + r] = dot;
    }
}

struct BFloat16Tiles {
  BFloat16X x;
  float* y;
  int64_t N, K;
  // 32 registers hold R * MB = 16 accumulators, MB inputs and the weights.
  template <int R, int MB>
  void run(const BFloat16Eights* rows, int64_t m, int64_t n, int64_t ahead) const {
    bfloat16_tile<R, MB>(rows, {x.x16 + m * K, x.x + m * K}, y + m * N + n, N, K, ahead);
  }
};
#endif

void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 (M, K) tensor");
}

// y[m, h, :] += x[m, h, i..i+R) @ w[h, i..i+R, :]: R rows of weights in one
// pass over y, so y is loaded and stored once per R rows.
template <int R, typename Eights>
void add_rows(const float* x, const Eights& w, int64_t row, int64_t J, float* y) {
  __m256 scale[R];
  for (int r = 0; r < R; ++r) scale[r] = _mm256_set1_ps(x[r]);
  int64_t j = 0;
  for (; j + 8 <= J; j += 8) {
    __m256 acc = _mm256_loadu_ps(y + j);
    for (int r = 0; r < R; ++r) acc = _mm256_fmadd_ps(scale[r], w.eight(row + r * J + j), acc);
    _mm256_storeu_ps(y + j, acc);
  }
  for (; j < J; ++j)
    for (int r = 0; r < R; ++r) y[j] += x[r] * w.at(row + r * J + j);
}

// y[m, h, :] = x[m, h, :] @ w[h] for block-diagonal weights w (H, I, J), stored
// input-major as the RG-LRU gates are: the rows w[h, i, :] are read once, in
// memory order, 4 at a time, and added into y[m, h, :], which stays in L1.
// Each 4 rows prefetch the rows kGateRowsAhead further on: the hardware
// prefetcher stops at every 4 KB page. A job over heads. This read faster
// than one row at a time without prefetching, and than reading 8 or 64
// outputs down all I rows at a time.
template <typename Eights>
Job block_diagonal_job(const float* x, Eights w, int64_t M, int64_t H, int64_t I, int64_t J, float* y) {
  constexpr int64_t kGateRowsAhead = 16;
  return {H, 1, [=](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t m = 0; m < M; ++m) std::fill(y + (m * H + h) * J, y + (m * H + h + 1) * J, 0.0f);
      for (int64_t i = 0; i < I; i += 4) {
        const int64_t row = (h * I + i) * J, rows = std::min<int64_t>(4, I - i);
        const char* ahead = w.bytes(row + kGateRowsAhead * J);
        for (int64_t line = 0; line < w.bytes(rows * J) - w.bytes(0); line += 64)
          _mm_prefetch(ahead + line, _MM_HINT_T0);
        for (int64_t m = 0; m < M; ++m) {
          const float* xh = x + (m * H + h) * I + i;
          float* yh = y + (m * H + h) * J;
          if (rows == 4)
            add_rows<4>(xh, w, row, J, yh);
          else
            for (int64_t r = 0; r < rows; ++r) add_rows<1>(xh + r, w, row + r * J, J, yh);
        }
      }
    }
  }};
}

// The job of y (M, H, J) = x (M, H, I) @ w (H, I, J) per head, for a contiguous
// w, float32 or bfloat16.
Job block_diagonal_job(const float* x, const torch::Tensor& w, int64_t M, float* y) {
  const int64_t H = w.size(0), I = w.size(1), J = w.size(2);
  if (w.scalar_type() == torch::kBFloat16)
    return block_diagonal_job(x, BFloat16Eights{w.data_ptr<at::BFloat16>()}, M, H, I, J, y);
  TORCH_CHECK(w.scalar_type() == torch::kFloat32, "block-diagonal weights must be float32 or bfloat16");
  return block_diagonal_job(x, Float32Eights{w.data_ptr<float>()}, M, H, I, J, y);
}

torch::Tensor block_diagonal_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 (M, H, I) tensor");
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && w.size(0) == x.size(1) && w.size(1) == x.size(2),
              "weight must be a contiguous (H, I, J) tensor matching x (M, H, I)");
  auto y = torch::empty({x.size(0), w.size(0), w.size(2)}, x.options());
  run_jobs({block_diagonal_job(x.data_ptr<float>(), w, x.size(0), y.data_ptr<float>())});
  return y;
}

// Quantized weights ------------------------------------------------------------
//
// An int4 tile takes 8 consecutive blocks of a row at a time. Each block's integer
// dot product leaves 8 int32 partial sums; a tree of horizontal adds turns the
// 8 blocks' partial sums into one vector of 8 block sums, so that one convert
// and one multiply-add per 8 blocks apply the scales (x's per block, times the
// weights' per block). Measured on one Zen 3 core (int4, 2560 inputs, in L2):
// 1.7 ns per 64 inputs and 2.6 us per call, against 2.9 ns and 7.4 us with a
// multiply-add per block, a scalar loop for the minima and x quantized in scalar code.
// On Zen 4 too, a convert and a multiply-add per block in place of the
// horizontal adds measured no faster for int4 (the int8 tiles below do that
// only once per 256 inputs).

constexpr int64_t kBlocksPerStep = 8;
constexpr int64_t kInt8XBlock = 256;  // inputs of x per scale, against int8 weights

// Rows of x quantized to int8 in blocks of `block` inputs (the last may be
// shorter, a multiple of 32): x ~ q * scale.
struct QuantizedX {
  int64_t K, block, blocks, stride;  // blocks per row, and per row of `scale` and `sums` (padded to whole steps)
  std::vector<int8_t> q;      // (M, K)
  std::vector<float> scale;   // (M, stride), zero in the padding
  std::vector<float> sums;    // (M, stride): the sum of x over each block, for the int4 minima
  std::vector<float> offsets;  // (M): 128 times the sum of q * scale over the row, for unsigned weights
};

inline float horizontal_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Scale max|x| / 127 per block; q rounds to nearest even (the default rounding mode).
QuantizedX quantize_x(const float* x, int64_t M, int64_t K, int64_t block) {
  const int64_t blocks = (K + block - 1) / block,
                stride = (blocks + kBlocksPerStep - 1) / kBlocksPerStep * kBlocksPerStep;
  QuantizedX out{K, block, blocks, stride, std::vector<int8_t>(M * K), std::vector<float>(M * stride, 0.0f),
                 std::vector<float>(M * stride, 0.0f), std::vector<float>(M, 0.0f)};
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleaving
  for (int64_t m = 0; m < M; ++m) {
    double offset = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      const float* values = x + m * K + b * block;
      const int64_t length = std::min(block, K - b * block);
      __m256 amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int64_t i = 0; i < length; i += 8) {
        const __m256 v = _mm256_loadu_ps(values + i);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v, magnitude));
        sum = _mm256_add_ps(sum, v);
      }
      const float top = horizontal_max(amax);
      out.scale[m * stride + b] = top / 127.0f;
      out.sums[m * stride + b] = horizontal_sum(sum);
      const __m256 inverse = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
      __m256i q_sum = _mm256_setzero_si256();
      for (int64_t i = 0; i < length; i += 32) {
        __m256i q[4];
        for (int j = 0; j < 4; ++j) {
          q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(values + i + 8 * j), inverse));
          q_sum = _mm256_add_epi32(q_sum, q[j]);
        }
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + m * K + b * block + i),
                            _mm256_permutevar8x32_epi32(bytes, order));
      }
      offset += 128.0 * out.scale[m * stride + b] * horizontal_sum(_mm256_cvtepi32_ps(q_sum));
    }
    out.offsets[m] = static_cast<float>(offset);
  }
  return out;
}

inline __m256i load_256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// The 8 int32 sums of 4 adjacent products of u8 `a` and s8 `b` (a1 and b1,
// plus a2 and b2), exact for the operands below: the pairs of products fit
// s16 (|b| <= 127, and a <= 127, or a <= 15 where two pairs are added). VNNI
// (AVX512-VNNI, or the VEX-encoded AVX-VNNI of CPUs without AVX-512) takes
// one instruction (vpdpbusd) per pair of operands, AVX2 three (four where
// they are added to `sums`).
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
inline __m256i dpbusd(__m256i sums, __m256i a, __m256i b) { return _mm256_dpbusd_epi32(sums, a, b); }
#elif defined(__AVXVNNI__)
inline __m256i dpbusd(__m256i sums, __m256i a, __m256i b) { return _mm256_dpbusd_avx_epi32(sums, a, b); }
#endif

inline __m256i add_products(__m256i sums, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
  return dpbusd(sums, a, b);
#else
  return _mm256_add_epi32(sums, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

inline __m256i products(__m256i a1, __m256i b1, __m256i a2, __m256i b2) {
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
  return dpbusd(dpbusd(_mm256_setzero_si256(), a1, b1), a2, b2);
#else
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(a1, b1), _mm256_maddubs_epi16(a2, b2)),
                           _mm256_set1_epi16(1));
#endif
}

// The 8 int32 block sums of blocks b0 .. b0+7 of a row against each of MB rows
// of x, `x_stride` apart (zero past `count` blocks). Each block of weights is
// unpacked once for all MB rows, and the blocks' partial sums are folded in
// pairs as they come (blocks 0+1, 2+3, then 0-3), which keeps few registers
// live per row of x: at 4 rows of x a tree over all 8 blocks at the end spilled.
template <int MB, typename Row>
void block_sums(const Row& row, int64_t b0, int64_t count, const int8_t* x, int64_t x_stride, __m256i* sums) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i quads[2][MB];  // blocks 0-3 and 4-7, each summed within 128-bit lanes
  for (int quad = 0; quad < 2; ++quad) {
    __m256i pairs[2][MB];
    for (int pair = 0; pair < 2; ++pair) {
      const int64_t j = 4 * quad + 2 * pair;
      if (j >= count) {
        for (int m = 0; m < MB; ++m) pairs[pair][m] = zero;
        continue;
      }
      const bool both = j + 1 < count;
      // Past the last block neither the weights nor x are read: block j stands in, and its sum is not taken.
      const auto first = row.unpack(b0 + j), second = row.unpack(b0 + j + both);
      for (int m = 0; m < MB; ++m) {
        const int8_t* xm = x + m * x_stride + (b0 + j) * Row::kInputs;
        pairs[pair][m] = _mm256_hadd_epi32(Row::dot(first, xm), both ? Row::dot(second, xm + Row::kInputs) : zero);
      }
    }
    for (int m = 0; m < MB; ++m) quads[quad][m] = _mm256_hadd_epi32(pairs[0][m], pairs[1][m]);
  }
  for (int m = 0; m < MB; ++m)  // the low lanes hold each block's first half, the high lanes its second
    sums[m] = _mm256_add_epi32(_mm256_permute2x128_si256(quads[0][m], quads[1][m], 0x20),
                               _mm256_permute2x128_si256(quads[0][m], quads[1][m], 0x31));
}

// Eight float16 values per block, for blocks b0 .. b0+7 (zero past `count`), from
// per-group values with `blocks_per_group` blocks in a group.
inline __m256 per_block(const at::Half* values, int64_t b0, int64_t count, int64_t blocks_per_group) {
  if (count == kBlocksPerStep && blocks_per_group == 1)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(values + b0)));
  alignas(16) uint16_t halves[kBlocksPerStep] = {};
  for (int64_t j = 0; j < count; ++j) halves[j] = values[(b0 + j) / blocks_per_group].x;
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(halves)));
}

// One row of int8 weights, w = q * scale.
struct Int8Row {
  static constexpr int64_t kInputs = 32;  // per vector
  const int8_t* q;
  float scale;
  const char* bytes(int64_t k) const { return reinterpret_cast<const char*>(q + k); }
};

// One row of int4 weights, w = q * scale + minimum: blocks of 64 inputs, 32 bytes.
struct Int4Row {
  static constexpr int64_t kInputs = 64, kBytes = 32;
  const uint8_t* q;
  const at::Half* scale;
  const at::Half* minimum;
  int64_t blocks_per_group;
  const char* bytes(int64_t b) const { return reinterpret_cast<const char*>(q + b * kBytes); }
  // A block as u8 in 0..15: inputs 0..31 (the low nibbles) and 32..63 (the high ones).
  struct Block { __m256i low, high; };
  Block unpack(int64_t b) const {
    const __m256i packed = load_256(q + b * kBytes), nibble = _mm256_set1_epi8(0x0F);
    return {_mm256_and_si256(packed, nibble), _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble)};
  }
  // 8 int32 sums of 64 products.
  static __m256i dot(const Block& w, const int8_t* x) {
    return products(w.low, load_256(x), w.high, load_256(x + 32));
  }
  __m256 scales(int64_t b0, int64_t count) const { return per_block(scale, b0, count, blocks_per_group); }
  // The minima's share: minimum * (the sum of x over the block), for every block.
  __m256 add_minima(__m256 acc, int64_t b0, int64_t count, __m256 x_sums) const {
    return _mm256_fmadd_ps(per_block(minimum, b0, count, blocks_per_group), x_sums, acc);
  }
};

// y[m, r] for R rows of int4 weights and MB rows of x (from row m0 of xq).
template <int R, int MB, typename Row>
void int4_tile(const Row* rows, const QuantizedX& xq, int64_t m0, float* y, int64_t ldy, int64_t ahead) {
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < xq.blocks; b0 += kBlocksPerStep) {
    const int64_t count = std::min(kBlocksPerStep, xq.blocks - b0);
    for (int r = 0; r < R; ++r) {
      for (int64_t line = 0; line < kBlocksPerStep * Row::kBytes; line += 64)
        _mm_prefetch(rows[r].bytes(b0) + line + ahead, _MM_HINT_T1);
      const __m256 weight_scales = rows[r].scales(b0, count);
      __m256i sums[MB];
      block_sums<MB>(rows[r], b0, count, xq.q.data() + m0 * xq.K, xq.K, sums);
      for (int m = 0; m < MB; ++m) {
        const int64_t row = (m0 + m) * xq.stride + b0;
        const __m256 scales = _mm256_mul_ps(weight_scales, _mm256_loadu_ps(xq.scale.data() + row));
        acc[r][m] = rows[r].add_minima(_mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[m]), scales, acc[r][m]), b0, count,
                                       _mm256_loadu_ps(xq.sums.data() + row));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) y[m * ldy + r] = horizontal_sum(acc[r][m]);
}

#if defined(__AVX512VNNI__)
// y[m, r] for R rows of int8 weights and MB rows of x, in 512-bit vectors:
// 64 inputs per vpdpbusd, which multiplies unsigned by signed, so the weights
// meet x as q + 128 (q ^ 0x80, one instruction per 64 weights for every row
// of x) and the row's 128 * sum(q_x * scale) comes off at the end (x's
// `offsets`). The products of each block of x add up in int32 lanes (exact:
// 256 x 255 x 127 < 2^24, so the convert is exact too), then one convert and
// one multiply-add apply x's scale. Against the 256-bit tiles below this is
// under half the instructions per weight: no sign transfer, twice the
// inputs each. Below 4 rows of x each sum is spread over 4 / MB chains, so
// that the products do not wait on each other's latency; a last 32 inputs
// are read through a mask.
constexpr int64_t kInt8Rows = 2;  // weight rows per tile: each x vector is loaded once for both
template <int R, int MB>
void int8_tile(const Int8Row* rows, const QuantizedX& xq, int64_t m0, float* y, int64_t ldy, int64_t ahead) {
  constexpr int kChains = MB >= 4 ? 1 : 4 / MB;
  constexpr int64_t kStep = 64;
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  const int8_t* x = xq.q.data() + m0 * xq.K;
  for (int64_t b = 0; b < xq.blocks; ++b) {
    const int64_t begin = b * xq.block, end = std::min(xq.K, begin + xq.block);
    __m512i sums[R][MB][kChains];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m)
        for (int c = 0; c < kChains; ++c) sums[r][m][c] = _mm512_setzero_si512();
    // The products of inputs k .. k + 64, loaded by `load` (whole, or the first of them).
    auto add = [&](int64_t k, int chain, auto load) {
      __m512i w[R];
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(rows[r].bytes(k) + ahead, _MM_HINT_T1);
        w[r] = _mm512_xor_si512(load(rows[r].q + k), offset);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512i xm = load(x + m * xq.K + k);
        for (int r = 0; r < R; ++r) sums[r][m][chain] = _mm512_dpbusd_epi32(sums[r][m][chain], w[r], xm);
      }
    };
    auto whole = [](const int8_t* p) { return _mm512_loadu_si512(p); };
    int64_t k = begin;
    for (; k + kChains * kStep <= end; k += kChains * kStep)
      for (int c = 0; c < kChains; ++c) add(k + c * kStep, c, whole);  // unrolled: the chains stay in registers
    for (; k + kStep <= end; k += kStep) add(k, 0, whole);
    if (k < end) {  // x is zero past the mask, so the weights' 128 there adds nothing
      const __mmask64 tail = (__mmask64{1} << (end - k)) - 1;
      add(k, 0, [tail](const int8_t* p) { return _mm512_maskz_loadu_epi8(tail, p); });
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) {
        __m512i sum = sums[r][m][0];
        for (int c = 1; c < kChains; ++c) sum = _mm512_add_epi32(sum, sums[r][m][c]);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xq.scale[(m0 + m) * xq.stride + b]),
                                    acc[r][m]);
      }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m)
      y[m * ldy + r] = (_mm512_reduce_add_ps(acc[r][m]) - xq.offsets[m0 + m]) * rows[r].scale;
}
#else
// y[m, r] for R rows of int8 weights and MB rows of x. The products of each
// block of x add up in int32 lanes (exact: 256 x 127 x 127 < 2^31), then one
// convert and one multiply-add apply x's scale: this halved the cost at 4
// rows of x against 8 blocks of 32 inputs summed across lanes (horizontal
// adds) and scaled as the int4 tiles are. maddubs multiplies unsigned by
// signed, so each 32 weights meet x as |q| and x with q's sign (q is never
// -128). Below 4 rows of x each sum is spread over 4 / MB chains, so that
// the products do not wait on each other's latency.
template <int R, int MB>
void int8_tile(const Int8Row* rows, const QuantizedX& xq, int64_t m0, float* y, int64_t ldy, int64_t ahead) {
  constexpr int kChains = MB >= 4 ? 1 : 4 / MB;
  __m256 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  const int8_t* x = xq.q.data() + m0 * xq.K;
  for (int64_t b = 0; b < xq.blocks; ++b) {
    const int64_t begin = b * xq.block, end = std::min(xq.K, begin + xq.block);
    for (int r = 0; r < R; ++r) {
      __m256i sums[MB][kChains];
      for (int m = 0; m < MB; ++m)
        for (int c = 0; c < kChains; ++c) sums[m][c] = _mm256_setzero_si256();
      auto add = [&](int64_t k, int chain) {  // the products of inputs k .. k + 32
        if (k % 64 == 0) _mm_prefetch(rows[r].bytes(k) + ahead, _MM_HINT_T1);
        const __m256i w = load_256(rows[r].q + k), magnitude = _mm256_sign_epi8(w, w);
        for (int m = 0; m < MB; ++m)
          sums[m][chain] = add_products(sums[m][chain], magnitude, _mm256_sign_epi8(load_256(x + m * xq.K + k), w));
      };
      int64_t k = begin;
      for (; k + kChains * Int8Row::kInputs <= end; k += kChains * Int8Row::kInputs)
        for (int c = 0; c < kChains; ++c) add(k + c * Int8Row::kInputs, c);  // unrolled: the chains stay in registers
      for (; k < end; k += Int8Row::kInputs) add(k, 0);
      for (int m = 0; m < MB; ++m) {
        __m256i sum = sums[m][0];
        for (int c = 1; c < kChains; ++c) sum = _mm256_add_epi32(sum, sums[m][c]);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_broadcast_ss(&xq.scale[(m0 + m) * xq.stride + b]),
                                    acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) y[m * ldy + r] = horizontal_sum(acc[r][m]) * rows[r].scale;
}
constexpr int64_t kInt8Rows = 1;
#endif

// The tiles of int8 or int4 rows, against x quantized for them.
struct IntegerTiles {
  const QuantizedX& xq;
  float* y;
  int64_t N;
  template <int R, int MB>
  void run(const Int8Row* rows, int64_t m, int64_t n, int64_t ahead) const {
    int8_tile<R, MB>(rows, xq, m, y + m * N + n, N, ahead);
  }
  template <int R, int MB>
  void run(const Int4Row* rows, int64_t m, int64_t n, int64_t ahead) const {
    int4_tile<R, MB>(rows, xq, m, y + m * N + n, N, ahead);
  }
};

// Linear layers in any stored format ---------------------------------------------

// x (M, width) in the forms the products that read it need: padded with zeros
// to their K (int4 weights padded to whole groups, whose padding is zero too),
// and quantized per block of inputs for the integer kernels. Each form is made
// once, when the first product's job asks for it, before any job runs.
class Input {
 public:
  Input(const float* x, int64_t M, int64_t width) : x_(x), M_(M), width_(width) {}
  int64_t rows() const { return M_; }
  int64_t width() const { return width_; }

  const float* padded(int64_t K) {
    if (K == width_) return x_;
    std::vector<float>& out = padded_[K];
    if (out.empty()) {
      out.assign(M_ * K, 0.0f);
      for (int64_t m = 0; m < M_; ++m) std::copy(x_ + m * width_, x_ + (m + 1) * width_, out.data() + m * K);
    }
    return out.data();
  }

#if defined(__AVX512BF16__)
  // x rounded to bfloat16 (nearest even), for the bf16 dot products.
  BFloat16X bfloat16() {
    if (x16_.empty()) {
      const int64_t n = M_ * width_, whole = n - n % 16;
      x16_.resize(n);
      for (int64_t i = 0; i < whole; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16_.data() + i),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x_ + i)));
      for (int64_t i = whole; i < n; ++i) x16_[i] = at::BFloat16(x_[i]);
    }
    return {x16_.data(), x_};
  }
#endif

  const QuantizedX& quantized(int64_t K, int64_t block) {
    auto found = quantized_.find({K, block});
    if (found == quantized_.end())
      found = quantized_.emplace(std::make_pair(K, block), quantize_x(padded(K), M_, K, block)).first;
    return found->second;
  }

 private:
  const float* x_;
  int64_t M_, width_;
  std::map<int64_t, std::vector<float>> padded_;
  std::map<std::pair<int64_t, int64_t>, QuantizedX> quantized_;  // by K and inputs per block
#if defined(__AVX512BF16__)
  std::vector<at::BFloat16> x16_;  // (M, width)
#endif
};

// A linear layer's weights in one of the formats above, and its bias.
struct Linear {
  torch::Tensor weight;         // float32 or bfloat16 (N, K), int8 (N, K), or packed int4 uint8 (N, K / 2)
  torch::Tensor scale, minimum;  // int8: float32 (N); int4: float16 (N, K / group) each
  torch::Tensor bias;           // float32 (N), or undefined
  int64_t N = 0, K = 0, group = 0;  // K: inputs per row as stored (int4: padded to whole groups)

  static Linear floating(const torch::Tensor& w) {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weight must be a contiguous (N, K) tensor");
    TORCH_CHECK(w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16,
                "float weights must be float32 or bfloat16, got ", w.scalar_type());
    return Linear{w, {}, {}, {}, w.size(0), w.size(1), 0};
  }

  static Linear int8(const torch::Tensor& q, const torch::Tensor& scale) {
    TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kInt8,
                "int8 weight must be a contiguous int8 (N, K) tensor");
    TORCH_CHECK(q.size(1) % Int8Row::kInputs == 0, "int8 weights need K divisible by ", Int8Row::kInputs,
                ", got ", q.size(1));
    TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == q.size(0),
                "int8 scale must be float32 with one value per output row");
    return Linear{q, scale, {}, {}, q.size(0), q.size(1), 0};
  }

  static Linear int4(const torch::Tensor& q, const torch::Tensor& scale, const torch::Tensor& minimum, int64_t group) {
    TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kUInt8,
                "int4 weight must be a contiguous uint8 (N, K / 2) tensor");
    const int64_t N = q.size(0), K = q.size(1) * 2;
    TORCH_CHECK(group > 0 && group % Int4Row::kInputs == 0 && K % group == 0,
                "int4 needs a group size that is a multiple of 64 and divides K");
    for (const torch::Tensor* t : {&scale, &minimum})
      TORCH_CHECK(t->scalar_type() == torch::kFloat16 && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                      t->size(1) == K / group,
                  "int4 scale and minimum must be contiguous float16 (N, K / group) tensors");
    return Linear{q, scale, minimum, {}, N, K, group};
  }

  Linear with_bias(const torch::Tensor& b) const {
    Linear out = *this;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "bias must have one value per output row (", N, ")");
    out.bias = b.to(torch::kFloat32).contiguous();
    return out;
  }

  // The job of y (M, N) = x W^T, without the bias (add_bias). x may be
  // narrower than K: int4 weights padded to whole groups.
  Job job(Input& x, float* y) const {
    TORCH_CHECK(x.width() == K || (group > 0 && x.width() < K), "x has ", x.width(), " inputs, the weights ", K);
    const int64_t M = x.rows(), N = this->N, K = this->K;
    switch (weight.scalar_type()) {
      case torch::kBFloat16: {
        const at::BFloat16* p = weight.data_ptr<at::BFloat16>();
#if defined(__AVX512BF16__)
        return tiles_job<4, BFloat16Eights>(M, N, [=](int64_t n) { return BFloat16Eights{p + n * K}; },
                                            BFloat16Tiles{x.bfloat16(), y, N, K});
#else
        return tiles_job<4, BFloat16Eights>(M, N, [=](int64_t n) { return BFloat16Eights{p + n * K}; },
                                         FloatTiles{x.padded(K), y, N, K});
#endif
      }
      case torch::kFloat32: {
        const float* p = weight.data_ptr<float>();
        return tiles_job<4, Float32Eights>(M, N, [=](int64_t n) { return Float32Eights{p + n * K}; },
                                        FloatTiles{x.padded(K), y, N, K});
      }
      case torch::kInt8: {
        const int8_t* p = weight.data_ptr<int8_t>();
        const float* s = scale.data_ptr<float>();
        return tiles_job<kInt8Rows, Int8Row>(M, N, [=](int64_t n) { return Int8Row{p + n * K, s[n]}; },
                                             IntegerTiles{x.quantized(K, kInt8XBlock), y, N});
      }
      default: {
        const uint8_t* p = weight.data_ptr<uint8_t>();
        const at::Half* s = scale.data_ptr<at::Half>();
        const at::Half* mn = minimum.data_ptr<at::Half>();
        const int64_t groups = K / group, blocks_per_group = group / Int4Row::kInputs;
        return tiles_job<1, Int4Row>(M, N, [=](int64_t n) {
          return Int4Row{p + n * (K / 2), s + n * groups, mn + n * groups, blocks_per_group};
        }, IntegerTiles{x.quantized(K, Int4Row::kInputs), y, N});
      }
    }
  }

  void add_bias(float* y, int64_t M) const {
    if (!bias.defined()) return;
    const float* b = bias.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] += b[n];
  }

  torch::Tensor operator()(const torch::Tensor& x) const {
    check_x(x);
    auto y = torch::empty({x.size(0), N}, x.options());
    apply_all({{this, y.data_ptr<float>()}}, x.data_ptr<float>(), x.size(0), x.size(1));
    return y;
  }

  // The products of several layers reading the same x (M, width), each into
  // its y (M, N), in one parallel region.
  static void apply_all(const std::vector<std::pair<const Linear*, float*>>& products, const float* x, int64_t M,
                        int64_t width) {
    Input input(x, M, width);
    std::vector<Job> jobs;
    for (const auto& [linear, y] : products) jobs.push_back(linear->job(input, y));
    run_jobs(jobs);
    for (const auto& [linear, y] : products) linear->add_bias(y, M);
  }

  // Row n of W, its first `width` inputs, as float32 (an embedding's lookup).
  void row(int64_t n, int64_t width, float* out) const {
    TORCH_CHECK(n >= 0 && n < N, "token ", n, " is outside the vocabulary of ", N);
    switch (weight.scalar_type()) {
      case torch::kBFloat16: {
        const at::BFloat16* w = weight.data_ptr<at::BFloat16>() + n * K;
        for (int64_t k = 0; k < width; ++k) out[k] = static_cast<float>(w[k]);
        break;
      }
      case torch::kFloat32:
        std::copy_n(weight.data_ptr<float>() + n * K, width, out);
        break;
      case torch::kInt8: {
        const int8_t* q = weight.data_ptr<int8_t>() + n * K;
        const float s = scale.data_ptr<float>()[n];
        for (int64_t k = 0; k < width; ++k) out[k] = static_cast<float>(q[k]) * s;
        break;
      }
      default: {  // int4: input i of each block of 64 in its byte's low nibble, i + 32 in the high one
        const uint8_t* q = weight.data_ptr<uint8_t>() + n * (K / 2);
        const at::Half* s = scale.data_ptr<at::Half>() + n * (K / group);
        const at::Half* mn = minimum.data_ptr<at::Half>() + n * (K / group);
        for (int64_t k = 0; k < width; ++k) {
          const int64_t block = k / Int4Row::kInputs, i = k % Int4Row::kInputs, half = Int4Row::kInputs / 2;
          const uint8_t byte = q[block * half + i % half];
          const int nibble = i < half ? byte & 0x0F : byte >> 4;
          out[k] = static_cast<float>(nibble) * static_cast<float>(s[k / group]) + static_cast<float>(mn[k / group]);
        }
      }
    }
  }
};

torch::Tensor float_linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(-1), "weight must be a (N, K) tensor matching x (M, K)");
  return Linear::floating(w)(x);
}

torch::Tensor int8_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && q.size(1) == x.size(-1), "int8 weight must be a (N, K) tensor matching x (M, K)");
  return Linear::int8(q, scale)(x);
}

torch::Tensor int4_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                          const torch::Tensor& minimum, int64_t group) {
  TORCH_CHECK(q.dim() == 2 && q.size(1) * 2 == x.size(-1), "int4 weight must be a (N, K / 2) tensor matching x (M, K)");
  return Linear::int4(q, scale, minimum, group)(x);
}

// The positions of M rows (M) int64: checked on every call, as they index the
// attention rings (slot = position % W) and the state files that carry them
// are untrusted input. Refused, not computed, outside [0, kMaxPosition].
constexpr int64_t kMaxPosition = int64_t{1} << 62;

const int64_t* checked_positions(const torch::Tensor& positions, int64_t M, const char* caller) {
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.is_contiguous() && positions.numel() == M,
              caller, ": positions must be int64 with one value per row");
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK_VALUE(position[m] >= 0 && position[m] <= kMaxPosition, caller, ": row ", m, " is at position ",
                      position[m], ", outside [0, 2^62]");
  return position;
}

// Attention of a few queries (decoding) -------------------------------------------
//
// out[b, q, h] = softmax_j(scale * q[b, q, h] . key_j) @ value_j over the visible
// keys j of several parts (the state's ring buffer, then the new tokens' keys),
// without concatenating them. All heads share the keys (multi-query attention),
// so each key and value is read from memory once for every head. The keys are
// cut into chunks run in parallel, each with its own running maximum, sum and
// weighted values, merged at the end (as flash-decoding does).

constexpr int64_t kKeysPerChunk = 256;

template <typename Eights>
float dot(const float* q, const Eights& row, int64_t offset, int64_t K) {
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + k), row.eight(offset + k), acc);
  float sum = horizontal_sum(acc);
  for (; k < K; ++k) sum += q[k] * row.at(offset + k);
  return sum;
}

template <typename Eights>
void add_scaled(float* acc, float p, const Eights& row, int64_t offset, int64_t K) {
  const __m256 scale = _mm256_set1_ps(p);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    _mm256_storeu_ps(acc + k, _mm256_fmadd_ps(scale, row.eight(offset + k), _mm256_loadu_ps(acc + k)));
  for (; k < K; ++k) acc[k] += p * row.at(offset + k);
}

// One part of the keys that queries attend to: keys and values (B, S, K) of
// type T, and which of them each query sees (B, Q, S).
template <typename T>
struct KeyPart {
  const T* keys;
  const T* values;
  const bool* visible;
  int64_t S;
};

// One chunk of keys [j0, j1) against every head of one query: its running
// maximum (H), sum of exp(score - maximum) (H) and exp-weighted values (H, K).
template <typename Eights>
void attend_chunk(const float* q, const Eights& keys, const Eights& values, const bool* visible, int64_t j0,
                  int64_t j1, int64_t H, int64_t K, float scale, float* maximum, float* sum, float* acc) {
  std::vector<float> scores((j1 - j0) * H);
  std::fill(maximum, maximum + H, -INFINITY);
  for (int64_t j = j0; j < j1; ++j) {
    if (!visible[j]) continue;
    for (int64_t h = 0; h < H; ++h) {
      const float s = scale * dot(q + h * K, keys, j * K, K);
      scores[(j - j0) * H + h] = s;
      maximum[h] = std::max(maximum[h], s);
    }
  }
  for (int64_t j = j0; j < j1; ++j) {
    if (!visible[j]) continue;
    for (int64_t h = 0; h < H; ++h) {
      const float p = std::exp(scores[(j - j0) * H + h] - maximum[h]);
      sum[h] += p;
      add_scaled(acc + h * K, p, values, j * K, K);
    }
  }
}

// out (B, Q, H, K) = softmax attention of q (B, Q, H, K) over the parts' keys
// as if concatenated, for Eights reading the parts' type.
template <typename Eights, typename T>
void attend_few_typed(const float* q, int64_t B, int64_t Q, int64_t H, int64_t K, const std::vector<KeyPart<T>>& parts,
                      float scale, float* out) {
  struct Chunk { size_t part; int64_t j0, j1; };
  std::vector<Chunk> chunks;
  for (size_t p = 0; p < parts.size(); ++p)
    for (int64_t j0 = 0; j0 < parts[p].S; j0 += kKeysPerChunk)
      chunks.push_back({p, j0, std::min(parts[p].S, j0 + kKeysPerChunk)});
  const int64_t C = chunks.size();
  std::vector<float> maximum(C * H), sum(C * H), acc(C * H * K);  // per chunk, as attend_chunk leaves them
  for (int64_t b = 0; b < B; ++b)
    for (int64_t iq = 0; iq < Q; ++iq) {
      const float* qv = q + (b * Q + iq) * H * K;
      std::fill(sum.begin(), sum.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const KeyPart<T>& part = parts[chunks[c].part];
          const int64_t row = b * part.S * K;
          attend_chunk(qv, Eights{part.keys + row}, Eights{part.values + row}, part.visible + (b * Q + iq) * part.S,
                       chunks[c].j0, chunks[c].j1, H, K, scale, maximum.data() + c * H, sum.data() + c * H,
                       acc.data() + c * H * K);
        }
      });
      float* o = out + (b * Q + iq) * H * K;
      for (int64_t h = 0; h < H; ++h) {
        float top = -INFINITY, total = 0.0f;
        for (int64_t c = 0; c < C; ++c) top = std::max(top, maximum[c * H + h]);
        std::fill(o + h * K, o + (h + 1) * K, 0.0f);
        for (int64_t c = 0; c < C; ++c) {
          if (sum[c * H + h] == 0.0f) continue;  // no visible key in that chunk
          const float weight = std::exp(maximum[c * H + h] - top);
          total += weight * sum[c * H + h];
          for (int64_t k = 0; k < K; ++k) o[h * K + k] += weight * acc[(c * H + h) * K + k];
        }
        for (int64_t k = 0; k < K; ++k) o[h * K + k] /= total;
      }
    }
}

template <typename Eights>
torch::Tensor attend_few_of(const torch::Tensor& q, const std::vector<torch::Tensor>& keys,
                            const std::vector<torch::Tensor>& values, const std::vector<torch::Tensor>& visible,
                            double scale) {
  using T = std::remove_const_t<std::remove_pointer_t<decltype(Eights::w)>>;
  std::vector<KeyPart<T>> parts;
  for (size_t p = 0; p < keys.size(); ++p)
    parts.push_back({keys[p].data_ptr<T>(), values[p].data_ptr<T>(), visible[p].data_ptr<bool>(), keys[p].size(1)});
  auto out = torch::empty_like(q);
  attend_few_typed<Eights>(q.data_ptr<float>(), q.size(0), q.size(1), q.size(2), q.size(3), parts,
                           static_cast<float>(scale), out.data_ptr<float>());
  return out;
}

torch::Tensor attend_few(const torch::Tensor& q, const std::vector<torch::Tensor>& keys,
                         const std::vector<torch::Tensor>& values, const std::vector<torch::Tensor>& visible,
                         double scale) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(),
              "q must be a contiguous float32 (B, Q, H, K) tensor");
  TORCH_CHECK(!keys.empty() && keys.size() == values.size() && keys.size() == visible.size(),
              "attend_few needs as many keys, values and visible masks");
  const int64_t B = q.size(0), Q = q.size(1), K = q.size(3);
  const auto dtype = keys[0].scalar_type();
  for (size_t p = 0; p < keys.size(); ++p) {
    const int64_t S = keys[p].size(1);
    for (const auto* t : {&keys[p], &values[p]})
      TORCH_CHECK(t->dim() == 3 && t->is_contiguous() && t->scalar_type() == dtype && t->size(0) == B &&
                      t->size(1) == S && t->size(2) == K,
                  "keys and values must be contiguous (B, S, K) tensors of one dtype");
    TORCH_CHECK(visible[p].scalar_type() == torch::kBool && visible[p].is_contiguous() &&
                    visible[p].sizes() == torch::IntArrayRef({B, Q, S}),
                "visible must be a contiguous bool (B, Q, S) tensor");
  }
  if (dtype == torch::kBFloat16) return attend_few_of<BFloat16Eights>(q, keys, values, visible, scale);
  TORCH_CHECK(dtype == torch::kFloat32, "attend_few takes float32 or bfloat16 keys and values");
  return attend_few_of<Float32Eights>(q, keys, values, visible, scale);
}

// attention_rows for a ring of keys and values read by Eights: no torch
// operation, whose fixed costs per call outweighed the arithmetic of a step.
template <typename Eights>
void attention_rows_typed(const float* q_in, const float* k_in, const float* v_in, int64_t M, int64_t H, int64_t K,
                          torch::Tensor& ring_k, torch::Tensor& ring_v, torch::Tensor& ring_pos,
                          const int64_t* position, const float* frequency, float scale, float* out) {
  using T = std::remove_const_t<std::remove_pointer_t<decltype(Eights::w)>>;
  const int64_t W = ring_k.size(1), half = K / 4;
  std::vector<float> sin(half), cos(half);  // of one row's angles, which its heads and key share
  auto rope = [&](float* x) {
    for (int64_t i = 0; i < half; ++i) {
      const float first = x[i], second = x[half + i];
      x[i] = first * cos[i] - second * sin[i];
      x[half + i] = second * cos[i] + first * sin[i];
    }
  };
  std::vector<float> rq(q_in, q_in + M * H * K), rk(k_in, k_in + M * K);  // turned by RoPE
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(position[m]) * frequency[i];
      sin[i] = std::sin(angle);
      cos[i] = std::cos(angle);
    }
    for (int64_t h = 0; h < H; ++h) rope(rq.data() + (m * H + h) * K);
    rope(rk.data() + m * K);
  }
  // The new keys and values in the ring's type, as they will be stored.
  std::vector<T> new_k(rk.begin(), rk.end()), new_v(v_in, v_in + M * K);
  // The ring's keys a query sees: its own document's (not if it starts one), at most W positions back.
  int64_t* ring = ring_pos.data_ptr<int64_t>();
  std::unique_ptr<bool[]> visible(new bool[M * W]), new_visible(new bool[M]);
  for (int64_t m = 0; m < M; ++m) {
    new_visible[m] = true;
    for (int64_t j = 0; j < W; ++j) {
      // In this order, so that no difference of a hostile slot position overflows.
      const int64_t stored = ring[m * W + j];
      visible[m * W + j] = position[m] != 0 && stored >= 0 && stored <= position[m] && position[m] - stored <= W;
    }
  }
  T *keys = ring_k.data_ptr<T>(), *values = ring_v.data_ptr<T>();
  attend_few_typed<Eights>(rq.data(), M, 1, H, K,
                           std::vector<KeyPart<T>>{{keys, values, visible.get(), W},
                                                   {new_k.data(), new_v.data(), new_visible.get(), 1}},
                           scale, out);
  for (int64_t m = 0; m < M; ++m) {
    if (position[m] == 0) std::fill(ring + m * W, ring + (m + 1) * W, -1);
    const int64_t slot = position[m] % W;
    std::copy(new_k.begin() + m * K, new_k.begin() + (m + 1) * K, keys + (m * W + slot) * K);
    std::copy(new_v.begin() + m * K, new_v.begin() + (m + 1) * K, values + (m * W + slot) * K);
    ring[m * W + slot] = position[m];
  }
}

// One attention step for each row (decoding), with the state's ring buffer:
// q (M, H, K), k and v (M, K) float32 of the new token at `position` (M);
// ring keys and values (M, W, K), float32 or bfloat16, slot = position % W,
// and their positions (M, W), -1 where empty. RoPE turns pairs (i, i + K/4)
// of the first half of each head by position x frequency[i] (K/4 float32);
// the query then attends to the ring keys of its own document within the
// window and to the new key; then the new key and value take their slot, and
// a row at position 0 first forgets the ring. -> out (M, H, K). The callers
// check the ring's layout.
void attention_rows(const float* q, const float* k, const float* v, int64_t M, int64_t H, int64_t K,
                    torch::Tensor& ring_k, torch::Tensor& ring_v, torch::Tensor& ring_pos, const int64_t* position,
                    const float* frequency, float scale, float* out) {
  const auto typed = ring_k.scalar_type() == torch::kBFloat16 ? attention_rows_typed<BFloat16Eights>
                                                              : attention_rows_typed<Float32Eights>;
  typed(q, k, v, M, H, K, ring_k, ring_v, ring_pos, position, frequency, scale, out);
}

// attention_rows on tensors, inverse_frequency (K / 4) -> out (M, H, K).
torch::Tensor attention_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             torch::Tensor& ring_k, torch::Tensor& ring_v, torch::Tensor& ring_pos,
                             const torch::Tensor& positions, const torch::Tensor& inverse_frequency,
                             double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(),
              "attention_step: q must be a contiguous float32 (M, H, K) tensor");
  const int64_t M = q.size(0), H = q.size(1), K = q.size(2), W = ring_k.dim() == 3 ? ring_k.size(1) : -1;
  for (const torch::Tensor* t : {&k, &v})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->sizes() == torch::IntArrayRef({M, K}),
                "attention_step: k and v must be contiguous float32 (M, K) tensors");
  TORCH_CHECK(ring_k.scalar_type() == torch::kFloat32 || ring_k.scalar_type() == torch::kBFloat16,
              "attention_step: the ring must be float32 or bfloat16");
  for (const torch::Tensor* t : {&ring_k, &ring_v})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == ring_k.scalar_type() &&
                    t->sizes() == torch::IntArrayRef({M, W, K}),
                "attention_step: the ring's keys and values must be contiguous (M, W, K) tensors of one dtype");
  TORCH_CHECK(ring_pos.scalar_type() == torch::kInt64 && ring_pos.is_contiguous() &&
                  ring_pos.sizes() == torch::IntArrayRef({M, W}),
              "attention_step: the ring's positions must be a contiguous int64 (M, W) tensor");
  TORCH_CHECK_VALUE(W >= 1, "attention_step: the ring has no slots");
  const int64_t* position = checked_positions(positions, M, "attention_step");
  TORCH_CHECK(inverse_frequency.scalar_type() == torch::kFloat32 && inverse_frequency.is_contiguous() &&
                  inverse_frequency.numel() == K / 4,
              "attention_step: inverse_frequency must be contiguous float32 with K / 4 values");
  auto out = torch::empty_like(q);
  attention_rows(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), M, H, K, ring_k, ring_v, ring_pos,
                 position, inverse_frequency.data_ptr<float>(), scale, out.data_ptr<float>());
  return out;
}

// Element-wise decode steps ----------------------------------------------------------
//
// At decoding each element-wise operation works on a few thousand numbers, so
// torch's fixed cost per operation (dispatch, allocation, and caches that the
// weights' stream has just emptied) outweighs the arithmetic: a 2b step ran
// about 2,700 of them. These compute the norm, the convolution step and the
// RG-LRU step for the Decoder below; rgemma/model.py computes the same functions
// with torch operations, and the tests compare the two (through the entry
// points conv_step, rglru_step and attention_step, and through the Decoder).

template <typename Eights>
void rms_norm_rows(const float* x, const Eights& weight, int64_t M, int64_t D, double eps, float* y) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * D;
    __m256 squares = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) squares = _mm256_fmadd_ps(_mm256_loadu_ps(row + d), _mm256_loadu_ps(row + d), squares);
    float sum = horizontal_sum(squares);
    for (; d < D; ++d) sum += row[d] * row[d];
    const float inverse = 1.0f / std::sqrt(sum / static_cast<float>(D) + static_cast<float>(eps));
    const __m256 scale = _mm256_set1_ps(inverse), one = _mm256_set1_ps(1.0f);
    for (d = 0; d + 8 <= D; d += 8)
      _mm256_storeu_ps(y + m * D + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + d), scale),
                                                    _mm256_add_ps(one, weight.eight(d))));
    for (; d < D; ++d) y[m * D + d] = row[d] * inverse * (1.0f + weight.at(d));
  }
}

// Eight float32 at a time: exp as Cephes' expf (range reduction by ln 2 in two
// parts, a degree-5 polynomial, 2^n through the exponent bits; within 2 ulp),
// and the functions the decode steps build on it. The scalar forms run the
// same vector code on one lane, so every element sees the same arithmetic.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_to_n));
}

inline __m256 sigmoid8(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
}

// 1 - exp(z) for z <= 0, precise as z -> 0: there a Taylor series of degree 7
// (relative error below 2e-9 for z > -1/4), elsewhere 1 - exp(z), at least 0.22.
inline __m256 one_minus_exp8(__m256 z) {
  __m256 series = _mm256_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f})
    series = _mm256_fmadd_ps(series, z, _mm256_set1_ps(c));
  const __m256 near_zero = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), series);
  const __m256 far = _mm256_sub_ps(_mm256_set1_ps(1.0f), exp8(z));
  return _mm256_blendv_ps(far, near_zero, _mm256_cmp_ps(z, _mm256_set1_ps(-0.25f), _CMP_GT_OQ));
}

// gelu(v) with the tanh approximation, tanh(y) = 1 - 2 / (exp(2y) + 1).
inline __m256 gelu_tanh8(__m256 v) {
  const __m256 y = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                 _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v));
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  const __m256 tanh = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_mul_ps(two, y)), one)));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(one, tanh));
}

// a[i] = gelu_tanh(a[i]) * b[i] for i < n.
void gelu_times(float* a, const float* b, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(a + i, _mm256_mul_ps(gelu_tanh8(_mm256_loadu_ps(a + i)), _mm256_loadu_ps(b + i)));
  for (; i < n; ++i) a[i] = _mm256_cvtss_f32(gelu_tanh8(_mm256_set1_ps(a[i]))) * b[i];
}


// cap * tanh(v / cap), with tanh(t) = (1 - exp(-2|t|)) / (1 + exp(-2|t|)) and t's
// sign, precise as t -> 0 (one_minus_exp8).
inline __m256 soft_cap8(__m256 v, __m256 cap) {
  const __m256 t = _mm256_div_ps(v, cap), sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 e = one_minus_exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(sign_bit, t)));
  const __m256 tanh = _mm256_div_ps(e, _mm256_sub_ps(_mm256_set1_ps(2.0f), e));
  return _mm256_mul_ps(_mm256_or_ps(tanh, _mm256_and_ps(t, sign_bit)), cap);
}

// x[i] = cap * tanh(x[i] / cap) for i < n (the logits, in place), in parallel.
void soft_cap(float* x, int64_t n, float cap) {
  constexpr int64_t kChunk = 4096;
  run_jobs({{(n + kChunk - 1) / kChunk, 4, [=](int64_t begin, int64_t end) {
    const __m256 caps = _mm256_set1_ps(cap);
    const int64_t stop = std::min(n, end * kChunk);
    int64_t i = begin * kChunk;
    for (; i + 8 <= stop; i += 8) _mm256_storeu_ps(x + i, soft_cap8(_mm256_loadu_ps(x + i), caps));
    for (; i < stop; ++i) x[i] = _mm256_cvtss_f32(soft_cap8(_mm256_set1_ps(x[i]), caps));
  }}});
}

// x (M, D) float32, weight (D) float32 or bfloat16, stored zero-centred -> x / rms(x) * (1 + weight).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_x(x);
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "rms_norm weight must be a contiguous (D) tensor matching x (M, D)");
  auto y = torch::empty_like(x);
  const int64_t M = x.size(0), D = x.size(1);
  if (weight.scalar_type() == torch::kBFloat16)
    rms_norm_rows(x.data_ptr<float>(), BFloat16Eights{weight.data_ptr<at::BFloat16>()}, M, D, eps, y.data_ptr<float>());
  else {
    TORCH_CHECK(weight.scalar_type() == torch::kFloat32, "rms_norm takes float32 or bfloat16 weights");
    rms_norm_rows(x.data_ptr<float>(), Float32Eights{weight.data_ptr<float>()}, M, D, eps, y.data_ptr<float>());
  }
  return y;
}

// One step of the depthwise causal convolution for each row: x (M, L), taps
// (M, C, L) holding the last C inputs (oldest first), weight (L, C + 1) (the
// last column multiplies x) and bias (L) -> out (M, L). A tap `back` steps
// behind a token at position p exists only if p >= back. The taps then shift
// by one, in place: x becomes the newest.
void conv_rows(const float* x, int64_t M, int64_t L, float* taps, int64_t C, const float* weight, const float* bias,
               const int64_t* position, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    float* row_taps = taps + m * C * L;
    for (int64_t l = 0; l < L; ++l) {
      float sum = bias[l] + weight[l * (C + 1) + C] * x[m * L + l];
      for (int64_t j = 0; j < C; ++j)
        if (position[m] >= C - j) sum += weight[l * (C + 1) + j] * row_taps[j * L + l];
      out[m * L + l] = sum;
    }
    std::copy(row_taps + L, row_taps + C * L, row_taps);
    std::copy(x + m * L, x + (m + 1) * L, row_taps + (C - 1) * L);
  }
}

torch::Tensor conv_step(const torch::Tensor& x, torch::Tensor& taps, const torch::Tensor& weight,
                        const torch::Tensor& bias, const torch::Tensor& positions) {
  check_x(x);
  const int64_t M = x.size(0), L = x.size(1), C = taps.size(1);
  TORCH_CHECK(taps.dim() == 3 && taps.scalar_type() == torch::kFloat32 && taps.is_contiguous() && taps.size(0) == M &&
                  taps.size(2) == L,
              "conv_step: taps must be a contiguous float32 (M, C, L) tensor");
  TORCH_CHECK_VALUE(C >= 1, "conv_step: at least one tap (conv width 2)");
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() &&
                  weight.sizes() == torch::IntArrayRef({L, C + 1}),
              "conv_step: weight must be a contiguous float32 (L, C + 1) tensor");
  TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == L,
              "conv_step: bias must be contiguous float32 with L values");
  const int64_t* position = checked_positions(positions, M, "conv_step");
  auto out = torch::empty_like(x);
  conv_rows(x.data_ptr<float>(), M, L, taps.data_ptr<float>(), C, weight.data_ptr<float>(), bias.data_ptr<float>(),
            position, out.data_ptr<float>());
  return out;
}

// The RG-LRU's parameters for one decoding step: block-diagonal gate weights
// (H, L/H, L/H), float32 or bfloat16, and float32 gate biases (L); log_a_rate
// (L) = -8 softplus(recurrent_param), so that log a = log_a_rate * recurrence gate.
struct RGLRUWeights {
  torch::Tensor input_gate_weight, input_gate_bias, recurrence_gate_weight, recurrence_gate_bias, log_a_rate;
};

// The new state of eight channels: x, the gates' products (before their biases)
// and the state h at the row's offset, biases and log_a_rate at the channel's.
inline __m256 rglru8(const float* x, const float* input_gate, const float* recurrence_gate, const float* h,
                     const float* input_bias, const float* recurrence_bias, const float* log_a_rate, bool reset) {
  const __m256 log_a = _mm256_mul_ps(_mm256_loadu_ps(log_a_rate),
                                     sigmoid8(_mm256_add_ps(_mm256_loadu_ps(recurrence_gate), _mm256_loadu_ps(recurrence_bias))));
  const __m256 input = _mm256_mul_ps(_mm256_loadu_ps(x),
                                     sigmoid8(_mm256_add_ps(_mm256_loadu_ps(input_gate), _mm256_loadu_ps(input_bias))));
  if (reset) return input;  // a document start: a = 0, and the input passes whole
  // sqrt(1 - a^2) normalises the input, computed precisely as a -> 1.
  const __m256 multiplier = _mm256_sqrt_ps(one_minus_exp8(_mm256_add_ps(log_a, log_a)));
  return _mm256_fmadd_ps(exp8(log_a), _mm256_loadu_ps(h), _mm256_mul_ps(input, multiplier));
}

// One RG-LRU step for each row (Griffin eq. 1-4, c = 8): x (M, L) and the state
// h (M, L) -> the new state, written to out (which may be h). A row at position
// 0 starts a document, which drops its state and lets its input pass whole.
// gi and ga (M, L) take the gates' products.
void rglru_rows(const float* xs, int64_t M, const RGLRUWeights& w, const float* h, const int64_t* position, float* gi,
                float* ga, float* out) {
  const int64_t L = w.log_a_rate.numel();
  run_jobs({block_diagonal_job(xs, w.input_gate_weight, M, gi),  // x as (M, H, L/H) heads
            block_diagonal_job(xs, w.recurrence_gate_weight, M, ga)});
  const float *bi = w.input_gate_bias.data_ptr<float>(), *ba = w.recurrence_gate_bias.data_ptr<float>(),
              *rate = w.log_a_rate.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const bool reset = position[m] == 0;
    const int64_t row = m * L;
    int64_t l = 0;
    for (; l + 8 <= L; l += 8)
      _mm256_storeu_ps(out + row + l, rglru8(xs + row + l, gi + row + l, ga + row + l, h + row + l, bi + l, ba + l,
                                             rate + l, reset));
    if (l < L) {  // the last channels, from copies padded to eight
      const int64_t count = L - l;
      alignas(32) float lanes[8][8] = {};
      const float* sources[7] = {xs + row, gi + row, ga + row, h + row, bi, ba, rate};
      for (int s = 0; s < 7; ++s) std::copy(sources[s] + l, sources[s] + L, lanes[s]);
      _mm256_store_ps(lanes[7], rglru8(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], reset));
      std::copy(lanes[7], lanes[7] + count, out + row + l);
    }
  }
}

// A tensor's values as contiguous float32, flattened.
torch::Tensor float_values(const torch::Tensor& t) { return t.to(torch::kFloat32).flatten().contiguous(); }

// -8 softplus(recurrent_param), with torch's softplus threshold of 20: log a = this x the recurrence gate.
torch::Tensor log_a_rate(const torch::Tensor& recurrent_param) {
  const auto param = float_values(recurrent_param);
  return -8.0 * torch::where(param > 20.0, param, torch::log1p(torch::exp(param)));
}

RGLRUWeights rglru_weights(const torch::Tensor& input_gate_weight, const torch::Tensor& input_gate_bias,
                           const torch::Tensor& recurrence_gate_weight, const torch::Tensor& recurrence_gate_bias,
                           const torch::Tensor& recurrent_param) {
  const int64_t L = recurrent_param.numel(), H = input_gate_weight.size(0);
  TORCH_CHECK(H > 0 && L % H == 0, "rglru: width ", L, " is not a multiple of ", H, " heads");
  for (const torch::Tensor* t : {&input_gate_weight, &recurrence_gate_weight})
    TORCH_CHECK(t->dim() == 3 && t->is_contiguous() && t->size(0) == H && t->size(1) == L / H &&
                    t->size(2) == L / H,
                "rglru: gate weights must be contiguous (H, L/H, L/H) tensors");
  for (const torch::Tensor* t : {&input_gate_bias, &recurrence_gate_bias})
    TORCH_CHECK(t->numel() == L, "rglru: gate biases must have L values");
  return {input_gate_weight, float_values(input_gate_bias), recurrence_gate_weight, float_values(recurrence_gate_bias),
          log_a_rate(recurrent_param)};
}

// x (M, L) float32, the gates' weights and biases, recurrent_param (L), state h
// (M, L) float32, positions (M) -> the new state (M, L).
torch::Tensor rglru_step(const torch::Tensor& x, const torch::Tensor& input_gate_weight,
                         const torch::Tensor& input_gate_bias, const torch::Tensor& recurrence_gate_weight,
                         const torch::Tensor& recurrence_gate_bias, const torch::Tensor& recurrent_param,
                         const torch::Tensor& h, const torch::Tensor& positions) {
  check_x(x);
  const auto weights = rglru_weights(input_gate_weight, input_gate_bias, recurrence_gate_weight,
                                     recurrence_gate_bias, recurrent_param);
  TORCH_CHECK(x.size(1) == weights.log_a_rate.numel(), "rglru_step: x must be (M, L)");
  TORCH_CHECK(h.scalar_type() == torch::kFloat32 && h.is_contiguous() && h.sizes() == x.sizes(),
              "rglru_step: h must be a contiguous float32 tensor shaped as x");
  const int64_t* position = checked_positions(positions, x.size(0), "rglru_step");
  auto out = torch::empty_like(x), input_gate = torch::empty_like(x), recurrence_gate = torch::empty_like(x);
  rglru_rows(x.data_ptr<float>(), x.size(0), weights, h.data_ptr<float>(), position,
             input_gate.data_ptr<float>(), recurrence_gate.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

// The RG-LRU over a whole prompt: x and the gates' products (B, T, L) float32,
// without their biases, the gates' biases and recurrent_param (L), positions
// (B, T) int64 (-1: padding, which carries the state through unchanged; 0: a
// document start), the state h0 (B, L) float32 -> every h (B, T, L) float32;
// h0 takes the last. The element-wise steps and the recurrence in one pass
// per 8 channels of a row, in place of a dozen passes of torch operations and
// a blocked scan: a prefill's products stay with torch's GEMMs, which compute
// the gates' products as one batched product.
torch::Tensor rglru_sequence(const torch::Tensor& x, const torch::Tensor& input_gate,
                             const torch::Tensor& recurrence_gate, const torch::Tensor& input_gate_bias,
                             const torch::Tensor& recurrence_gate_bias, const torch::Tensor& recurrent_param,
                             const torch::Tensor& positions, torch::Tensor& h0) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "rglru_sequence: x must be a contiguous float32 (B, T, L) tensor");
  const int64_t B = x.size(0), T = x.size(1), L = x.size(2);
  for (const torch::Tensor* t : {&input_gate, &recurrence_gate})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->sizes() == x.sizes(),
                "rglru_sequence: the gates' products must be contiguous float32 tensors shaped as x");
  for (const torch::Tensor* t : {&input_gate_bias, &recurrence_gate_bias, &recurrent_param})
    TORCH_CHECK(t->numel() == L, "rglru_sequence: gate biases and recurrent_param must have L values");
  TORCH_CHECK(h0.scalar_type() == torch::kFloat32 && h0.is_contiguous() && h0.dim() == 2 && h0.size(0) == B &&
                  h0.size(1) == L,
              "rglru_sequence: h0 must be a contiguous float32 (B, L) tensor");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.is_contiguous() && positions.dim() == 2 &&
                  positions.size(0) == B && positions.size(1) == T,
              "rglru_sequence: positions must be a contiguous int64 (B, T) tensor");
  const auto bi = float_values(input_gate_bias), ba = float_values(recurrence_gate_bias),
             rate = log_a_rate(recurrent_param);
  auto out = torch::empty_like(x);
  const float *xs = x.data_ptr<float>(), *gi = input_gate.data_ptr<float>(), *ga = recurrence_gate.data_ptr<float>();
  const float *bias_i = bi.data_ptr<float>(), *bias_a = ba.data_ptr<float>(), *log_a_rate = rate.data_ptr<float>();
  const int64_t* position = positions.data_ptr<int64_t>();
  float *h_all = out.data_ptr<float>(), *last = h0.data_ptr<float>();
  const int64_t chunks = (L + 7) / 8;  // of 8 channels; the last padded through copies
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / chunks, l = job % chunks * 8, count = std::min<int64_t>(8, L - l);
      // The chunk's constants and state, padded to 8 lanes (zeros past L: they are never stored).
      alignas(32) float lanes[7][8] = {};
      const float* constants[3] = {bias_i + l, bias_a + l, log_a_rate + l};
      for (int c = 0; c < 3; ++c) std::copy(constants[c], constants[c] + count, lanes[c]);
      std::copy(last + b * L + l, last + b * L + l + count, lanes[3]);
      __m256 h = _mm256_load_ps(lanes[3]);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = (b * T + t) * L + l, p = position[b * T + t];
        if (p < 0) {  // padding: the state goes on unchanged
          _mm256_store_ps(lanes[3], h);
          std::copy(lanes[3], lanes[3] + count, h_all + row);
          continue;
        }
        _mm256_store_ps(lanes[3], h);
        if (count == 8) {
          h = rglru8(xs + row, gi + row, ga + row, lanes[3], lanes[0], lanes[1], lanes[2], p == 0);
          _mm256_storeu_ps(h_all + row, h);
        } else {
          std::copy(xs + row, xs + row + count, lanes[4]);
          std::copy(gi + row, gi + row + count, lanes[5]);
          std::copy(ga + row, ga + row + count, lanes[6]);
          h = rglru8(lanes[4], lanes[5], lanes[6], lanes[3], lanes[0], lanes[1], lanes[2], p == 0);
          _mm256_store_ps(lanes[3], h);
          std::copy(lanes[3], lanes[3] + count, h_all + row);
        }
      }
      _mm256_store_ps(lanes[3], h);
      std::copy(lanes[3], lanes[3] + count, last + b * L + l);
    }
  });
  return out;
}

// A whole decoding step ----------------------------------------------------------------
//
// After the element-wise steps were fused, a step still spent about a quarter
// of its time in Python and in torch's fixed cost per operation, between the
// weight products. The Decoder runs a whole step in one call, from the
// tokens' embedding to the soft-capped logits: rgemma/model.py computes the
// same network, and the tests compare the two step by step. The weights are
// the model's own tensors, handed over by position in the order of the
// model's weight table (rgemma/backends/cpu.py builds the lists); the small
// ones (norms, biases, conv taps) are kept as float32 copies. Between two
// weight products no torch operation runs, and the activations live in
// buffers kept from step to step: the weights' stream has just emptied the
// caches, where each torch operation's code and bookkeeping cost
// microseconds to bring back.

// A linear layer as handed over: its format's tensors ([weight], [qweight,
// scale] or [qweight, scale, minimum]) and its bias, if any.
using LinearParts = std::tuple<std::vector<torch::Tensor>, std::optional<torch::Tensor>>;
// A residual block: whether it is recurrent, its small tensors (temporal and
// channel norms; for a recurrent block then the conv weight and bias, the
// RG-LRU's input gate weight and bias, recurrence gate weight and bias, and
// recurrent_param), and its linears (temporal, then the MLP's gate, up, down).
using BlockParts = std::tuple<bool, std::vector<torch::Tensor>, std::vector<LinearParts>>;

Linear linear_of(const LinearParts& parts) {
  const auto& [tensors, bias] = parts;
  Linear linear;
  switch (tensors.size()) {
    case 1: linear = Linear::floating(tensors[0]); break;
    case 2: linear = Linear::int8(tensors[0], tensors[1]); break;
    case 3: linear = Linear::int4(tensors[0], tensors[1], tensors[2], tensors[0].size(1) * 2 / tensors[1].size(1)); break;
    default: TORCH_CHECK(false, "Decoder: a linear is [weight], [qweight, scale] or [qweight, scale, minimum], got ",
                         tensors.size(), " tensors");
  }
  return bias ? linear.with_bias(*bias) : linear;
}

torch::Tensor float_copy(const torch::Tensor& t) { return t.to(torch::kFloat32).contiguous(); }

class Decoder {
 public:
  // blocks: see BlockParts; eps: the norms'; inverse_frequency: RoPE's (head_dim / 4).
  // For `step`: the embedding (also the tied output layer, in any linear format)
  // and the final norm, the embedding's scale and the logits' soft cap (0: none).
  Decoder(const std::vector<BlockParts>& blocks, double eps, torch::Tensor inverse_frequency,
          const std::optional<LinearParts>& embedding, const std::optional<torch::Tensor>& final_norm,
          double embedding_scale, double soft_cap)
      : eps_(eps), inverse_frequency_(inverse_frequency.to(torch::kFloat32).contiguous()),
        embedding_scale_(embedding_scale), soft_cap_(soft_cap) {
    TORCH_CHECK(embedding.has_value() == final_norm.has_value(), "Decoder: give both the embedding and the final norm");
    if (embedding) {
      remember(std::get<0>(*embedding));
      remember({*final_norm});
      embedding_ = linear_of(*embedding);
      final_norm_ = float_copy(*final_norm);
      width_ = final_norm_.numel();
      // Quantized rows come back in the model's float dtype, as QuantizedEmbedding returns them.
      const at::ScalarType stored = embedding_.weight.scalar_type();
      const bool quantized = stored == torch::kInt8 || stored == torch::kUInt8;
      row_dtype_ = quantized ? final_norm->scalar_type() : torch::kFloat32;
    }
    for (const auto& [recurrent, small, linears] : blocks) {
      remember(small);
      for (const LinearParts& parts : linears) {
        remember(std::get<0>(parts));
        if (std::get<1>(parts)) remember({*std::get<1>(parts)});
      }
      TORCH_CHECK(small.size() == (recurrent ? 9u : 2u), "Decoder: a ", recurrent ? "recurrent" : "attention",
                  " block has ", recurrent ? 9 : 2, " small tensors, got ", small.size());
      TORCH_CHECK(linears.size() == (recurrent ? 6u : 7u), "Decoder: a ", recurrent ? "recurrent" : "attention",
                  " block has ", recurrent ? 6 : 7, " linears, got ", linears.size());
      Block block;
      block.recurrent = recurrent;
      block.temporal_norm = float_copy(small[0]);
      block.channel_norm = float_copy(small[1]);
      const size_t temporal = recurrent ? 3 : 4;
      for (size_t i = 0; i < linears.size(); ++i)
        (i < temporal ? block.linear : block.mlp).push_back(linear_of(linears[i]));
      if (recurrent) {
        const torch::Tensor conv = float_copy(small[2]);  // (L, 1, C + 1)
        TORCH_CHECK_VALUE(conv.dim() == 3 && conv.size(2) >= 2, "Decoder: a conv of width at least 2");
        block.conv_weight = conv.view({conv.size(0), conv.size(2)});
        block.conv_bias = float_copy(small[3]);
        block.rglru = rglru_weights(small[4], small[5], small[6], small[7], small[8]);
      } else {
        TORCH_CHECK(block.linear[1].N == inverse_frequency_.numel() * 4,
                    "Decoder: RoPE's frequencies do not match the head dim ", block.linear[1].N);
      }
      TORCH_CHECK(width_ == 0 || width_ == block.temporal_norm.numel(), "Decoder: a block of width ",
                  block.temporal_norm.numel(), " in a model of width ", width_);
      width_ = block.temporal_norm.numel();
      for (const Linear& linear : block.linear) widest_ = std::max(widest_, linear.N);
      for (const Linear& linear : block.mlp) widest_ = std::max(widest_, linear.N);
      blocks_.push_back(std::move(block));
    }
    widest_ = std::max(widest_, width_);
  }

  // Whether every tensor the Decoder was built from keeps the version and the
  // storage it had then; if not, the copies the Decoder holds may be stale.
  bool is_current() const {
    for (const Source& source : sources_)
      if (source.tensor._version() != source.version || source.tensor.data_ptr() != source.data) return false;
    return true;
  }

  // x (M, D) float32: the embedded tokens at positions (M). states: for each
  // block, its recurrent state [h (M, L) float32, conv taps (M, C, L) float32]
  // or its attention state [keys, values (M, W, K), slot positions (M, W)],
  // updated in place. Returns the last block's output (M, D).
  torch::Tensor run(const torch::Tensor& x, const torch::Tensor& positions,
                    const std::vector<std::vector<torch::Tensor>>& states) {
    check_x(x);
    TORCH_CHECK(x.size(1) == width_, "Decoder: x has ", x.size(1), " features, the blocks ", width_);
    const std::string problem = misfit(states, x.size(0));
    TORCH_CHECK(problem.empty(), "Decoder: ", problem);
    auto residual = x.clone();
    blocks(residual.data_ptr<float>(), x.size(0), checked_positions(positions, x.size(0), "Decoder"), states);
    return residual;
  }

  // tokens (M) int64 at positions (M), states as for `run` -> the next tokens'
  // logits (M, V) float32: embedding, every block, final norm, tied output
  // layer, soft cap. None, before anything changes, if the states are not laid
  // out as the Decoder updates them (the caller then takes another path).
  std::optional<torch::Tensor> step(const torch::Tensor& tokens, const torch::Tensor& positions,
                                    const std::vector<std::vector<torch::Tensor>>& states) {
    TORCH_CHECK(final_norm_.defined(), "Decoder: built without the embedding and final norm, so it cannot step");
    TORCH_CHECK(tokens.scalar_type() == torch::kInt64 && tokens.dim() == 1 && tokens.is_contiguous(),
                "Decoder: tokens must be a contiguous int64 (M) tensor");
    const int64_t M = tokens.size(0), D = width_;
    const int64_t* position = checked_positions(positions, M, "Decoder");
    if (!misfit(states, M).empty()) return std::nullopt;
    auto residual = torch::empty({M, D}, tokens.options().dtype(torch::kFloat32));
    float* x = residual.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) embed(tokens.data_ptr<int64_t>()[m], x + m * D);
    blocks(x, M, position, states);
    float* normed = scratch(M).normed;
    norm(x, final_norm_, M, normed);
    auto logits = torch::empty({M, embedding_.N}, residual.options());
    Linear::apply_all({{&embedding_, logits.data_ptr<float>()}}, normed, M, D);
    if (soft_cap_ > 0) soft_cap(logits.data_ptr<float>(), logits.numel(), static_cast<float>(soft_cap_));
    return logits;
  }

 private:
  struct Block {
    torch::Tensor temporal_norm, channel_norm;
    bool recurrent = false;
    std::vector<Linear> linear;  // recurrent: linear_y, linear_x, linear_out; attention: q, k, v, o
    torch::Tensor conv_weight, conv_bias;  // (L, C + 1), (L)
    RGLRUWeights rglru;
    std::vector<Linear> mlp;  // gate, up, down
  };

  // One step's activations, M rows of at most widest_ values each, kept
  // from one step to the next.
  struct Scratch {
    float *normed, *delta, *a, *b, *c, *d, *e;
  };

  struct Source {
    torch::Tensor tensor;
    int64_t version;  // the tensor's in-place update counter
    const void* data;
  };

  void remember(const std::vector<torch::Tensor>& tensors) {
    for (const torch::Tensor& tensor : tensors) sources_.push_back({tensor, tensor._version(), tensor.data_ptr()});
  }

  Scratch scratch(int64_t M) {
    const int64_t row = M * widest_;
    if (static_cast<int64_t>(scratch_.size()) < 7 * row) scratch_.assign(7 * row, 0.0f);
    float* p = scratch_.data();
    return {p, p + row, p + 2 * row, p + 3 * row, p + 4 * row, p + 5 * row, p + 6 * row};
  }

  // What in the states (M rows) is not as the blocks update them in place, or "".
  std::string misfit(const std::vector<std::vector<torch::Tensor>>& states, int64_t M) const {
    if (states.size() != blocks_.size())
      return std::to_string(states.size()) + " states for " + std::to_string(blocks_.size()) + " blocks";
    auto fits = [&](const torch::Tensor& t, std::initializer_list<at::ScalarType> dtypes,
                    std::initializer_list<int64_t> sizes) {
      return t.is_contiguous() && std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) != dtypes.end() &&
             t.sizes() == torch::IntArrayRef(sizes);
    };
    for (size_t b = 0; b < blocks_.size(); ++b) {
      const Block& block = blocks_[b];
      const std::vector<torch::Tensor>& state = states[b];
      const std::string where = "block " + std::to_string(b) + ": ";
      if (block.recurrent) {
        const int64_t L = block.linear[0].N, C = block.conv_weight.size(1) - 1;
        if (state.size() != 2) return where + "a recurrent block's state is [h, conv taps]";
        if (!fits(state[0], {torch::kFloat32}, {M, L})) return where + "h must be a contiguous float32 (M, L) tensor";
        if (!fits(state[1], {torch::kFloat32}, {M, C, L}))
          return where + "conv taps must be a contiguous float32 (M, C, L) tensor";
      } else {
        const int64_t K = block.linear[1].N;
        if (state.size() != 3) return where + "an attention block's state is [keys, values, slot positions]";
        const int64_t W = state[0].dim() == 3 ? state[0].size(1) : -1;
        // Not a layout another path could take: a ring of no slots is outside every path's contract.
        TORCH_CHECK_VALUE(W != 0, "Decoder: ", where, "an attention ring of no slots");
        if (!fits(state[0], {torch::kFloat32, torch::kBFloat16}, {M, W, K}) ||
            !fits(state[1], {state[0].scalar_type()}, {M, W, K}))
          return where + "keys and values must be contiguous (M, W, K) tensors, both float32 or both bfloat16";
        if (!fits(state[2], {torch::kInt64}, {M, W}))
          return where + "slot positions must be a contiguous int64 (M, W) tensor";
      }
    }
    return "";
  }

  // The embedding of `token` into out (D): its row, in the dtype the model's
  // embedding returns, times the embedding scale.
  void embed(int64_t token, float* out) const {
    embedding_.row(token, width_, out);
    for (int64_t d = 0; d < width_; ++d) {
      float value = out[d];
      if (row_dtype_ == torch::kBFloat16) value = static_cast<float>(static_cast<at::BFloat16>(value));
      if (row_dtype_ == torch::kFloat16) value = static_cast<float>(static_cast<at::Half>(value));
      out[d] = value * static_cast<float>(embedding_scale_);
    }
  }

  // residual (M, D) -> the last block's output, in place; the states fit (misfit).
  void blocks(float* residual, int64_t M, const int64_t* position,
              const std::vector<std::vector<torch::Tensor>>& states) {
    const Scratch s = scratch(M);
    const int64_t n = M * width_;
    for (size_t b = 0; b < blocks_.size(); ++b) {
      const Block& block = blocks_[b];
      norm(residual, block.temporal_norm, M, s.normed);
      if (block.recurrent)
        recurrent(block, s, M, position, states[b]);
      else
        attention(block, s, M, position, states[b]);
      for (int64_t i = 0; i < n; ++i) residual[i] += s.delta[i];
      norm(residual, block.channel_norm, M, s.normed);
      mlp(block, s, M);
      for (int64_t i = 0; i < n; ++i) residual[i] += s.delta[i];
    }
  }

  void norm(const float* x, const torch::Tensor& weight, int64_t M, float* out) const {
    rms_norm_rows(x, Float32Eights{weight.data_ptr<float>()}, M, width_, eps_, out);
  }

  // s.normed (M, D) -> s.delta (M, D).
  void mlp(const Block& block, const Scratch& s, int64_t M) const {
    const Linear &gate = block.mlp[0], &up = block.mlp[1];
    Linear::apply_all({{&gate, s.a}, {&up, s.b}}, s.normed, M, width_);
    gelu_times(s.a, s.b, M * gate.N);
    Linear::apply_all({{&block.mlp[2], s.delta}}, s.a, M, gate.N);
  }

  // s.normed (M, D) -> s.delta (M, D); the state [h, conv taps] moves on.
  void recurrent(const Block& block, const Scratch& s, int64_t M, const int64_t* position,
                 const std::vector<torch::Tensor>& state) const {
    const torch::Tensor &h = state[0], &taps = state[1];
    const int64_t L = block.linear[0].N, C = block.conv_weight.size(1) - 1;
    float *y = s.a, *u = s.b, *conv = s.c;
    Linear::apply_all({{&block.linear[0], y}, {&block.linear[1], u}}, s.normed, M, width_);
    conv_rows(u, M, L, taps.data_ptr<float>(), C, block.conv_weight.data_ptr<float>(),
              block.conv_bias.data_ptr<float>(), position, conv);
    rglru_rows(conv, M, block.rglru, h.data_ptr<float>(), position, s.d, s.e, h.data_ptr<float>());
    gelu_times(y, h.data_ptr<float>(), M * L);
    Linear::apply_all({{&block.linear[2], s.delta}}, y, M, L);
  }

  // s.normed (M, D) -> s.delta (M, D); the ring of keys and values moves on.
  void attention(const Block& block, const Scratch& s, int64_t M, const int64_t* position,
                 const std::vector<torch::Tensor>& state) const {
    const int64_t K = block.linear[1].N, H = block.linear[0].N / K;
    float *q = s.a, *k = s.b, *v = s.c, *attended = s.d;
    Linear::apply_all({{&block.linear[0], q}, {&block.linear[1], k}, {&block.linear[2], v}}, s.normed, M, width_);
    torch::Tensor ring_k = state[0], ring_v = state[1], ring_pos = state[2];
    attention_rows(q, k, v, M, H, K, ring_k, ring_v, ring_pos, position, inverse_frequency_.data_ptr<float>(),
                   static_cast<float>(1.0 / std::sqrt(static_cast<double>(K))), attended);
    Linear::apply_all({{&block.linear[3], s.delta}}, attended, M, H * K);
  }

  double eps_;
  torch::Tensor inverse_frequency_;
  double embedding_scale_, soft_cap_;
  Linear embedding_;
  torch::Tensor final_norm_;
  at::ScalarType row_dtype_ = torch::kFloat32;
  int64_t width_ = 0, widest_ = 0;  // D, and the most values of any activation's row
  std::vector<Block> blocks_;
  std::vector<Source> sources_;
  std::vector<float> scratch_;
};

// Reads every byte of t once (a bandwidth probe for the roofline); returns a checksum.
int64_t read_all(const torch::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.nbytes() % 32 == 0, "read_all needs a contiguous tensor of 32-byte multiples");
  const auto* p = reinterpret_cast<const __m256i*>(t.data_ptr());
  const int64_t vectors = t.nbytes() / 32;
  std::atomic<int64_t> checksum{0};
  at::parallel_for(0, vectors, 1 << 16, [&](int64_t begin, int64_t end) {
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    int64_t i = begin;
    for (; i + 4 <= end; i += 4) {
      a = _mm256_xor_si256(a, _mm256_loadu_si256(p + i));
      b = _mm256_xor_si256(b, _mm256_loadu_si256(p + i + 1));
      c = _mm256_xor_si256(c, _mm256_loadu_si256(p + i + 2));
      d = _mm256_xor_si256(d, _mm256_loadu_si256(p + i + 3));
    }
    for (; i < end; ++i) a = _mm256_xor_si256(a, _mm256_loadu_si256(p + i));
    const __m256i all = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
    checksum ^= _mm256_extract_epi64(all, 0) ^ _mm256_extract_epi64(all, 1) ^ _mm256_extract_epi64(all, 2) ^
                _mm256_extract_epi64(all, 3);
  });
  return checksum.load();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The products and the Decoder's calls release the GIL: a server's event
  // loop in the same process runs on while they compute.
  const auto without_gil = py::call_guard<py::gil_scoped_release>();
  m.def("float_linear", &float_linear, without_gil,
        "x (M, K) float32 @ W (N, K) float32 or bfloat16, transposed -> (M, N)");
  m.def("int8_linear", &int8_linear, without_gil, "x (M, K) float32 @ (q * scale), transposed -> (M, N)");
  m.def("int4_linear", &int4_linear, without_gil, "x (M, K) float32 @ (q * scale + minimum), transposed -> (M, N)");
  m.def("block_diagonal_linear", &block_diagonal_linear,
        "x (M, H, I) float32, W (H, I, J) float32 or bfloat16 -> (M, H, J): y[m, h] = x[m, h] @ W[h]");
  m.def("attend_few", &attend_few,
        "q (B, Q, H, K) float32 against lists of keys, values (B, S, K) and visible (B, Q, S) -> (B, Q, H, K)");
  m.def("rms_norm", &rms_norm, "x (M, D) float32, weight (D) zero-centred -> x / rms(x) * (1 + weight)");
  m.def("attention_step", &attention_step,
        "one local attention step: q (M, H, K), k, v (M, K), the ring's keys and values (M, W, K) and positions "
        "(M, W) updated in place, positions (M), RoPE inverse frequencies (K / 4), scale -> (M, H, K)");
  m.def("conv_step", &conv_step,
        "one step of the depthwise causal convolution: x (M, L), taps (M, C, L) shifted in place, "
        "weight (L, C + 1), bias (L), positions (M) -> output (M, L)");
  m.def("rglru_step", &rglru_step,
        "one RG-LRU step: x (M, L), gate weights (H, L/H, L/H) and float32 biases (L), recurrent_param (L), "
        "state h (M, L), positions (M) -> new state (M, L)");
  m.def("rglru_sequence", &rglru_sequence, without_gil,
        "the RG-LRU over a prompt: x and the gates' products without bias (B, T, L) float32, gate biases (L), "
        "recurrent_param (L), positions (B, T) (-1: padding), state h0 (B, L) float32, updated in place to the "
        "last -> every state (B, T, L)");
  py::class_<Decoder>(m, "Decoder", "a whole decoding step in one call")
      .def(py::init<const std::vector<BlockParts>&, double, torch::Tensor, const std::optional<LinearParts>&,
                    const std::optional<torch::Tensor>&, double, double>(),
           py::arg("blocks"), py::arg("eps"), py::arg("inverse_frequency"), py::arg("embedding") = py::none(),
           py::arg("final_norm") = py::none(), py::arg("embedding_scale") = 1.0, py::arg("soft_cap") = 0.0)
      .def("run", &Decoder::run, py::arg("x"), py::arg("positions"), py::arg("states"),
           without_gil,
           "the blocks alone: x (M, D) float32 at positions (M), each block's state tensors (updated in place) "
           "-> (M, D)")
      .def("step", &Decoder::step, py::arg("tokens"), py::arg("positions"), py::arg("states"),
           without_gil,
           "tokens (M) int64 at positions (M), each block's state tensors (updated in place) -> logits (M, V); "
           "None, with nothing changed, if the states are not laid out as it updates them")
      .def("is_current", &Decoder::is_current,
           "whether every tensor it was built from keeps its version and storage (else build it again)");
  m.def("read_all", &read_all, "read every byte of a tensor once (bandwidth probe)");
}
