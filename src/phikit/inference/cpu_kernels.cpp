// Matrix-vector products for decoding on the CPU: y[r, n] = sum_k x[r, k] * W[n, k] (+ bias[n]) for a few rows of
// activations x (1-16: one token per sequence) and weights W stored as fp32, bf16, int8 (one scale per output
// channel) or int4 (blocks of 32 inputs with a scale and a minimum). One decoding step reads every weight once, so
// these kernels are built to stream W at the memory's speed: threads share the output channels, each weight row is
// read from memory once and multiplied with every activation row while it is in L1, and int8/int4 rows are
// multiplied in integers against activations rounded to int8 in blocks of 32 (one scale per block).
//
// Two instruction sets: AVX2 + FMA (the base this file is compiled for) and AVX512 F/BW/VL with VNNI (integer dot
// products) and, where present, AVX512-BF16. Python chooses one from the CPU's flags; the AVX512 code is compiled
// with a target pragma and never runs unless asked for.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kBlock = 32;   // inputs per activation scale (and per int4 weight scale)
constexpr int kRowTile = 4;  // activation rows multiplied together with one weight row (accumulators in registers)

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Activations rounded to int8 in blocks of 32: q = round(x / d), d = max|x| / 127 per block. Rows are padded with
// zeros to `padded` inputs (a multiple of 64) so the int4 loops read whole 64-input chunks. `scale8` repeats each
// block's d over 8 lanes, the layout of the int32 sums the dot-product instructions leave per block; `sums` holds
// each block's exact sum of x (the int4 minimum multiplies it).
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> scale8;
  std::vector<float> scale;
  std::vector<float> sums;
  int64_t padded = 0, blocks = 0;
};

QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t k) {
  QuantizedRows out;
  out.padded = (k + 63) / 64 * 64;
  out.blocks = out.padded / kBlock;
  out.q.assign(rows * out.padded, 0);
  out.scale8.assign(rows * out.blocks * 8, 0.f);
  out.scale.assign(rows * out.blocks, 0.f);
  out.sums.assign(rows * out.blocks, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    for (int64_t b = 0; b * kBlock < k; ++b) {
      int64_t start = b * kBlock, end = std::min<int64_t>(start + kBlock, k);
      float amax = 0.f, sum = 0.f;
      for (int64_t i = start; i < end; ++i) {
        amax = std::max(amax, std::fabs(xr[i]));
        sum += xr[i];
      }
      float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int8_t* qr = out.q.data() + r * out.padded;
      for (int64_t i = start; i < end; ++i) qr[i] = static_cast<int8_t>(std::nearbyint(xr[i] * inv));
      out.scale[r * out.blocks + b] = d;
      out.sums[r * out.blocks + b] = sum;
      for (int j = 0; j < 8; ++j) out.scale8[(r * out.blocks + b) * 8 + j] = d;
    }
  }
  return out;
}

// Every kernel below computes output channels [n0, n1) for all rows; `y` is [rows, n] row-major.
struct Problem {
  int64_t rows, k, n;
  float* y;
  const float* bias;  // nullptr: none
};

inline void store(const Problem& p, int64_t r, int64_t n, float v) {
  p.y[r * p.n + n] = v + (p.bias ? p.bias[n] : 0.f);
}

// ---------------------------------------------------------------------------------------------------------- AVX2
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// Floating-point weights (fp32 or bf16) against fp32 activations. LoadW(ptr, i) gives 8 weights as fp32.
template <int R, typename W, typename LoadW, typename Scalar>
void float_rows_avx2(const Problem& p, const float* x, int64_t r0, const W* w, int64_t n, LoadW load, Scalar scalar) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= p.k; i += 8) {
    __m256 wv = load(w, i);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + (r0 + r) * p.k + i), acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum256(acc[r]);
    for (int64_t j = i; j < p.k; ++j) s += scalar(w[j]) * x[(r0 + r) * p.k + j];
    store(p, r0 + r, n, s);
  }
}

// Runs `body.template operator()<R>(r0)` over the activation rows in tiles of kRowTile, for one weight row.
template <typename Body>
inline void over_row_tiles(int64_t rows, Body&& body) {
  int64_t r0 = 0;
  for (; r0 + 4 <= rows; r0 += 4) body(std::integral_constant<int, 4>(), r0);
  switch (rows - r0) {
    case 3: body(std::integral_constant<int, 3>(), r0); break;
    case 2: body(std::integral_constant<int, 2>(), r0); break;
    case 1: body(std::integral_constant<int, 1>(), r0); break;
    default: break;
  }
}

void f32_avx2(const Problem& p, const float* x, const float* w, int64_t n0, int64_t n1) {
  auto load = [](const float* w, int64_t i) { return _mm256_loadu_ps(w + i); };
  auto scalar = [](float v) { return v; };
  for (int64_t n = n0; n < n1; ++n)
    over_row_tiles(p.rows, [&](auto tile, int64_t r0) {
      float_rows_avx2<decltype(tile)::value>(p, x, r0, w + n * p.k, n, load, scalar);
    });
}

void bf16_avx2(const Problem& p, const float* x, const uint16_t* w, int64_t n0, int64_t n1) {
  auto load = [](const uint16_t* w, int64_t i) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  };
  auto scalar = [](uint16_t v) { return bf16_to_float(v); };
  for (int64_t n = n0; n < n1; ++n)
    over_row_tiles(p.rows, [&](auto tile, int64_t r0) {
      float_rows_avx2<decltype(tile)::value>(p, x, r0, w + n * p.k, n, load, scalar);
    });
}

// Signed int8 x signed int8 in 32 lanes -> 8 int32 sums of 4 products. maddubs takes unsigned x signed, so the
// sign of the activation moves onto the weight (|x| * (w * sign x)); a pair of products stays below 2 * 127 * 127,
// inside int16, because both sides are limited to +-127.
inline __m256i dot_i8_avx2(__m256i w, __m256i x) {
  __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// int8 weights, one scale per output channel: y = scale[n] * sum_blocks d_x * (q_x . q_w).
void i8_avx2(const Problem& p, const QuantizedRows& a, const int8_t* w, const float* wscale, int64_t n0, int64_t n1) {
  const int64_t whole = p.k / kBlock;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * p.k;
    over_row_tiles(p.rows, [&](auto tile, int64_t r0) {
      constexpr int R = decltype(tile)::value;
      __m256 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t b = 0; b < whole; ++b) {
        __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * kBlock));
        for (int r = 0; r < R; ++r) {
          const int64_t row = r0 + r;
          __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + row * a.padded + b * kBlock));
          __m256 d = _mm256_set1_ps(a.scale[row * a.blocks + b]);
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8_avx2(wv, xv)), d, acc[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const int64_t row = r0 + r;
        float s = hsum256(acc[r]);
        if (whole * kBlock < p.k) {  // the last, partial block
          int32_t t = 0;
          for (int64_t i = whole * kBlock; i < p.k; ++i) t += int32_t(wr[i]) * a.q[row * a.padded + i];
          s += float(t) * a.scale[row * a.blocks + whole];
        }
        store(p, row, n, s * wscale[n]);
      }
    });
  }
}

// int4 weights: per pair of blocks 32 bytes, the low nibbles the first block's 32 values, the high nibbles the
// second's (a row is padded to whole pairs); w = q * scale + minimum per block, q in 0..15. Then
// x . w = sum_blocks scale * d_x * (q_x . q) + minimum * sum(x).
inline float int4_minimum_term(const uint16_t* mins, const float* sums, int64_t blocks) {
  float s = 0.f;
  for (int64_t b = 0; b < blocks; ++b) s += bf16_to_float(mins[b]) * sums[b];
  return s;
}

void i4_avx2(const Problem& p, const QuantizedRows& a, const uint8_t* w, const uint16_t* scales,
             const uint16_t* mins, int64_t n0, int64_t n1) {
  const int64_t pairs = a.padded / 64, blocks = a.blocks;
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * a.padded / 2;
    const uint16_t* sr = scales + n * blocks;
    const uint16_t* mr = mins + n * blocks;
    over_row_tiles(p.rows, [&](auto tile, int64_t r0) {
      constexpr int R = decltype(tile)::value;
      __m256 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t pr = 0; pr < pairs; ++pr) {
        __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + pr * 32));
        __m256i q[2] = {_mm256_and_si256(packed, low), _mm256_and_si256(_mm256_srli_epi16(packed, 4), low)};
        for (int h = 0; h < 2; ++h) {
          const int64_t b = 2 * pr + h;
          const float ws = bf16_to_float(sr[b]);
          for (int r = 0; r < R; ++r) {
            const int64_t row = r0 + r;
            __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + row * a.padded + b * kBlock));
            // q is 0..15: unsigned x signed needs no sign trick, and pairs stay far inside int16
            __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q[h], xv), _mm256_set1_epi16(1));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(ws * a.scale[row * blocks + b]), acc[r]);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const int64_t row = r0 + r;
        store(p, row, n, hsum256(acc[r]) + int4_minimum_term(mr, a.sums.data() + row * blocks, blocks));
      }
    });
  }
}

}  // namespace

// -------------------------------------------------------------------------------------------------------- AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")
namespace {

template <int R, typename W, typename LoadW, typename Scalar>
void float_rows_avx512(const Problem& p, const float* x, int64_t r0, const W* w, int64_t n, LoadW load,
                       Scalar scalar) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= p.k; i += 16) {
    __m512 wv = load(w, i);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + (r0 + r) * p.k + i), acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float s = _mm512_reduce_add_ps(acc[r]);
    for (int64_t j = i; j < p.k; ++j) s += scalar(w[j]) * x[(r0 + r) * p.k + j];
    store(p, r0 + r, n, s);
  }
}

void f32_avx512(const Problem& p, const float* x, const float* w, int64_t n0, int64_t n1) {
  auto load = [](const float* w, int64_t i) { return _mm512_loadu_ps(w + i); };
  auto scalar = [](float v) { return v; };
  for (int64_t n = n0; n < n1; ++n)
    over_row_tiles(p.rows, [&](auto tile, int64_t r0) {
      float_rows_avx512<decltype(tile)::value>(p, x, r0, w + n * p.k, n, load, scalar);
    });
}

void bf16_avx512(const Problem& p, const float* x, const uint16_t* w, int64_t n0, int64_t n1) {
  auto load = [](const uint16_t* w, int64_t i) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  };
  auto scalar = [](uint16_t v) { return bf16_to_float(v); };
  for (int64_t n = n0; n < n1; ++n)
    over_row_tiles(p.rows, [&](auto tile, int64_t r0) {
      float_rows_avx512<decltype(tile)::value>(p, x, r0, w + n * p.k, n, load, scalar);
    });
}

// int8: VNNI multiplies unsigned x signed bytes straight into int32 lanes. The weights become unsigned by flipping
// their top bit (w + 128, shared by all rows); the extra 128 * sum(q_x) per block is taken off once per row:
// sum_blocks d_x * 128 * sum(q_x) does not depend on the weight row.
void i8_avx512(const Problem& p, const QuantizedRows& a, const int8_t* w, const float* wscale, int64_t n0,
               int64_t n1) {
  const int64_t whole = p.k / kBlock, chunks = p.k / 64;
  std::vector<float> offset(p.rows, 0.f);  // sum over whole blocks of d_x * 128 * sum(q_x)
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t b = 0; b < whole; ++b) {
      int32_t t = 0;
      for (int i = 0; i < kBlock; ++i) t += a.q[r * a.padded + b * kBlock + i];
      offset[r] += 128.f * t * a.scale[r * a.blocks + b];
    }
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * p.k;
    over_row_tiles(p.rows, [&](auto tile, int64_t r0) {
      constexpr int R = decltype(tile)::value;
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(wr + c * 64), flip);
        for (int r = 0; r < R; ++r) {
          const int64_t row = r0 + r;
          __m512i xv = _mm512_loadu_si512(a.q.data() + row * a.padded + c * 64);
          __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
          __m512 d = _mm512_loadu_ps(a.scale8.data() + (row * a.blocks + 2 * c) * 8);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, acc[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const int64_t row = r0 + r;
        float s = _mm512_reduce_add_ps(acc[r]);
        if (whole > 2 * chunks) {  // one whole block left after the 64-input chunks
          const int64_t b = 2 * chunks;
          __m256i wv = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + b * kBlock)),
                                        _mm256_set1_epi8(static_cast<char>(0x80)));
          __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + row * a.padded + b * kBlock));
          __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), wv, xv);
          s += hsum256(_mm256_cvtepi32_ps(dot)) * a.scale[row * a.blocks + b];
        }
        s -= offset[row];
        if (whole * kBlock < p.k) {  // the last, partial block, exact in int32
          int32_t t = 0;
          for (int64_t i = whole * kBlock; i < p.k; ++i) t += int32_t(wr[i]) * a.q[row * a.padded + i];
          s += float(t) * a.scale[row * a.blocks + whole];
        }
        store(p, row, n, s * wscale[n]);
      }
    });
  }
}

inline float int4_minimum_term_avx512(const uint16_t* mins, const float* sums, int64_t blocks) {
  __m512 acc = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 16 <= blocks; b += 16) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + b)));
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)), _mm512_loadu_ps(sums + b), acc);
  }
  return _mm512_reduce_add_ps(acc) + int4_minimum_term(mins + b, sums + b, blocks - b);
}

void i4_avx512(const Problem& p, const QuantizedRows& a, const uint8_t* w, const uint16_t* scales,
               const uint16_t* mins, int64_t n0, int64_t n1) {
  const int64_t pairs = a.padded / 64, blocks = a.blocks;
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w + n * a.padded / 2;
    const uint16_t* sr = scales + n * blocks;
    const uint16_t* mr = mins + n * blocks;
    over_row_tiles(p.rows, [&](auto tile, int64_t r0) {
      constexpr int R = decltype(tile)::value;
      __m512 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t pr = 0; pr < pairs; ++pr) {
        __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + pr * 32));
        __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(packed, low)),
                                       _mm256_and_si256(_mm256_srli_epi16(packed, 4), low), 1);
        __m512 ws = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(bf16_to_float(sr[2 * pr]))),
                                       _mm256_set1_ps(bf16_to_float(sr[2 * pr + 1])), 1);
        for (int r = 0; r < R; ++r) {
          const int64_t row = r0 + r;
          __m512i xv = _mm512_loadu_si512(a.q.data() + row * a.padded + pr * 64);
          __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xv);
          __m512 d = _mm512_mul_ps(ws, _mm512_loadu_ps(a.scale8.data() + (row * blocks + 2 * pr) * 8));
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, acc[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        const int64_t row = r0 + r;
        store(p, row, n, _mm512_reduce_add_ps(acc[r]) +
                             int4_minimum_term_avx512(mr, a.sums.data() + row * blocks, blocks));
      }
    });
  }
}

}  // namespace
#pragma GCC pop_options

namespace {

enum Isa { kAvx2 = 0, kAvx512 = 1 };

// The CPU's own answer (cpuid), so that asking for AVX512 on a CPU without it falls back instead of crashing.
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

Isa pick(int64_t wanted) { return wanted == kAvx512 && cpu_has_avx512() ? kAvx512 : kAvx2; }

void check_rows(const torch::Tensor& x, const torch::Tensor& w, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous fp32 [rows, in_features] tensor");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " inputs, the weights ", k);
  TORCH_CHECK(w.is_contiguous(), "weights must be contiguous");
}

torch::Tensor output(const torch::Tensor& x, int64_t n) { return torch::empty({x.size(0), n}, x.options()); }

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == n,
              "bias must be a contiguous fp32 vector of out_features");
  return bias->data_ptr<float>();
}

// Threads share the output channels in contiguous ranges of at least 256 KB of weights each: a small matrix stays
// on one thread, where waking another costs more than it saves (much more on a busy machine).
template <typename Fn>
void over_channels(int64_t n, int64_t row_bytes, Fn fn) {
  const int64_t grain = std::max<int64_t>(16, (256 << 10) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) { fn(n0, n1); });
}

torch::Tensor linear_f32(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t isa) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.dim() == 2, "fp32 [out, in] weights expected");
  check_rows(x, w, w.size(1));
  auto y = output(x, w.size(0));
  Problem p{x.size(0), w.size(1), w.size(0), y.data_ptr<float>(), bias_ptr(bias, w.size(0))};
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  Isa use = pick(isa);
  over_channels(p.n, p.k * 4, [&](int64_t n0, int64_t n1) {
    use == kAvx512 ? f32_avx512(p, xp, wp, n0, n1) : f32_avx2(p, xp, wp, n0, n1);
  });
  return y;
}

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t isa) {
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.dim() == 2, "bf16 [out, in] weights expected");
  check_rows(x, w, w.size(1));
  auto y = output(x, w.size(0));
  Problem p{x.size(0), w.size(1), w.size(0), y.data_ptr<float>(), bias_ptr(bias, w.size(0))};
  const float* xp = x.data_ptr<float>();
  auto wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  Isa use = pick(isa);
  over_channels(p.n, p.k * 2, [&](int64_t n0, int64_t n1) {
    use == kAvx512 ? bf16_avx512(p, xp, wp, n0, n1) : bf16_avx2(p, xp, wp, n0, n1);
  });
  return y;
}

torch::Tensor linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scales, c10::optional<torch::Tensor> bias,
                          int64_t isa) {
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.dim() == 2, "int8 [out, in] weights expected");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.numel() == w.size(0) && scales.is_contiguous(),
              "int8 scales must be a contiguous fp32 vector of out_features");
  check_rows(x, w, w.size(1));
  auto y = output(x, w.size(0));
  Problem p{x.size(0), w.size(1), w.size(0), y.data_ptr<float>(), bias_ptr(bias, w.size(0))};
  QuantizedRows a = quantize_rows(x.data_ptr<float>(), p.rows, p.k);
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  Isa use = pick(isa);
  over_channels(p.n, p.k, [&](int64_t n0, int64_t n1) {
    use == kAvx512 ? i8_avx512(p, a, wp, sp, n0, n1) : i8_avx2(p, a, wp, sp, n0, n1);
  });
  return y;
}

torch::Tensor linear_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor mins,
                          c10::optional<torch::Tensor> bias, int64_t in_features, int64_t isa) {
  const int64_t padded = (in_features + 63) / 64 * 64;
  TORCH_CHECK(in_features % kBlock == 0, "int4 needs in_features divisible by 32");
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.size(1) == padded / 2,
              "int4 weights must be uint8 [out, in_features rounded up to 64 / 2]");
  TORCH_CHECK(scales.scalar_type() == torch::kBFloat16 && mins.scalar_type() == torch::kBFloat16 &&
                  scales.is_contiguous() && mins.is_contiguous() && scales.numel() == w.size(0) * padded / kBlock &&
                  mins.numel() == scales.numel(),
              "int4 scales and minimums must be contiguous bf16 [out, padded in_features / 32]");
  check_rows(x, w, in_features);
  auto y = output(x, w.size(0));
  Problem p{x.size(0), in_features, w.size(0), y.data_ptr<float>(), bias_ptr(bias, w.size(0))};
  QuantizedRows a = quantize_rows(x.data_ptr<float>(), p.rows, p.k);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  auto sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  auto mp = reinterpret_cast<const uint16_t*>(mins.data_ptr());
  Isa use = pick(isa);
  over_channels(p.n, p.k / 2, [&](int64_t n0, int64_t n1) {
    use == kAvx512 ? i4_avx512(p, a, wp, sp, mp, n0, n1) : i4_avx2(p, a, wp, sp, mp, n0, n1);
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_f32", &linear_f32);
  m.def("linear_bf16", &linear_bf16);
  m.def("linear_int8", &linear_int8);
  m.def("linear_int4", &linear_int4);
  m.def("has_avx512", &cpu_has_avx512);
}
