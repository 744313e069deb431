// Matrix-vector products for decoding on the CPU: y[r, n] = sum_k x[r, k] * W[n, k] (+ bias[n]) for a few rows of
// activations x (1-16: one token per sequence) and weights W stored as fp32, bf16, int8 (one scale per output
// channel) or int4 (blocks of 32 inputs with a scale and a minimum). One decoding step reads every weight once, so
// these kernels are built to stream W at the memory's speed: threads share the output channels, each weight is read
// from memory once and multiplied with every activation row while it is in registers or L1, and int8/int4 weights
// (stored 16 output channels side by side) are multiplied in integers against activations rounded to int8 in blocks
// of 32 (one scale per block). The two products of a decoding step's attention read the KV cache where it lies.
//
// Two instruction sets: AVX2 + FMA (the base this file is compiled for) and AVX512 F/BW/VL with VNNI (integer dot
// products) and, where present, AVX512-BF16. Python chooses one from the CPU's flags; the AVX512 code is compiled
// with a target pragma and never runs unless asked for.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int kBlock = 32;   // inputs per activation scale (and per int4 weight scale)

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_to_float(v); }  // bf16 bits

// Activations rounded to int8 in blocks of 32: q = round(x / d), d = max|x| / 127 per block, rows padded with zeros
// to `padded` inputs (a multiple of 64). `scale8` repeats each block's d over 8 lanes, the layout of the int32 sums
// the int8 dot products leave per block; `sums` holds each block's exact sum of x (the int4 minimum multiplies it).
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<int8_t> tiled;  // q with the rows of each tile interleaved, see tile_rows
  std::vector<float> scale8;
  std::vector<float> scale;
  std::vector<float> sums;
  std::vector<int32_t> code_sums;  // each block's sum of q
  int64_t padded = 0, blocks = 0;
};

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t k) {
  QuantizedRows out;
  out.padded = (k + 63) / 64 * 64;
  out.blocks = out.padded / kBlock;
  out.q.assign(rows * out.padded, 0);
  out.scale8.assign(rows * out.blocks * 8, 0.f);
  out.scale.assign(rows * out.blocks, 0.f);
  out.sums.assign(rows * out.blocks, 0.f);
  out.code_sums.assign(rows * out.blocks, 0);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    for (int64_t b = 0; b * kBlock < k; ++b) {
      int64_t start = b * kBlock, end = std::min<int64_t>(start + kBlock, k);
      int8_t* qr = out.q.data() + r * out.padded;
      if (end - start == kBlock) {  // a whole block in 8 lanes: the same d and codes as below, the sum in another order
        __m256 v[4], amax8 = _mm256_setzero_ps(), sum8 = _mm256_setzero_ps();
        for (int j = 0; j < 4; ++j) {
          v[j] = _mm256_loadu_ps(xr + start + 8 * j);
          amax8 = _mm256_max_ps(amax8, _mm256_and_ps(v[j], magnitude));
          sum8 = _mm256_add_ps(sum8, v[j]);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        __m256i q32[4];  // x * inv rounded to nearest even (the default rounding, as nearbyint), within +-127
        for (int j = 0; j < 4; ++j) q32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));
        __m256i q16 = _mm256_packs_epi32(q32[0], q32[1]), q16b = _mm256_packs_epi32(q32[2], q32[3]);
        __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16b),  // packs work per 128-bit lane
                                                 _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + start), q8);
        out.scale[r * out.blocks + b] = d;
        out.sums[r * out.blocks + b] = hsum256(sum8);
        __m256i qsum = _mm256_add_epi32(_mm256_add_epi32(q32[0], q32[1]), _mm256_add_epi32(q32[2], q32[3]));
        __m128i qsum4 = _mm_add_epi32(_mm256_castsi256_si128(qsum), _mm256_extracti128_si256(qsum, 1));
        qsum4 = _mm_hadd_epi32(qsum4, qsum4);
        out.code_sums[r * out.blocks + b] = _mm_cvtsi128_si32(_mm_hadd_epi32(qsum4, qsum4));
        for (int j = 0; j < 8; ++j) out.scale8[(r * out.blocks + b) * 8 + j] = d;
        continue;
      }
      float amax = 0.f, sum = 0.f;
      for (int64_t i = start; i < end; ++i) {
        amax = std::max(amax, std::fabs(xr[i]));
        sum += xr[i];
      }
      float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t code_sum = 0;
      for (int64_t i = start; i < end; ++i) code_sum += qr[i] = static_cast<int8_t>(std::nearbyint(xr[i] * inv));
      out.code_sums[r * out.blocks + b] = code_sum;
      out.scale[r * out.blocks + b] = d;
      out.sums[r * out.blocks + b] = sum;
      for (int j = 0; j < 8; ++j) out.scale8[(r * out.blocks + b) * 8 + j] = d;
    }
  }
  return out;
}

// The AVX512 kernels take rows in tiles of up to kRowTile and read a run of 4 codes of every row of the tile for each
// step along the input: with the tile's rows interleaved run by run ([runs][rows in tile][4], tile after tile,
// each tile where its first row starts in q), the runs of one step lie at fixed offsets from one pointer, where
// rows apart need an address computed per row and step (two instructions per product in the 8-row kernels).
constexpr int kRowTile = 8;  // rows per tile of the AVX512 int8/int4 kernels

void tile_rows(QuantizedRows& a, int64_t rows) {
  a.tiled.resize(a.q.size());
  const int64_t runs = a.padded / 4;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowTile) {
    const int64_t in_tile = std::min<int64_t>(kRowTile, rows - r0);
    const int8_t* src = a.q.data() + r0 * a.padded;
    int8_t* dst = a.tiled.data() + r0 * a.padded;
    int64_t u = 0;
    static_assert(kRowTile == 8, "the transpose below is 8 x 8");
    if (in_tile == 8)  // 8 runs of the 8 rows at a time: an 8 x 8 transpose of 4-byte runs in registers
      for (; u + 8 <= runs; u += 8) {
        __m256i t[8], m[8];
        for (int r = 0; r < 8; ++r)
          t[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * a.padded + u * 4));
        for (int r = 0; r < 8; r += 2) {
          m[r] = _mm256_unpacklo_epi32(t[r], t[r + 1]);
          m[r + 1] = _mm256_unpackhi_epi32(t[r], t[r + 1]);
        }
        for (int r = 0; r < 8; r += 4)
          for (int j = 0; j < 2; ++j) {
            t[r + j] = _mm256_unpacklo_epi64(m[r + j], m[r + 2 + j]);
            t[r + 2 + j] = _mm256_unpackhi_epi64(m[r + j], m[r + 2 + j]);
          }
        // t[0..3] hold runs (0, 4), (2, 6), (1, 5), (3, 7) of rows 0-3 in their two halves; t[4..7] those of rows 4-7
        const int order[4] = {0, 2, 1, 3};
        for (int j = 0; j < 4; ++j) {
          __m256i low = _mm256_permute2x128_si256(t[order[j]], t[4 + order[j]], 0x20);
          __m256i high = _mm256_permute2x128_si256(t[order[j]], t[4 + order[j]], 0x31);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (u + j) * 32), low);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (u + 4 + j) * 32), high);
        }
      }
    for (; u < runs; ++u)
      for (int64_t r = 0; r < in_tile; ++r) std::memcpy(dst + (u * in_tile + r) * 4, src + r * a.padded + u * 4, 4);
  }
}

// What flipping the int8 weights' top bit adds per row: sum over blocks of d_x * 128 * sum(q_x).
std::vector<float> flip_offsets(const QuantizedRows& a, int64_t rows) {
  std::vector<float> offset(rows, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < a.blocks; ++b)
      offset[r] += 128.f * a.code_sums[r * a.blocks + b] * a.scale[r * a.blocks + b];
  return offset;
}

// Every kernel below computes output channels [n0, n1) for all rows; `y` is [rows, n] row-major.
struct Problem {
  int64_t rows, k, n;
  float* y;
  const float* bias;  // nullptr: none
};

// The lines of [from, from + bytes) into L1 (_MM_HINT_T0) or L2 (_MM_HINT_T1) ahead of their use.
template <int Hint = _MM_HINT_T0>
inline void prefetch_bytes(const void* from, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(static_cast<const char*>(from) + i, static_cast<_mm_hint>(Hint));
}

// A KV cache's keys or values for the decoding attention: [batch, heads, length, dim], each row contiguous.
struct CacheView {
  const void* data;
  bool bf16;
  int64_t batch_stride, head_stride, length, dim;

  template <typename T>
  const T* row(int64_t b, int64_t h, int64_t l) const {
    return static_cast<const T*>(data) + b * batch_stride + h * head_stride + l * dim;
  }

  // The first row of the head that comes `index`-th in [batch, heads] order.
  const char* head(int64_t index, int64_t heads) const {
    const int64_t at = index / heads * batch_stride + index % heads * head_stride;
    return static_cast<const char*>(data) + at * (bf16 ? 2 : 4);
  }
};

inline void store(const Problem& p, int64_t r, int64_t n, float v) {
  p.y[r * p.n + n] = v + (p.bias ? p.bias[n] : 0.f);
}

template <int V>
using Int = std::integral_constant<int, V>;

// The tiling shared by every kernel: `body(NW, R, n, r0)` multiplies weight rows n..n+NW-1 with activation rows
// r0..r0+R-1, all accumulators in registers. Each weight vector loaded serves R activation rows and each activation
// vector NW weight rows, so a batch costs little more than one row (the weights are read from memory once, the
// activations from L1). Weight rows come in groups of NW (the last few one by one), activation rows in tiles of RT
// (then 3, 2 or 1); from 3 rows on, groups win (up to 2x at 16). One or two activation rows stream either one weight
// row at a time or NF at once (`few_rows_many_streams`, for 4-byte and for 2-byte weights). Which reads faster
// differs between machines whose CPUs have the same flags, and between the weights' types: on the 2-core EPYC the
// kernels were first tuned on, one fp32 row at a time was up to 1.4x faster than four; on a 2-core Zen 4 EPYC eight
// fp32 rows at once read 1.03-1.08x faster than one, and one bf16 row 1.04-1.08x faster than eight. Each machine
// measures it once (native.py).
bool few_rows_many_streams[2] = {false, false};  // [weights of 4 bytes (and int8's last channels), of 2 bytes]

template <typename W, int NW, int RT, int NF = NW, typename Body>
inline void over_tiles(int64_t rows, int64_t n0, int64_t n1, Body&& body) {
  auto group = [&](auto nw, int64_t n) {
    int64_t r0 = 0;
    for (; r0 + RT <= rows; r0 += RT) body(nw, Int<RT>(), n, r0);
    switch (rows - r0) {
      case 3: if constexpr (RT > 3) body(nw, Int<3>(), n, r0); break;
      case 2: if constexpr (RT > 2) body(nw, Int<2>(), n, r0); break;
      case 1: body(nw, Int<1>(), n, r0); break;
      default: break;
    }
  };
  int64_t n = n0;
  if (rows > 2)
    for (; n + NW <= n1; n += NW) group(Int<NW>(), n);
  else if (few_rows_many_streams[sizeof(W) == 2])
    for (; n + NF <= n1; n += NF) {
      if (rows == 2) body(Int<NF>(), Int<2>(), n, int64_t{0});
      else body(Int<NF>(), Int<1>(), n, int64_t{0});
    }
  for (; n < n1; ++n) group(Int<1>(), n);
}

// ---------------------------------------------------------------------------------------------------------- AVX2
// 16 vector registers: groups of 4 weight rows with tiles of 2 activation rows (8 sums, 4 weights, 1 activation).
constexpr int kWeightsAvx2 = 4, kRowsAvx2 = 2;

// Floating-point weights (fp32 or bf16) against fp32 activations. LoadW(ptr) gives 8 weights as fp32.
template <int NW, int R, typename W, typename LoadW>
void float_tile_avx2(const Problem& p, const float* x, const W* w, int64_t n, int64_t r0, LoadW load) {
  __m256 acc[NW][R];
  for (int j = 0; j < NW; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= p.k; i += 8) {
    __m256 wv[NW];
    for (int j = 0; j < NW; ++j) wv[j] = load(w + (n + j) * p.k + i);
    for (int r = 0; r < R; ++r) {
      __m256 xv = _mm256_loadu_ps(x + (r0 + r) * p.k + i);
      for (int j = 0; j < NW; ++j) acc[j][r] = _mm256_fmadd_ps(wv[j], xv, acc[j][r]);
    }
  }
  for (int j = 0; j < NW; ++j)
    for (int r = 0; r < R; ++r) {
      float s = hsum256(acc[j][r]);
      for (int64_t t = i; t < p.k; ++t) s += to_float(w[(n + j) * p.k + t]) * x[(r0 + r) * p.k + t];
      store(p, r0 + r, n + j, s);
    }
}

void f32_avx2(const Problem& p, const float* x, const float* w, int64_t n0, int64_t n1) {
  over_tiles<float, kWeightsAvx2, kRowsAvx2>(p.rows, n0, n1, [&](auto nw, auto r, int64_t n, int64_t r0) {
    float_tile_avx2<nw, r>(p, x, w, n, r0, [](const float* v) { return _mm256_loadu_ps(v); });
  });
}

inline __m256 bf16x8_avx2(const uint16_t* v) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

void bf16_avx2(const Problem& p, const float* x, const uint16_t* w, int64_t n0, int64_t n1) {
  over_tiles<uint16_t, kWeightsAvx2, kRowsAvx2>(p.rows, n0, n1, [&](auto nw, auto r, int64_t n, int64_t r0) {
    float_tile_avx2<nw, r>(p, x, w, n, r0, bf16x8_avx2);
  });
}

// Signed int8 x signed int8 in 32 lanes -> 8 int32 sums of 4 products. maddubs takes unsigned x signed, so the
// sign of the activation moves onto the weight (|x| * (w * sign x)); a pair of products stays below 2 * 127 * 127,
// inside int16, because both sides are limited to +-127.
inline __m256i dot_i8_avx2(__m256i w, __m256i x) {
  __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// The last, partial block of an int8 row (inputs not a multiple of 32), exact in int32.
inline float int8_tail(const QuantizedRows& a, const int8_t* wr, int64_t row, int64_t k) {
  const int64_t whole = k / kBlock;
  int32_t t = 0;
  for (int64_t i = whole * kBlock; i < k; ++i) t += int32_t(wr[i]) * a.q[row * a.padded + i];
  return float(t) * a.scale[row * a.blocks + whole];
}

// int8 weights, one scale per output channel: y = scale[n] * sum_blocks d_x * (q_x . q_w).
template <int NW, int R>
void i8_tile_avx2(const Problem& p, const QuantizedRows& a, const int8_t* w, const float* wscale, int64_t n,
                  int64_t r0) {
  const int64_t whole = p.k / kBlock;
  __m256 acc[NW][R];
  for (int j = 0; j < NW; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < whole; ++b) {
    __m256i wv[NW];
    for (int j = 0; j < NW; ++j) wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n + j) * p.k + b * kBlock));
    for (int r = 0; r < R; ++r) {
      const int64_t row = r0 + r;
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + row * a.padded + b * kBlock));
      __m256 d = _mm256_set1_ps(a.scale[row * a.blocks + b]);
      for (int j = 0; j < NW; ++j) acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8_avx2(wv[j], xv)), d, acc[j][r]);
    }
  }
  for (int j = 0; j < NW; ++j)
    for (int r = 0; r < R; ++r) {
      float s = hsum256(acc[j][r]) + (whole * kBlock < p.k ? int8_tail(a, w + (n + j) * p.k, r0 + r, p.k) : 0.f);
      store(p, r0 + r, n + j, s * wscale[n + j]);
    }
}

void i8_avx2(const Problem& p, const QuantizedRows& a, const int8_t* w, const float* wscale, int64_t n0, int64_t n1) {
  over_tiles<int8_t, kWeightsAvx2, kRowsAvx2>(p.rows, n0, n1, [&](auto nw, auto r, int64_t n, int64_t r0) {
    i8_tile_avx2<nw, r>(p, a, w, wscale, n, r0);
  });
}

// int4 weights in groups of 16 output channels, interleaved so that a vector holds the 16 channels side by side
// (one lane or half-lane each) and a channel group streams as one run of memory: per group and run of 8 inputs, 64
// bytes, 4 per channel, byte t of channel c holding input t in its low nibble and input 4 + t in its high nibble.
// w = q * scale + minimum per block of 32 inputs, q in 0..15; a block's scale and minimum are 8-bit codes ([group,
// block, 16 channels]) times a bf16 step shared by a superblock of 8 blocks (256 inputs; [group, superblock, scale
// step / minimum step, 16 channels]): 4.625 bits per weight in all. Then x . w = sum_blocks scale * d_x * (q_x . q)
// + minimum * sum(x), each block's integer dot products done with the activations broadcast from memory, four at a
// time, and no horizontal sum anywhere.
constexpr int kGroup = 16, kSuper = 8;
constexpr int64_t kInt4Ahead = 8192;  // software prefetch distance in the codes: one thread reads 1.3x faster from
                                      // memory with it (4-16 KB measured alike), 8 rows 2x

struct Int4Weights {
  const uint8_t* q;        // [groups, k / 8, 16, 4]
  const uint8_t* scales;   // [groups, blocks, 16]
  const int8_t* mins;      // [groups, blocks, 16]
  const uint16_t* steps;   // bf16 [groups, superblocks, 2, 16]
  int64_t k, blocks, superblocks;

  const uint8_t* group_q(int64_t g) const { return q + g * kGroup * k / 2; }
  int64_t block_at(int64_t g, int64_t b) const { return (g * blocks + b) * kGroup; }
  const uint16_t* group_steps(int64_t g, int64_t sb) const { return steps + (g * superblocks + sb) * 2 * kGroup; }
};

inline int32_t four_bytes(const int8_t* v) {
  int32_t t;
  std::memcpy(&t, v, 4);
  return t;
}

// The 16 sums of channel group g for activation rows r0..r0+R-1, added to bias and stored. AVX2 has no byte dot
// product into int32: maddubs gives int16 sums of two products (at most 2 * 15 * 127) which add up in int16 over a
// block (16 of them at most: 30,480 < 32,767) before one madd widens them. Two halves of 8 channels.
template <int R>
void i4_group_avx2(const Problem& p, const QuantizedRows& a, const Int4Weights& w, int64_t g, int64_t r0) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* qg = w.group_q(g);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b) {
    __m256i sums[R][2];
    for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
    for (int64_t s = 4 * b; s < 4 * b + 4; ++s) {
      __m256i lo[2], hi[2];
      _mm_prefetch(reinterpret_cast<const char*>(qg + s * 64 + kInt4Ahead), _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {
        __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qg + s * 64 + h * 32));
        lo[h] = _mm256_and_si256(packed, low);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* xr = a.q.data() + (r0 + r) * a.padded + s * 8;
        __m256i xa = _mm256_set1_epi32(four_bytes(xr)), xb = _mm256_set1_epi32(four_bytes(xr + 4));
        for (int h = 0; h < 2; ++h)
          sums[r][h] = _mm256_add_epi16(sums[r][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xa),
                                                                     _mm256_maddubs_epi16(hi[h], xb)));
      }
    }
    const uint16_t* st = w.group_steps(g, b / kSuper);
    for (int h = 0; h < 2; ++h) {
      const int64_t at = w.block_at(g, b) + 8 * h;
      __m256 scale = _mm256_mul_ps(
          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.scales + at)))),
          bf16x8_avx2(st + 8 * h));
      __m256 minimum = _mm256_mul_ps(
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.mins + at)))),
          bf16x8_avx2(st + kGroup + 8 * h));
      for (int r = 0; r < R; ++r) {
        const int64_t row = (r0 + r) * a.blocks + b;
        __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[r][h], ones));
        acc[r][h] = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_set1_ps(a.scale[row])), acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(minimum, _mm256_set1_ps(a.sums[row]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      __m256 v = acc[r][h];
      if (p.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(p.bias + g * kGroup + 8 * h));
      _mm256_storeu_ps(p.y + (r0 + r) * p.n + g * kGroup + 8 * h, v);
    }
}

// Every row for channel groups [g0, g1), in tiles of RT rows and one tile of the rest: `group(R, g, r0)`.
template <int RT, typename Group>
inline void over_row_tiles(int64_t rows, int64_t g0, int64_t g1, Group&& group) {
  for (int64_t g = g0; g < g1; ++g) {
    int64_t r0 = 0;
    for (; r0 + RT <= rows; r0 += RT) group(Int<RT>(), g, r0);
    switch (rows - r0) {
      case 7: if constexpr (RT > 7) group(Int<7>(), g, r0); break;
      case 6: if constexpr (RT > 6) group(Int<6>(), g, r0); break;
      case 5: if constexpr (RT > 5) group(Int<5>(), g, r0); break;
      case 4: if constexpr (RT > 4) group(Int<4>(), g, r0); break;
      case 3: if constexpr (RT > 3) group(Int<3>(), g, r0); break;
      case 2: if constexpr (RT > 2) group(Int<2>(), g, r0); break;
      case 1: if constexpr (RT > 1) group(Int<1>(), g, r0); break;
      default: break;
    }
  }
}

void i4_avx2(const Problem& p, const QuantizedRows& a, const Int4Weights& w, int64_t g0, int64_t g1) {
  over_row_tiles<2>(p.rows, g0, g1, [&](auto r, int64_t g, int64_t r0) { i4_group_avx2<r>(p, a, w, g, r0); });
}

// int8 weights in groups of 16 output channels side by side (Int8Linear's layout on the kernels; the out % 16 last
// channels stay one row each, for the tiles above): per group and run of 4 inputs, 64 bytes, 4 per channel. Each
// run's 4 activations are broadcast from memory and multiplied with all 16 channels at once; a block's int32 sums
// take its activation scale in fp32, and the channel scales multiply the output: no horizontal sums.
constexpr int64_t kInt8Ahead = 4096;  // software prefetch distance in the weights (as kInt4Ahead)
// From 3 activation rows on, the AVX512 kernel also fetches the weights into L2 64 KB ahead: it computes about half
// the time there, and a core keeps too few lines in flight from L1's prefetches alone to read at the memory's speed
// meanwhile (8 rows, 8 matrices of 8192 x 2048, in turns in one process: 23.9-25.6 -> 35.2-36.5 GB/s, a batch-8
// step 1.20x; 4 rows and 128-row prompts unchanged; one or two rows no faster, int4's compute-bound 8 rows slower).
constexpr int64_t kInt8AheadL2 = 64 << 10;

// AVX2: the sign of the activation moves onto the weight (see dot_i8_avx2), two halves of 8 channels.
template <int R>
void i8_group_avx2(const Problem& p, const QuantizedRows& a, const int8_t* w, const float* wscale, int64_t g,
                   int64_t r0) {
  const int8_t* wg = w + g * kGroup * p.k;
  const int64_t runs = p.k / 4;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b * 8 < runs; ++b) {
    __m256i sums[R][2];
    for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_si256();
    for (int64_t s = 8 * b; s < std::min<int64_t>(8 * b + 8, runs); ++s) {
      _mm_prefetch(reinterpret_cast<const char*>(wg + s * 64 + kInt8Ahead), _MM_HINT_T0);
      __m256i wv[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + s * 64)),
                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + s * 64 + 32))};
      for (int r = 0; r < R; ++r) {
        __m256i xv = _mm256_set1_epi32(four_bytes(a.q.data() + (r0 + r) * a.padded + 4 * s));
        __m256i magnitude = _mm256_sign_epi8(xv, xv);
        for (int h = 0; h < 2; ++h)
          sums[r][h] = _mm256_add_epi32(
              sums[r][h], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(wv[h], xv)), ones));
      }
    }
    for (int r = 0; r < R; ++r) {
      __m256 d = _mm256_set1_ps(a.scale[(r0 + r) * a.blocks + b]);
      for (int h = 0; h < 2; ++h) acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][h]), d, acc[r][h]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      const int64_t n = g * kGroup + 8 * h;
      __m256 v = _mm256_mul_ps(acc[r][h], _mm256_loadu_ps(wscale + n));
      if (p.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(p.bias + n));
      _mm256_storeu_ps(p.y + (r0 + r) * p.n + n, v);
    }
}

void i8_groups_avx2(const Problem& p, const QuantizedRows& a, const int8_t* w, const float* wscale, int64_t g0,
                    int64_t g1) {
  over_row_tiles<2>(p.rows, g0, g1, [&](auto r, int64_t g, int64_t r0) { i8_group_avx2<r>(p, a, w, wscale, g, r0); });
}

}  // namespace

// -------------------------------------------------------------------------------------------------------- AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")
namespace {

// sum += unsigned bytes u times 4 signed bytes at x broadcast to every lane, with the broadcast inside the
// instruction ({1to16}): GCC issues a separate broadcast for _mm512_set1_epi32, one more instruction per product in
// kernels bound by instructions at 8 rows.
typedef int32_t __attribute__((may_alias, aligned(1))) UnalignedInt32;
inline __m512i dpbusd_broadcast(__m512i sum, __m512i u, const int8_t* x) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(sum) : "v"(u), "m"(*reinterpret_cast<const UnalignedInt32*>(x)));
  return sum;
}

// 32 vector registers: groups of 4 weight rows with tiles of 4 activation rows (16 sums, 4 weights, 1 activation);
// one or two activation rows with several streams: 8 weight rows (at most 16 sums, 8 weights, 1 activation).
constexpr int kWeightsAvx512 = 4, kRowsAvx512 = 4, kFewRowsAvx512 = 8;

template <int NW, int R, typename W, typename LoadW>
void float_tile_avx512(const Problem& p, const float* x, const W* w, int64_t n, int64_t r0, LoadW load) {
  // One or two sums: U of them per sum, over alternate vectors, so that four loads and multiply-adds are in flight
  constexpr int U = NW * R <= 2 ? 4 : 1;
  __m512 acc[U][NW][R];
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < NW; ++j)
      for (int r = 0; r < R; ++r) acc[u][j][r] = _mm512_setzero_ps();
  int64_t i = 0;
  auto step = [&](int u, int64_t at) {
    __m512 wv[NW];
    for (int j = 0; j < NW; ++j) wv[j] = load(w + (n + j) * p.k + at);
    for (int r = 0; r < R; ++r) {
      __m512 xv = _mm512_loadu_ps(x + (r0 + r) * p.k + at);
      for (int j = 0; j < NW; ++j) acc[u][j][r] = _mm512_fmadd_ps(wv[j], xv, acc[u][j][r]);
    }
  };
  for (; i + 16 * U <= p.k; i += 16 * U)
    for (int u = 0; u < U; ++u) step(u, i + 16 * u);
  for (; i + 16 <= p.k; i += 16) step(0, i);
  for (int j = 0; j < NW; ++j)
    for (int r = 0; r < R; ++r) {
      for (int u = 1; u < U; ++u) acc[0][j][r] = _mm512_add_ps(acc[0][j][r], acc[u][j][r]);
      float s = _mm512_reduce_add_ps(acc[0][j][r]);
      for (int64_t t = i; t < p.k; ++t) s += to_float(w[(n + j) * p.k + t]) * x[(r0 + r) * p.k + t];
      store(p, r0 + r, n + j, s);
    }
}

void f32_avx512(const Problem& p, const float* x, const float* w, int64_t n0, int64_t n1) {
  over_tiles<float, kWeightsAvx512, kRowsAvx512, kFewRowsAvx512>(
      p.rows, n0, n1, [&](auto nw, auto r, auto n, auto r0) {
        float_tile_avx512<nw, r>(p, x, w, n, r0, [](const float* v) { return _mm512_loadu_ps(v); });
      });
}

inline __m512 bf16x16_avx512(const uint16_t* v) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

void bf16_avx512(const Problem& p, const float* x, const uint16_t* w, int64_t n0, int64_t n1) {
  over_tiles<uint16_t, kWeightsAvx512, kRowsAvx512, kFewRowsAvx512>(
      p.rows, n0, n1, [&](auto nw, auto r, auto n, auto r0) {
        float_tile_avx512<nw, r>(p, x, w, n, r0, bf16x16_avx512);
      });
}

// bf16 weights against bf16 activations with AVX512-BF16: one instruction multiplies 32 pairs and adds them in
// pairs into 16 fp32 sums. The products of two bf16 numbers are exact in fp32, so this is the fp32 product of the
// bf16 activations (a bf16 model's activations are bf16 already), in another summation order.
template <int NW, int R>
void bf16_dot_tile(const Problem& p, const uint16_t* x, const uint16_t* w, int64_t n, int64_t r0) {
  // One or two sums: U of them per sum, over alternate vectors. One row of bf16 weights streams from memory faster
  // with two than with four (a decoding step's products 1.05-1.18x, 2 threads, Zen 4; as fast as a loop that only
  // loads); fp32 weights read the same either way.
  constexpr int U = NW * R <= 2 ? 2 : 1;
  __m512 acc[U][NW][R];
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < NW; ++j)
      for (int r = 0; r < R; ++r) acc[u][j][r] = _mm512_setzero_ps();
  int64_t i = 0;
  auto step = [&](int u, int64_t at) {
    __m512bh wv[NW];
    for (int j = 0; j < NW; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + (n + j) * p.k + at);
    for (int r = 0; r < R; ++r) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (r0 + r) * p.k + at);
      for (int j = 0; j < NW; ++j) acc[u][j][r] = _mm512_dpbf16_ps(acc[u][j][r], wv[j], xv);
    }
  };
  for (; i + 32 * U <= p.k; i += 32 * U)
    for (int u = 0; u < U; ++u) step(u, i + 32 * u);
  for (; i + 32 <= p.k; i += 32) step(0, i);
  for (int j = 0; j < NW; ++j)
    for (int r = 0; r < R; ++r) {
      for (int u = 1; u < U; ++u) acc[0][j][r] = _mm512_add_ps(acc[0][j][r], acc[u][j][r]);
      float s = _mm512_reduce_add_ps(acc[0][j][r]);
      for (int64_t t = i; t < p.k; ++t) s += bf16_to_float(w[(n + j) * p.k + t]) * bf16_to_float(x[(r0 + r) * p.k + t]);
      store(p, r0 + r, n + j, s);
    }
}

void bf16_dot_avx512(const Problem& p, const uint16_t* x, const uint16_t* w, int64_t n0, int64_t n1) {
  over_tiles<uint16_t, kWeightsAvx512, kRowsAvx512, kFewRowsAvx512>(
      p.rows, n0, n1, [&](auto nw, auto r, auto n, auto r0) {
        bf16_dot_tile<nw, r>(p, x, w, n, r0);
      });
}

// From kLanesFromRows rows on, a batch is multiplied the other way round: the lanes of a vector hold the activation
// rows side by side, and each weight is broadcast from memory into a multiply-add with every row at once. A block
// of 16 output channels keeps its 16 sums in registers over the whole input, so each weight is read once per group
// of rows and no horizontal sum is needed per product. A group has 8 rows (the last may have empty lanes) with two
// lanes each: a row's lanes hold 2 consecutive inputs (fp32) or 2 pairs (bf16, for vdpbf16ps), and the broadcast
// repeats 2 consecutive weights or pairs (64 bits). `xg` holds a group's rows in that order, [k / C][8][C] for C = 2
// or 4 inputs per row and vector; the last k % C inputs are summed from x itself. Measured against the other ways
// (one thread): groups of 4 rows (a 128-bit broadcast) were slower than 8 with empty lanes, and groups of 16 rows
// (one input per lane, a 32-bit broadcast) slower than two groups of 8 in turn over each block, the second reading
// the block's weights from L2 (16 rows: fp32 24-28 -> 34 GMAC/s, bf16 47-53 -> 79-81).
//
// A visit of a weight row takes one whole cache line (8 broadcasts of 8 bytes). The 16 rows of a block lie a power
// of two apart in every phi shape, so their lines fall in the same set of L1's 8 ways: a line read in two visits was
// evicted by the other rows' between them, and lines prefetched into L1 evicted each other the same way. So the
// software prefetch goes to L2 only, kLanesAhead weights ahead (blocks of 256 KB and less: a later block, see
// lane_block). 8 rows, weights in L2 or L3: fp32 25-28 -> 33-36 GMAC/s, bf16 47-51 -> 72-82 against 4 broadcasts
// per visit and L1 prefetch (with the sums in registers: GCC kept them in memory until told to unroll the loop over
// the block's rows).
constexpr int kLanes = 16, kGroupRows = 8;
constexpr int64_t kLanesAhead = 256;

inline __m512 broadcast_f32(const float* w) {  // 2 consecutive weights, repeated 8 times
  double two;
  std::memcpy(&two, w, 8);
  return _mm512_castpd_ps(_mm512_set1_pd(two));
}

inline __m512bh broadcast_bf16(const uint16_t* w) {  // 2 pairs of consecutive bf16 weights, repeated 8 times
  long long two_pairs;
  std::memcpy(&two_pairs, w, 8);
  return (__m512bh)_mm512_set1_epi64(two_pairs);
}

// One block of 16 output channels from n for the group of rows from r0: `step(acc, xg_at, w_at)` adds one vector of
// inputs (C of each row), U of them per visit of a weight row; the inputs past the last whole vector are summed
// from x [rows, k] itself.
template <int C, typename T, typename Step>
inline void lane_block(const Problem& p, const T* x, const T* xg, const T* w, int64_t n, int64_t r0, Step step) {
  constexpr int U = 64 / (C * sizeof(T));  // vectors per cache line of a weight row
  const int64_t chunks = p.k / C;
  __m512 acc[kLanes];
#pragma GCC unroll 16
  for (int c = 0; c < kLanes; ++c) acc[c] = _mm512_setzero_ps();
  const int64_t block = kLanes * p.k, ahead = std::max<int64_t>(1, (128 << 10) / (block * int64_t(sizeof(T)))) * block;
  // The blocks of 16 rows follow each other in memory: where a block is at most 256 KB, each visit of a row also
  // fetches the next line, in memory order, of the block 128 KB ahead (the next at least) into L2, so that a block's
  // lines are there before its 16 streams start. 8 rows, 8 matrices in turns in one process: bf16 2048 and 8192
  // inputs 1.13x and 1.12x, fp32 2048 inputs 1.17x, 3 rows 1.24x, 16 rows 1.03x; a batch-8 decoding step bf16
  // 1.10x, fp32 1.08x. fp32 rows of 8192 (512 KB blocks) read 0.91-0.94x that way: they fetch each row ahead.
  const bool near = block * int64_t(sizeof(T)) <= (256 << 10);
  const char* later = reinterpret_cast<const char*>(w + n * p.k + ahead);
  int64_t s = 0;
  for (; s + U <= chunks; s += U) {
    const T* ws = w + n * p.k + s * C;
#pragma GCC unroll 16
    for (int c = 0; c < kLanes; ++c) {
      const T* wc = ws + c * p.k;
      if (near) _mm_prefetch(later + (s / U * kLanes + c) * 64, _MM_HINT_T1);
      else _mm_prefetch(reinterpret_cast<const char*>(wc + kLanesAhead), _MM_HINT_T1);
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) step(acc[c], xg + (s + u) * kGroupRows * C, wc + u * C);
    }
  }
  for (; s < chunks; ++s)
#pragma GCC unroll 16
    for (int c = 0; c < kLanes; ++c) step(acc[c], xg + s * kGroupRows * C, w + (n + c) * p.k + s * C);
  alignas(64) float sums[kLanes][kLanes];
#pragma GCC unroll 16
  for (int c = 0; c < kLanes; ++c) _mm512_store_ps(sums[c], acc[c]);
  const int64_t rows = std::min<int64_t>(kGroupRows, p.rows - r0);
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < kLanes; ++c) {
      float v = sums[c][2 * r] + sums[c][2 * r + 1];
      for (int64_t i = chunks * C; i < p.k; ++i) v += to_float(w[(n + c) * p.k + i]) * to_float(x[(r0 + r) * p.k + i]);
      store(p, r0 + r, n + c, v);
    }
}

void f32_lanes_avx512(const Problem& p, const float* x, const float* xg, const float* w, int64_t n, int64_t r0) {
  lane_block<2>(p, x, xg, w, n, r0, [](__m512& acc, const float* xv, const float* wv) {
    acc = _mm512_fmadd_ps(broadcast_f32(wv), _mm512_load_ps(xv), acc);
  });
}

void bf16_lanes_avx512(const Problem& p, const uint16_t* x, const uint16_t* xg, const uint16_t* w, int64_t n,
                       int64_t r0) {
  lane_block<4>(p, x, xg, w, n, r0, [](__m512& acc, const uint16_t* xv, const uint16_t* wv) {
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_load_si512(xv), broadcast_bf16(wv));
  });
}

// As i8_group_avx2, with VNNI, which multiplies unsigned x signed bytes straight into int32 lanes: the weights are
// made unsigned by flipping their top bit (w + 128, once per 64 weights, shared by all rows), and the extra
// 128 * sum(q_x) per block, which does not depend on the weight, is taken off once per row (`offset`, flip_offsets).
// One or two rows alternate two sums per block.
template <int R>
void i8_group_avx512(const Problem& p, const QuantizedRows& a, const int8_t* w, const float* wscale,
                     const float* offset, int64_t g, int64_t r0) {
  constexpr int U = R <= 2 ? 2 : 1;
  const int8_t* wg = w + g * kGroup * p.k;
  const int8_t* xt = a.tiled.data() + r0 * a.padded;
  const int64_t runs = p.k / 4;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b * 8 < runs; ++b) {
    __m512i sums[U][R];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r) sums[u][r] = _mm512_setzero_si512();
    for (int64_t s = 8 * b; s < std::min<int64_t>(8 * b + 8, runs); ++s) {
      _mm_prefetch(reinterpret_cast<const char*>(wg + s * 64 + kInt8Ahead), _MM_HINT_T0);
      if constexpr (R > 2) _mm_prefetch(reinterpret_cast<const char*>(wg + s * 64 + kInt8AheadL2), _MM_HINT_T1);
      __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(wg + s * 64), flip);
      const int8_t* xs = xt + s * R * 4;  // run s of the tile's rows (tile_rows)
      for (int r = 0; r < R; ++r) {
        __m512i& sum = sums[s % U][r];
        sum = dpbusd_broadcast(sum, wv, xs + 4 * r);
      }
    }
    for (int r = 0; r < R; ++r) {
      if constexpr (U == 2) sums[0][r] = _mm512_add_epi32(sums[0][r], sums[1][r]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[0][r]), _mm512_set1_ps(a.scale[(r0 + r) * a.blocks + b]), acc[r]);
    }
  }
  const int64_t n = g * kGroup;
  for (int r = 0; r < R; ++r) {
    __m512 v = _mm512_mul_ps(_mm512_sub_ps(acc[r], _mm512_set1_ps(offset[r0 + r])), _mm512_loadu_ps(wscale + n));
    if (p.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(p.bias + n));
    _mm512_storeu_ps(p.y + (r0 + r) * p.n + n, v);
  }
}

void i8_groups_avx512(const Problem& p, const QuantizedRows& a, const int8_t* w, const float* wscale,
                      const float* offset, int64_t g0, int64_t g1) {
  over_row_tiles<kRowTile>(p.rows, g0, g1, [&](auto r, int64_t g, int64_t r0) {
    i8_group_avx512<r>(p, a, w, wscale, offset, g, r0);
  });
}

// As i4_group_avx2, with VNNI: 16 channels in the 16 lanes, each int32 lane taking 4 products per instruction.
// One or two rows keep the low and high nibbles' sums apart (shorter dependency chains).
template <int R>
void i4_group_avx512(const Problem& p, const QuantizedRows& a, const Int4Weights& w, int64_t g, int64_t r0) {
  constexpr int U = R <= 2 ? 2 : 1;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* qg = w.group_q(g);
  const int8_t* xt = a.tiled.data() + r0 * a.padded;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.blocks; ++b) {
    __m512i sums[U][R];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r) sums[u][r] = _mm512_setzero_si512();
    for (int64_t s = 4 * b; s < 4 * b + 4; ++s) {
      _mm_prefetch(reinterpret_cast<const char*>(qg + s * 64 + kInt4Ahead), _MM_HINT_T0);
      __m512i packed = _mm512_loadu_si512(qg + s * 64);
      __m512i lo = _mm512_and_si512(packed, low), hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
      const int8_t* xs = xt + s * 2 * R * 4;  // runs 2s and 2s + 1 of the tile's rows (tile_rows)
      for (int r = 0; r < R; ++r) {
        sums[0][r] = dpbusd_broadcast(sums[0][r], lo, xs + 4 * r);
        sums[U - 1][r] = dpbusd_broadcast(sums[U - 1][r], hi, xs + 4 * (R + r));
      }
    }
    const uint16_t* st = w.group_steps(g, b / kSuper);
    const int64_t at = w.block_at(g, b);
    __m512 scale = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scales + at)))),
        bf16x16_avx512(st));
    __m512 minimum = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.mins + at)))),
        bf16x16_avx512(st + kGroup));
    for (int r = 0; r < R; ++r) {
      const int64_t row = (r0 + r) * a.blocks + b;
      if constexpr (U == 2) sums[0][r] = _mm512_add_epi32(sums[0][r], sums[1][r]);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[0][r]), _mm512_mul_ps(scale, _mm512_set1_ps(a.scale[row])),
                               acc[r]);
      acc[r] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(a.sums[row]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    __m512 v = p.bias ? _mm512_add_ps(acc[r], _mm512_loadu_ps(p.bias + g * kGroup)) : acc[r];
    _mm512_storeu_ps(p.y + (r0 + r) * p.n + g * kGroup, v);
  }
}

void i4_avx512(const Problem& p, const QuantizedRows& a, const Int4Weights& w, int64_t g0, int64_t g1) {
  over_row_tiles<kRowTile>(p.rows, g0, g1, [&](auto r, int64_t g, int64_t r0) { i4_group_avx512<r>(p, a, w, g, r0); });
}

// Decoding attention (see attention_scores below) with 16 lanes. A bf16 row is read 32 values at a time as 16
// pairs: shifting each 32-bit lane left by 16 gives the even values in fp32, masking off its low half the odd
// ones (no shuffle), so the query and the sums are split into even and odd values too. A row is V vectors, V known
// at compile time so that every sum stays in a register; the last vector is loaded masked (zeros past the row).
template <typename T>
constexpr int64_t kPerVector = std::is_same_v<T, float> ? 16 : 32;  // cache values per 512-bit load
constexpr int kMaxHeadVectors = 8;  // head_dim up to 128 (fp32 cache) or 256 (bf16); larger heads take AVX2

// The heads' rows are short runs of memory (160 rows of 128 bytes: 20 KB) far apart, too short for the hardware's
// prefetchers to get ahead, and between a head's keys and its values the softmax reads no memory at all. So the
// kernels read ahead by hand within a head (into L1), and each pass over a head fetches the run that comes next into
// L2 alongside, row for row: the keys' pass the same head's values, the values' pass the next head's keys (`next`,
// null for none). At 8 sequences a step's attention read the cache 1.1-1.4x faster so than with the next head's
// first 2 KB fetched at each head's start (24 layers cold, 2 threads, Zen 4: bf16 16.5 -> 20.0-22.8 GB/s, fp32
// 16.6-20.1 -> 19.1-22.7); the AVX2 kernels (scores_of_head, values_of_head) fetch `next` the same way (bf16 13.5-14.6
// -> 20.1-26.3 GB/s, fp32 19.7-23.2 -> 25.0-25.6).
constexpr int64_t kAttentionAhead = 2048;

// Row vectors of one head: vector c of a row as fp32, even and odd values (fp32 rows: all in `even`).
template <typename T, int V>
struct RowVectors {
  uint32_t last_mask;  // lanes (fp32) or values (bf16) of the last vector inside the row

  explicit RowVectors(int64_t dim) {
    const int64_t left = dim - (V - 1) * kPerVector<T>;
    last_mask = left >= 32 ? 0xFFFFFFFFu : (1u << left) - 1;
  }

  template <int C>
  inline void load(const T* row, __m512& even, __m512& odd) const {
    const T* at = row + C * kPerVector<T>;
    if constexpr (std::is_same_v<T, float>) {
      even = C + 1 < V ? _mm512_loadu_ps(at) : _mm512_maskz_loadu_ps(static_cast<__mmask16>(last_mask), at);
    } else {
      __m512i pairs = C + 1 < V ? _mm512_loadu_si512(at) : _mm512_maskz_loadu_epi16(last_mask, at);
      even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
    }
  }
};

template <int V, int C = 0, typename Fn>
inline void for_vectors(Fn&& fn) {  // fn(Int<0>()), ..., fn(Int<V - 1>())
  if constexpr (C < V) {
    fn(Int<C>());
    for_vectors<V, C + 1>(fn);
  }
}

template <typename T, int V>
void scores_of_head_avx512(const CacheView& k, int64_t b, int64_t h, const float* q, float scale, float* out,
                           const char* next) {
  const int64_t dim = k.dim;
  const RowVectors<T, V> rows(dim);
  __m512 qe[V], qo[V];  // the query split as the rows are read
  for (int c = 0; c < V; ++c) {
    alignas(64) float e[16] = {}, o[16] = {};
    for (int i = 0; i < 16; ++i) {
      const int64_t at = c * kPerVector<T> + (std::is_same_v<T, float> ? i : 2 * i);
      if (at < dim) e[i] = q[at];
      if (!std::is_same_v<T, float> && at + 1 < dim) o[i] = q[at + 1];
    }
    qe[c] = _mm512_load_ps(e);
    qo[c] = _mm512_load_ps(o);
  }
  auto dot = [&](const T* row) {  // a row's 16 lane sums, even and odd values in separate chains
    __m512 se = _mm512_setzero_ps(), so = _mm512_setzero_ps();
    for_vectors<V>([&](auto c) {
      __m512 e, o;
      rows.template load<c>(row, e, o);
      se = _mm512_fmadd_ps(e, qe[c], se);
      if constexpr (!std::is_same_v<T, float>) so = _mm512_fmadd_ps(o, qo[c], so);
    });
    return std::is_same_v<T, float> ? se : _mm512_add_ps(se, so);
  };
  auto half = [](__m512 v) {  // 16 lanes -> 8
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  };
  const T* row = k.row<T>(b, h, 0);
  const int64_t row_bytes = dim * sizeof(T), ahead = (kAttentionAhead + row_bytes - 1) / row_bytes;
  int64_t l = 0;
  for (; l + 4 <= k.length; l += 4, row += 4 * dim) {  // four keys reduced together by three horizontal adds
    if (l + ahead < k.length) prefetch_bytes(row + ahead * dim, 4 * row_bytes);
    if (next) prefetch_bytes<_MM_HINT_T1>(next + l * row_bytes, 4 * row_bytes);
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(half(dot(row)), half(dot(row + dim))),
                              _mm256_hadd_ps(half(dot(row + 2 * dim)), half(dot(row + 3 * dim))));
    _mm_storeu_ps(out + l, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)),
                                      _mm_set1_ps(scale)));
  }
  for (; l < k.length; ++l, row += dim) out[l] = _mm512_reduce_add_ps(dot(row)) * scale;
}

template <typename T, int V>
void values_of_head_avx512(const CacheView& v, int64_t b, int64_t h, const float* p, float* out, const char* next) {
  constexpr bool kPairs = !std::is_same_v<T, float>;
  const int64_t dim = v.dim;
  const RowVectors<T, V> rows(dim);
  // Two rows at a time into two sets of sums: a multiply-add's latency is not waited on per row.
  __m512 e0[V], o0[V], e1[V], o1[V];
  for (int c = 0; c < V; ++c) e0[c] = o0[c] = e1[c] = o1[c] = _mm512_setzero_ps();
  auto add_row = [&](const T* row, float weight_of_row, __m512* se, __m512* so) {
    const __m512 weight = _mm512_set1_ps(weight_of_row);
    for_vectors<V>([&](auto c) {
      __m512 e, o;
      rows.template load<c>(row, e, o);
      se[c] = _mm512_fmadd_ps(e, weight, se[c]);
      if constexpr (kPairs) so[c] = _mm512_fmadd_ps(o, weight, so[c]);
    });
  };
  const T* row = v.row<T>(b, h, 0);
  const int64_t row_bytes = dim * sizeof(T), ahead = (kAttentionAhead + row_bytes - 1) / row_bytes;
  int64_t l = 0;
  for (; l + 2 <= v.length; l += 2, row += 2 * dim) {
    if (l + ahead < v.length) prefetch_bytes(row + ahead * dim, 2 * row_bytes);
    if (next) prefetch_bytes<_MM_HINT_T1>(next + l * row_bytes, 2 * row_bytes);
    add_row(row, p[l], e0, o0);
    add_row(row + dim, p[l + 1], e1, o1);
  }
  if (l < v.length) add_row(row, p[l], e0, o0);
  for (int c = 0; c < V; ++c) {
    alignas(64) float e[16], o[16];
    _mm512_store_ps(e, _mm512_add_ps(e0[c], e1[c]));
    _mm512_store_ps(o, _mm512_add_ps(o0[c], o1[c]));
    for (int i = 0; i < 16; ++i) {
      const int64_t at = c * kPerVector<T> + (kPairs ? 2 * i : i);
      if (at < dim) out[at] = e[i];
      if (kPairs && at + 1 < dim) out[at + 1] = o[i];
    }
  }
}

// Calls fn(Int<V>()) for the head's vector count V, or returns false where it is past kMaxHeadVectors.
template <typename T, typename Fn>
bool with_head_vectors(int64_t dim, Fn&& fn) {
  static_assert(kMaxHeadVectors == 8, "one case per vector count");
  switch ((dim + kPerVector<T> - 1) / kPerVector<T>) {
    case 1: fn(Int<1>()); return true;
    case 2: fn(Int<2>()); return true;
    case 3: fn(Int<3>()); return true;
    case 4: fn(Int<4>()); return true;
    case 5: fn(Int<5>()); return true;
    case 6: fn(Int<6>()); return true;
    case 7: fn(Int<7>()); return true;
    case 8: fn(Int<8>()); return true;
    default: return false;
  }
}

}  // namespace
#pragma GCC pop_options

namespace {

enum Isa { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

// The CPU's own answer (cpuid), so that asking for more than the CPU has falls back instead of crashing.
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

bool cpu_has_avx512_bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }

Isa pick(int64_t wanted) {
  if (wanted >= kAvx512Bf16 && cpu_has_avx512_bf16()) return kAvx512Bf16;
  return wanted >= kAvx512 && cpu_has_avx512() ? kAvx512 : kAvx2;
}

// x as the kernels take it: contiguous fp32 [rows, k] (converted here, cheaper than a call from Python), for
// contiguous weights w.
torch::Tensor fp32_rows(const torch::Tensor& x, const torch::Tensor& w, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "x must be a floating-point [rows, in_features] tensor");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " inputs, the weights ", k);
  return x.to(torch::kFloat32).contiguous();
}

torch::Tensor output(const torch::Tensor& x, int64_t n) {
  return torch::empty({x.size(0), n}, x.options().dtype(torch::kFloat32));
}

// The bias in fp32 (a bf16 one converted here), undefined where there is none; `bias_ptr` gives its data or null.
torch::Tensor fp32_bias(const c10::optional<torch::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return {};
  TORCH_CHECK(bias->numel() == n, "bias must be a vector of out_features");
  return bias->to(torch::kFloat32).contiguous();
}

const float* bias_ptr(const torch::Tensor& bias) { return bias.defined() ? bias.data_ptr<float>() : nullptr; }

// Threads share units [0, n) (output channels or groups of 16) in chunks of `chunk` units on a fixed grid, and
// each thread its equal share of the chunks, as a static split gives: it takes its own chunks from the front, in
// order, then, its share done, chunks from the back of the share with the most left. Threads running alike read as
// a static split does (each one run of memory), while a thread slowed by another process (a laptop's browser, a
// shared host's neighbour) no longer holds up the whole product: the others take over the rest of its share.
// Results do not depend on who takes a chunk, nor on the number of threads (the kernels' tiles lie within chunks).
// A matrix of less than `min_units` per thread takes fewer threads (one for a small matrix, where waking another
// costs more than it saves).
template <typename Fn>
void share_chunks(int64_t n, int64_t chunk, int64_t min_units, Fn fn) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t threads = at::get_num_threads();
  const int64_t parties = std::min<int64_t>({threads, n / std::max<int64_t>(min_units, 1), chunks});
  auto run = [&](int64_t c) { fn(c * chunk, std::min(n, (c + 1) * chunk)); };
  if (parties <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < chunks; ++c) run(c);
    return;
  }
  // each share's chunks left: [first, end), packed as first << 32 | end, claimed with a compare-and-swap
  struct alignas(64) Share { std::atomic<uint64_t> left; };
  std::vector<Share> shares(parties);
  for (int64_t t = 0; t < parties; ++t)
    shares[t].left = uint64_t(chunks * t / parties) << 32 | uint64_t(chunks * (t + 1) / parties);
  auto claim = [&](int64_t t, bool front) -> int64_t {  // a chunk of share t, or -1 where none is left
    uint64_t v = shares[t].left.load();
    for (;;) {
      const uint64_t first = v >> 32, end = v & 0xFFFFFFFFu;
      if (first >= end) return -1;
      const uint64_t next = front ? (first + 1) << 32 | end : first << 32 | (end - 1);
      if (shares[t].left.compare_exchange_weak(v, next)) return int64_t(front ? first : end - 1);
    }
  };
  at::parallel_for(0, parties, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t c; (c = claim(t, true)) >= 0;) run(c);
    for (;;) {  // help: the share with the most chunks left, from its back
      int64_t most = -1, most_left = 0;
      for (int64_t u = 0; u < parties; ++u) {
        const uint64_t v = shares[u].left.load();
        const int64_t left = int64_t(v & 0xFFFFFFFFu) - int64_t(v >> 32);
        if (left > most_left) most = u, most_left = left;
      }
      if (most < 0) return;
      const int64_t c = claim(most, false);
      if (c >= 0) run(c);
    }
  });
}

// Threads share the output channels in chunks of 64 KB of weights (16 channels at least, a multiple of 16: the
// kernels' tiles), 256 KB at least per thread.
template <typename Fn>
void over_channels(int64_t n, int64_t row_bytes, Fn fn) {
  auto rows_in = [&](int64_t bytes) { return std::max<int64_t>(1, bytes / std::max<int64_t>(row_bytes, 1)); };
  share_chunks(n, (rows_in(64 << 10) + 15) / 16 * 16, rows_in(256 << 10), fn);
}

// Threads share groups of 16 output channels (int8 and int4 layers) of `group_bytes` each the same way.
template <typename Fn>
void over_groups(int64_t groups, int64_t group_bytes, Fn fn) {
  share_chunks(groups, std::max<int64_t>(1, (64 << 10) / group_bytes), (256 << 10) / group_bytes, fn);
}

// Activation rows from which the AVX512 kernels put rows side by side in the lanes (see lane_block).
constexpr int64_t kLanesFromRows = 3;

// A buffer the calling thread keeps for `slot` and reuses, grown as needed, 64-byte aligned: a decoding step's
// scratch without an allocation per call (a fresh one page-faults on its first writes).
template <typename T>
T* scratch(int slot, int64_t count) {
  thread_local std::vector<char> buffers[16];
  std::vector<char>& b = buffers[slot];
  const size_t bytes = static_cast<size_t>(count) * sizeof(T) + 64;
  if (b.size() < bytes) b.resize(bytes);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(b.data()) + 63) & ~uintptr_t{63});
}

// Bytes of one group of 8 rows laid out for the lanes kernels: a 64-byte vector per 8 bytes of a row's inputs.
template <typename T>
constexpr int64_t lane_group_bytes(int64_t k) {
  return k * static_cast<int64_t>(sizeof(T)) / 8 * 64;
}

// x's rows [rows, k] laid out for the lanes kernels in scratch slot 0, group after group of 8 rows, each
// [k / C][8][C] for C inputs in 8 bytes (a row's share of a vector, copied as one); lanes past the last row are zero.
template <typename T>
const T* rows_to_lanes(const T* x, int64_t rows, int64_t k) {
  const int64_t units = k * sizeof(T) / 8, group_bytes = lane_group_bytes<T>(k);
  const int64_t groups = (rows + kGroupRows - 1) / kGroupRows;
  char* xt = scratch<char>(0, groups * group_bytes);
  const char* src = reinterpret_cast<const char*>(x);
  for (int64_t g = 0; g < groups; ++g) {
    char* dst = xt + g * group_bytes;
    const int64_t first = g * kGroupRows, in_group = std::min<int64_t>(kGroupRows, rows - first);
    if (in_group < kGroupRows) std::memset(dst, 0, group_bytes);
    for (int64_t s = 0; s < units; ++s, dst += 64)
      for (int64_t r = 0; r < in_group; ++r) std::memcpy(dst + r * 8, src + ((first + r) * k * sizeof(T) + s * 8), 8);
  }
  return reinterpret_cast<const T*>(xt);
}

// Channels [n0, n1) of every row: whole blocks of 16 channels on the lanes kernel `block(xg, n, r0)`, one group of
// rows after another (the later groups find the block's weights in L2), where `xt` holds the rows in lanes
// (rows_to_lanes); the rest, and everything without `xt`, on the tiles `tiles(n0, n1)`.
template <typename T, typename Block, typename Tiles>
void lanes_or_tiles(const T* xt, int64_t rows, int64_t k, int64_t n0, int64_t n1, Block&& block, Tiles&& tiles) {
  const int64_t group = lane_group_bytes<T>(k) / sizeof(T);  // elements per group in xt
  int64_t n = n0;
  if (xt)
    for (; n + kLanes <= n1; n += kLanes)
      for (int64_t r0 = 0; r0 < rows; r0 += kGroupRows) block(xt + r0 / kGroupRows * group, n, r0);
  if (n < n1) tiles(n, n1);
}

// The products on raw rows, every output channel: x [rows, k] contiguous, y as Problem says.
void f32_product(const Problem& p, const float* x, const float* w, Isa use) {
  const float* xt = use != kAvx2 && p.rows >= kLanesFromRows ? rows_to_lanes(x, p.rows, p.k) : nullptr;
  over_channels(p.n, p.k * 4, [&](int64_t n0, int64_t n1) {
    lanes_or_tiles(xt, p.rows, p.k, n0, n1,
        [&](const float* xg, int64_t n, int64_t r0) { f32_lanes_avx512(p, x, xg, w, n, r0); },
        [&](int64_t m0, int64_t m1) { use != kAvx2 ? f32_avx512(p, x, w, m0, m1) : f32_avx2(p, x, w, m0, m1); });
  });
}

// bf16 weights: x is bf16 rows where `use` has AVX512-BF16 (multiplied as they are), fp32 rows otherwise.
void bf16_product(const Problem& p, const void* x, const uint16_t* w, Isa use) {
  auto xb = static_cast<const uint16_t*>(x);
  auto xf = static_cast<const float*>(x);
  const uint16_t* xt = use == kAvx512Bf16 && p.rows >= kLanesFromRows ? rows_to_lanes(xb, p.rows, p.k) : nullptr;
  over_channels(p.n, p.k * 2, [&](int64_t n0, int64_t n1) {
    lanes_or_tiles(xt, p.rows, p.k, n0, n1,
        [&](const uint16_t* xg, int64_t n, int64_t r0) { bf16_lanes_avx512(p, xb, xg, w, n, r0); },
        [&](int64_t m0, int64_t m1) {
          if (use == kAvx512Bf16) bf16_dot_avx512(p, xb, w, m0, m1);
          else if (use == kAvx512) bf16_avx512(p, xf, w, m0, m1);
          else bf16_avx2(p, xf, w, m0, m1);
        });
  });
}

// int8 weights (Int8Linear's grouped layout), fp32 rows rounded to int8 in blocks of 32 here.
void int8_product(const Problem& p, const float* x, const int8_t* w, const float* scales, Isa use) {
  QuantizedRows a = quantize_rows(x, p.rows, p.k);
  const std::vector<float> offset = use != kAvx2 ? flip_offsets(a, p.rows) : std::vector<float>();
  if (use != kAvx2) tile_rows(a, p.rows);
  const int64_t groups = p.n / kGroup;
  over_groups(groups, kGroup * p.k, [&](int64_t g0, int64_t g1) {
    use != kAvx2 ? i8_groups_avx512(p, a, w, scales, offset.data(), g0, g1) : i8_groups_avx2(p, a, w, scales, g0, g1);
  });
  if (groups * kGroup < p.n) i8_avx2(p, a, w, scales, groups * kGroup, p.n);  // the last n % 16 channels, one row each
}

// int4 weights (Int4Linear's layout), fp32 rows rounded to int8 in blocks of 32 here.
void int4_product(const Problem& p, const float* x, const Int4Weights& w, Isa use) {
  QuantizedRows a = quantize_rows(x, p.rows, p.k);
  if (use != kAvx2) tile_rows(a, p.rows);
  over_groups(p.n / kGroup, kGroup * p.k / 2, [&](int64_t g0, int64_t g1) {
    use != kAvx2 ? i4_avx512(p, a, w, g0, g1) : i4_avx2(p, a, w, g0, g1);
  });
}

torch::Tensor linear_f32(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t isa) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.dim() == 2, "fp32 [out, in] weights expected");
  w = w.contiguous();
  x = fp32_rows(x, w, w.size(1));
  auto y = output(x, w.size(0));
  auto b = fp32_bias(bias, w.size(0));
  Problem p{x.size(0), w.size(1), w.size(0), y.data_ptr<float>(), bias_ptr(b)};
  f32_product(p, x.data_ptr<float>(), w.data_ptr<float>(), pick(isa));
  return y;
}

// x in bf16 (a bf16 model's activations) or fp32. With AVX512-BF16, bf16 rows multiply as they are (fp32 rows are
// rounded to bf16 first); otherwise the weights are widened to fp32 against fp32 rows.
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t isa) {
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.dim() == 2, "bf16 [out, in] weights expected");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32,
              "x must be bf16 or fp32");
  Isa use = pick(isa);
  x = (use == kAvx512Bf16 ? x.to(torch::kBFloat16) : x.to(torch::kFloat32)).contiguous();
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "x must be [rows, ", w.size(1), "]");
  w = w.contiguous();
  auto y = output(x, w.size(0));
  auto b = fp32_bias(bias, w.size(0));
  Problem p{x.size(0), w.size(1), w.size(0), y.data_ptr<float>(), bias_ptr(b)};
  bf16_product(p, x.data_ptr(), reinterpret_cast<const uint16_t*>(w.data_ptr()), use);
  return y;
}

torch::Tensor linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scales, c10::optional<torch::Tensor> bias,
                          int64_t isa) {
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.is_contiguous(),
              "contiguous int8 [out, in] weights expected");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat32 && scales.numel() == w.size(0) && scales.is_contiguous(),
              "int8 scales must be a contiguous fp32 vector of out_features");
  x = fp32_rows(x, w, w.size(1));
  auto y = output(x, w.size(0));
  auto b = fp32_bias(bias, w.size(0));
  Problem p{x.size(0), w.size(1), w.size(0), y.data_ptr<float>(), bias_ptr(b)};
  TORCH_CHECK(p.k % 4 == 0, "int8 kernels need in_features divisible by 4");
  int8_product(p, x.data_ptr<float>(), w.data_ptr<int8_t>(), scales.data_ptr<float>(), pick(isa));
  return y;
}

Int4Weights int4_weights(const torch::Tensor& w, const torch::Tensor& scales, const torch::Tensor& mins,
                         const torch::Tensor& steps, int64_t in_features) {
  TORCH_CHECK(in_features % kBlock == 0, "int4 needs in_features divisible by 32");
  const int64_t out = w.size(0), blocks = in_features / kBlock, superblocks = (blocks + kSuper - 1) / kSuper;
  TORCH_CHECK(out % kGroup == 0, "int4 needs out_features divisible by 16");
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.size(1) == in_features / 2 && w.is_contiguous(),
              "int4 codes must be contiguous uint8 [out, in_features / 2]");
  TORCH_CHECK(scales.scalar_type() == torch::kUInt8 && mins.scalar_type() == torch::kInt8 &&
                  scales.is_contiguous() && mins.is_contiguous() && scales.numel() == out * blocks &&
                  mins.numel() == scales.numel(),
              "int4 scale and minimum codes must be contiguous uint8 / int8 [out / 16, in_features / 32, 16]");
  TORCH_CHECK(steps.scalar_type() == torch::kBFloat16 && steps.is_contiguous() && steps.numel() == out * superblocks * 2,
              "int4 steps must be contiguous bf16 [out / 16, superblocks of 256 inputs, 2, 16]");
  return Int4Weights{w.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), mins.data_ptr<int8_t>(),
                     reinterpret_cast<const uint16_t*>(steps.data_ptr()), in_features, blocks, superblocks};
}

torch::Tensor linear_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor mins,
                          torch::Tensor steps, c10::optional<torch::Tensor> bias, int64_t in_features, int64_t isa) {
  Int4Weights wq = int4_weights(w, scales, mins, steps, in_features);
  x = fp32_rows(x, w, in_features);
  auto y = output(x, w.size(0));
  auto b = fp32_bias(bias, w.size(0));
  Problem p{x.size(0), in_features, w.size(0), y.data_ptr<float>(), bias_ptr(b)};
  int4_product(p, x.data_ptr<float>(), wq, pick(isa));
  return y;
}

// Output channels [start, end) of an int4 weight (Int4Linear's layout) as fp32 or bf16 rows of in_features, for
// prompts: one pass, in fp32 and rounded once to bf16 (to nearest even), where the same in torch takes five.
torch::Tensor dequantize_int4(torch::Tensor w, torch::Tensor scales, torch::Tensor mins, torch::Tensor steps,
                              int64_t start, int64_t end, int64_t in_features, torch::Tensor out) {
  Int4Weights wq = int4_weights(w, scales, mins, steps, in_features);
  TORCH_CHECK(0 <= start && start <= end && end <= w.size(0), "rows out of range");
  TORCH_CHECK(out.is_contiguous() && out.size(0) == end - start && out.size(1) == in_features &&
                  (out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16),
              "out must be a contiguous fp32 or bf16 [end - start, in_features] tensor");
  const bool to_bf16 = out.scalar_type() == torch::kBFloat16;
  float* out_f32 = to_bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* out_bf16 = to_bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr()) : nullptr;
  // A group at a time, reading its codes in order: each run of 8 inputs of a channel is 8 values of its output row
  at::parallel_for(start / kGroup, (end + kGroup - 1) / kGroup, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t c0 = std::max<int64_t>(start - g * kGroup, 0), c1 = std::min<int64_t>(end - g * kGroup, kGroup);
      const uint8_t* qg = wq.group_q(g);
      for (int64_t b = 0; b < wq.blocks; ++b) {
        const uint16_t* st = wq.group_steps(g, b / kSuper);
        for (int64_t c = c0; c < c1; ++c) {
          const __m256 scale = _mm256_set1_ps(bf16_to_float(st[c]) * wq.scales[wq.block_at(g, b) + c]);
          const __m256 minimum = _mm256_set1_ps(bf16_to_float(st[kGroup + c]) * wq.mins[wq.block_at(g, b) + c]);
          const int64_t row = g * kGroup + c - start;
          for (int64_t s = 4 * b; s < 4 * b + 4; ++s) {
            __m128i bytes = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(four_bytes(reinterpret_cast<const int8_t*>(qg + s * 64 + c * 4))));
            __m256i codes = _mm256_set_m128i(_mm_srli_epi32(bytes, 4), _mm_and_si128(bytes, _mm_set1_epi32(15)));
            __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes), scale, minimum);
            if (to_bf16) {  // round to nearest even
              __m256i bits = _mm256_castps_si256(v);
              bits = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                                             _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1))));
              bits = _mm256_srli_epi32(bits, 16);
              __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
              _mm_storeu_si128(reinterpret_cast<__m128i*>(out_bf16 + row * in_features + s * 8), packed);
            } else {
              _mm256_storeu_ps(out_f32 + row * in_features + s * 8, v);
            }
          }
        }
      }
    }
  });
  return out;
}

// ----------------------------------------------------------------------------------------- decoding attention
// One query per sequence and head (a decoding step) against its cache: scores[b, h, l] = scale * q[b, h] . k[b, h, l]
// and out[b, h] = sum_l p[b, h, l] * v[b, h, l], in fp32, reading a bf16 or fp32 cache where it lies (a strided
// view of the cache's buffers) instead of copying it: an upcast copy of a bf16 cache cost more than the attention.
// AVX2 + FMA here, AVX512 (scores_of_head_avx512) where asked for: at 8 sequences the cache is a tenth of the
// bytes a step reads, and the AVX2 kernels read it at half the memory's speed.
CacheView cache_view(const torch::Tensor& t, int64_t batch, int64_t heads, int64_t dim) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == batch && t.size(1) == heads && t.size(3) == dim,
              "the cache must be [batch, heads, length, head_dim] like the query");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16, "the cache must be fp32 or bf16");
  TORCH_CHECK(t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) == dim), "each cached row must be contiguous");
  return {t.data_ptr(), t.scalar_type() == torch::kBFloat16, t.stride(0), t.stride(1), t.size(2), dim};
}

template <typename T>
inline __m256 load8(const T* v) {
  if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(v);
  else return bf16x8_avx2(v);
}

// Four keys at a time: four sums over the head's dimensions, reduced together by three horizontal adds. `next`: as
// in scores_of_head_avx512.
template <typename T>
void scores_of_head(const CacheView& k, int64_t b, int64_t h, const float* q, float scale, float* out,
                    const char* next) {
  const int64_t dim = k.dim, whole = dim / 8 * 8;
  auto tail = [&](const T* row) {
    float s = 0.f;
    for (int64_t d = whole; d < dim; ++d) s += to_float(row[d]) * q[d];
    return s;
  };
  const int64_t row_bytes = dim * sizeof(T);
  int64_t l = 0;
  for (; l + 4 <= k.length; l += 4) {
    if (next) prefetch_bytes<_MM_HINT_T1>(next + l * row_bytes, 4 * row_bytes);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t d = 0; d < whole; d += 8) {
      __m256 qv = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(load8(k.row<T>(b, h, l + j) + d), qv, acc[j]);
    }
    __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    __m128 four = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    alignas(16) float sums[4];
    _mm_store_ps(sums, four);
    for (int j = 0; j < 4; ++j) out[l + j] = (sums[j] + tail(k.row<T>(b, h, l + j))) * scale;
  }
  for (; l < k.length; ++l) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < whole; d += 8) acc = _mm256_fmadd_ps(load8(k.row<T>(b, h, l) + d), _mm256_loadu_ps(q + d), acc);
    out[l] = (hsum256(acc) + tail(k.row<T>(b, h, l))) * scale;
  }
}

// Up to 64 dimensions per pass over the values, their sums in registers; the first pass fetches `next` (as in
// values_of_head_avx512).
template <typename T>
void values_of_head(const CacheView& v, int64_t b, int64_t h, const float* p, float* out, const char* next) {
  const int64_t dim = v.dim, row_bytes = dim * sizeof(T);
  for (int64_t d0 = 0; d0 < dim / 8 * 8; d0 += 64) {
    const int vectors = static_cast<int>(std::min<int64_t>(8, (dim / 8 * 8 - d0) / 8));
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t l = 0; l < v.length; ++l) {
      if (next && d0 == 0) prefetch_bytes<_MM_HINT_T1>(next + l * row_bytes, row_bytes);
      const T* row = v.row<T>(b, h, l) + d0;
      __m256 weight = _mm256_set1_ps(p[l]);
      for (int j = 0; j < 8; ++j)
        if (j < vectors) acc[j] = _mm256_fmadd_ps(load8(row + 8 * j), weight, acc[j]);
    }
    for (int j = 0; j < vectors; ++j) _mm256_storeu_ps(out + d0 + 8 * j, acc[j]);
  }
  for (int64_t d = dim / 8 * 8; d < dim; ++d) {
    float s = 0.f;
    for (int64_t l = 0; l < v.length; ++l) s += p[l] * to_float(v.row<T>(b, h, l)[d]);
    out[d] = s;
  }
}

// Sequences x heads shared among the threads as share_chunks shares them, 32K multiply-adds at least per chunk.
template <typename Fn>
void over_heads(int64_t batch, int64_t heads, int64_t work_per_head, Fn fn) {
  const int64_t grain = std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(work_per_head, 1));
  share_chunks(batch * heads, grain, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) fn(i / heads, i % heads, i);
  });
}

// One head's scores (k . q * scale, `length` of them) and one head's probability-weighted values, on the AVX512
// kernels where the CPU has them and the head fits, else AVX2.
void scores_for_head(const CacheView& kv, int64_t b, int64_t h, const float* q, float scale, float* out, bool wide,
                     const char* next) {
  auto run = [&](auto t) {
    using T = decltype(t);
    auto wide_kernel = [&](auto n) { scores_of_head_avx512<T, n>(kv, b, h, q, scale, out, next); };
    if (!wide || !with_head_vectors<T>(kv.dim, wide_kernel)) scores_of_head<T>(kv, b, h, q, scale, out, next);
  };
  kv.bf16 ? run(uint16_t()) : run(float());
}

void values_for_head(const CacheView& vv, int64_t b, int64_t h, const float* p, float* out, bool wide,
                     const char* next) {
  auto run = [&](auto t) {
    using T = decltype(t);
    auto wide_kernel = [&](auto n) { values_of_head_avx512<T, n>(vv, b, h, p, out, next); };
    if (!wide || !with_head_vectors<T>(vv.dim, wide_kernel)) values_of_head<T>(vv, b, h, p, out, next);
  };
  vv.bf16 ? run(uint16_t()) : run(float());
}

// ----------------------------------------------------------------------------------------- rotary embedding
// A decoding step's rotary embedding (NeoX rotate-half on the first rd channels of each head) of q and k in place:
// out1 = x1 * cos - x2 * sin, out2 = x2 * cos + x1 * sin. Done in torch it is eight small operations per tensor and
// layer; here one call. Each product and the sum are rounded as torch's operations round them (bf16: cos and sin to
// bf16, then every result), so the result is torch's to the bit; fp-contract off keeps products out of FMAs.
template <typename T>
__attribute__((optimize("fp-contract=off")))
void rotate_row(T* v, const float* c, const float* s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const T x1 = v[i], x2 = v[i + half];
    const T c1 = T(c[i]), s1 = T(s[i]), c2 = T(c[i + half]), s2 = T(s[i + half]);
    const T a = T(x1 * c1), b1 = T(-x2 * s1), a2 = T(x2 * c2), b2 = T(x1 * s2);
    v[i] = T(a + b1);
    v[i + half] = T(a2 + b2);
  }
}

template <typename T>
void rotate_heads(const torch::Tensor& x, const float* cos, const float* sin, int64_t cos_batch, int64_t rd) {
  const int64_t batch = x.size(0), heads = x.size(1), tokens = x.size(2);
  const int64_t batch_stride = x.stride(0), head_stride = x.stride(1), token_stride = x.stride(2);
  T* base = reinterpret_cast<T*>(x.data_ptr());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t row = ((cos_batch == 1 ? 0 : b) * tokens + t) * rd;  // one row of angles may serve all
        rotate_row(base + b * batch_stride + h * head_stride + t * token_stride, cos + row, sin + row, rd / 2);
      }
}

void rotary_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
              sin.is_contiguous() && cos.dim() == 3 && cos.sizes() == sin.sizes(),
              "cos and sin must be contiguous fp32 [batch, tokens, rotary_dim] tensors");
  const int64_t rd = cos.size(2), angle_rows = cos.size(0);
  const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  for (const auto& x : {q, k}) {
    TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && (angle_rows == 1 || x.size(0) == angle_rows) &&
                    x.size(2) == cos.size(1) && rd % 2 == 0 && rd <= x.size(3),
                "q and k must be [batch, heads, tokens, head_dim] with rows contiguous, and rotary_dim even and at "
                "most head_dim");
    if (x.scalar_type() == torch::kBFloat16) rotate_heads<c10::BFloat16>(x, c, s, angle_rows, rd);
    else if (x.scalar_type() == torch::kFloat32) rotate_heads<float>(x, c, s, angle_rows, rd);
    else TORCH_CHECK(false, "q and k must be fp32 or bf16");
  }
}

// ---------------------------------------------------------------------------------------------- GELU (tanh)
// gelu(x) = 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), phi's activation, with 1 + tanh(u) formed
// as 2 - 2 / (1 + exp(2u)), 8 lanes at a time: one call per layer where torch's took 11 us at one row of 8192
// (threads woken for 32 KB) and 40 us at 8 rows. Formed so as to round like torch's formula (1 + tanh(u) is 0 from
// x below about -5): fp32 results within 5e-7 of torch's, bf16 ones equal but below x = -3, where both lose digits
// to 1 + tanh(u)'s cancellation (0.008% of unit-normal inputs, by 4e-6 at most). exp: 2^n times a degree-6
// polynomial of the remainder (Cephes' coefficients, about 1 ulp), the argument clamped to [-87, 88].
inline __m256 exp8(__m256 t) {
  t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), t);  // t - n ln 2, ln 2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
  poly = _mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(poly, _mm256_castsi256_ps(two_n));
}

inline __m256 gelu8(__m256 x) {
  const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), x), _mm256_mul_ps(x, x), x);
  const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(2.f * 0.79788456080286536f), inner));  // exp(2u)
  const __m256 two = _mm256_set1_ps(2.f);
  const __m256 one_plus_tanh = _mm256_sub_ps(two, _mm256_div_ps(two, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), one_plus_tanh);
}

// 8 fp32 values to bf16, rounded to nearest even as torch rounds them (NaN stays a quiet NaN).
inline __m128i bf16x8_from_float(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  return _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
}

template <typename T>
void gelu_run(const T* x, T* y, int64_t n) {  // n <= 8 values when the run is a tail
  auto load = [](const T* v) {
    if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(v);
    else return bf16x8_avx2(v);
  };
  auto save = [](T* v, __m256 g) {
    if constexpr (std::is_same_v<T, float>) _mm256_storeu_ps(v, g);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(v), bf16x8_from_float(g));
  };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) save(y + i, gelu8(load(x + i)));
  if (i < n) {  // the last n % 8 values through a zero-padded vector
    T in[8] = {}, out[8];
    std::memcpy(in, x + i, (n - i) * sizeof(T));
    save(out, gelu8(load(in)));
    std::memcpy(y + i, out, (n - i) * sizeof(T));
  }
}

torch::Tensor gelu_tanh(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "x must be fp32 or bf16");
  x = x.contiguous();
  auto y = torch::empty_like(x);
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {  // one thread up to 16 K values
    if (bf16) {
      gelu_run(reinterpret_cast<const uint16_t*>(x.data_ptr()) + i0, reinterpret_cast<uint16_t*>(y.data_ptr()) + i0,
               i1 - i0);
    } else {
      gelu_run(x.data_ptr<float>() + i0, y.data_ptr<float>() + i0, i1 - i0);
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------- decoding attention
// Keys a mask hides: `keep` (bool) at b * batch + h * head + l * key, or null where every key is seen.
struct KeyMask {
  const bool* keep;
  int64_t batch, head, key;
};

// Sequence b's head h of [batch, heads]: softmax(k . q * scale, masked) . v from the fp32 query q into the fp32
// out (head_dim values each).
void attend_head(const CacheView& kv, const CacheView& vv, int64_t b, int64_t h, int64_t batch, int64_t heads,
                 const float* q, float scale, const KeyMask& mask, bool wide, float* out) {
  const int64_t length = kv.length, i = b * heads + h, count = batch * heads;
  thread_local std::vector<float> probs;
  probs.assign((length + 7) / 8 * 8, 0.f);
  scores_for_head(kv, b, h, q, scale, probs.data(), wide, vv.head(i, heads));
  const bool* keep_h = mask.keep ? mask.keep + b * mask.batch + h * mask.head : nullptr;
  auto kept = [&](int64_t l) { return !keep_h || keep_h[l * mask.key]; };
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < length; ++l)
    if (kept(l)) top = std::max(top, probs[l]);
  if (top == -std::numeric_limits<float>::infinity()) {
    // no key to see: evenly over all of them, as torch's softmax of equally masked scores gives
    for (int64_t l = 0; l < length; ++l) probs[l] = 1.f / length;
  } else {
    for (int64_t l = 0; l < length; l += 8)  // the padding past `length` is computed and left unread
      _mm256_storeu_ps(&probs[l], exp8(_mm256_sub_ps(_mm256_loadu_ps(&probs[l]), _mm256_set1_ps(top))));
    float sum = 0.f;
    for (int64_t l = 0; l < length; ++l) sum += probs[l] = kept(l) ? probs[l] : 0.f;
    for (int64_t l = 0; l < length; ++l) probs[l] /= sum;
  }
  values_for_head(vv, b, h, probs.data(), out, wide, i + 1 < count ? kv.head(i + 1, heads) : nullptr);
}

// A decoding step's attention, one query per sequence and head: softmax(k . q * scale, masked) . v, all of it in
// one call, with q and the result in the model's dtype (fp32 or bf16; the products and the softmax in fp32). k and v
// are the cache's [batch, heads, length, head_dim] views, read where they lie; `mask` (bool, [batch or 1, heads or
// 1, 1, length]) hides keys, which get probability 0. One call per layer where the same in torch took six
// operations around the two products; the softmax is torch's to a few ulps (exp8's).
torch::Tensor attention_step(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                             double scale, int64_t isa) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 &&
                  (q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16),
              "q must be an fp32 or bf16 [batch, heads, 1, head_dim] tensor");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(3);
  const CacheView kv = cache_view(k, batch, heads, dim), vv = cache_view(v, batch, heads, dim);
  const int64_t length = kv.length;
  TORCH_CHECK(vv.length == length, "k and v must hold as many tokens");
  TORCH_CHECK(length > 0, "the cache is empty");
  const bool* keep = nullptr;
  int64_t mask_batch = 0, mask_head = 0, mask_key = 0;
  if (mask.has_value() && mask->defined()) {
    const torch::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == torch::kBool && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == batch) &&
                    (m.size(1) == 1 || m.size(1) == heads) && m.size(2) == 1 && m.size(3) == length,
                "mask must be bool [batch or 1, heads or 1, 1, length]");
    keep = m.data_ptr<bool>();
    mask_batch = m.size(0) == 1 ? 0 : m.stride(0);
    mask_head = m.size(1) == 1 ? 0 : m.stride(1);
    mask_key = m.stride(3);
  }
  auto out = torch::empty({batch, heads, 1, dim}, q.options());
  const bool bf16 = q.scalar_type() == torch::kBFloat16, wide = pick(isa) != kAvx2;
  const char* q_base = static_cast<const char*>(q.data_ptr());
  char* out_base = static_cast<char*>(out.data_ptr());
  const int64_t element = bf16 ? 2 : 4;
  const KeyMask keys{keep, mask_batch, mask_head, mask_key};
  over_heads(batch, heads, 2 * length * dim, [&](int64_t b, int64_t h, int64_t i) {
    thread_local std::vector<float> qf, of;
    qf.resize(dim);
    of.resize(dim);
    const char* qh = q_base + (b * q.stride(0) + h * q.stride(1)) * element;
    for (int64_t d = 0; d < dim; ++d) {
      const char* at = qh + d * q.stride(3) * element;
      qf[d] = bf16 ? to_float(*reinterpret_cast<const uint16_t*>(at)) : *reinterpret_cast<const float*>(at);
    }
    attend_head(kv, vv, b, h, batch, heads, qf.data(), float(scale), keys, wide, of.data());
    char* oh = out_base + i * dim * element;
    for (int64_t d = 0; d < dim; ++d) {
      if (bf16) *reinterpret_cast<c10::BFloat16*>(oh + d * 2) = c10::BFloat16(of[d]);
      else reinterpret_cast<float*>(oh)[d] = of[d];
    }
  });
  return out;
}


// ------------------------------------------------------------------------------------- a decoding layer
// One decoder layer of a decoding step (one new token per sequence), all of it in one call: x + attention(ln(x)) +
// mlp(ln(x)) with ln, the products, rotary, the cache write, attention, GELU and the two residual adds in plain loops
// over buffers kept between calls. Done from Python the same layer takes ~20 small torch operations around the
// products, and after the weights have streamed through the caches each costs tens of microseconds (allocation,
// dispatch, its code and data cold): 9-12 ms of a 90 ms phi-1.5 step in bf16, where the products alone matched
// llama.cpp's whole step. Every result is rounded to the model's dtype where torch's modules round it (each product's
// output, the rotary terms, GELU, each residual add), so the layer equals the module path to the bit but for the
// LayerNorm, whose mean and variance are summed in another order (within an ulp of the bf16 or fp32 result).

// A linear layer as a decoding step passes it: [weight, bias] (fp32 or bf16 weights), [weight, scales, bias]
// (int8 in Int8Linear's grouped layout) or [codes, scales, mins, steps, bias] (int4 in Int4Linear's layout).
struct LayerLinear {
  const std::vector<torch::Tensor>* parts;
  int64_t n, k;
  Int4Weights int4;  // int4 layers: their layout, checked once per call
};

LayerLinear layer_linear(const std::vector<torch::Tensor>& parts, int64_t k) {
  TORCH_CHECK(parts.size() == 2 || parts.size() == 3 || parts.size() == 5,
              "a linear layer is [weight, bias], [weight, scales, bias] or [codes, scales, mins, steps, bias]");
  for (const auto& t : parts) TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "linear tensors must be contiguous CPU tensors");
  const torch::Tensor& w = parts[0];
  const int64_t n = w.size(0);
  TORCH_CHECK(parts.back().numel() == n, "the bias must have one value per output channel");
  if (parts.size() == 2)
    TORCH_CHECK((w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16) && w.dim() == 2 &&
                    w.size(1) == k, "fp32 or bf16 weights must be [out, ", k, "]");
  if (parts.size() == 3)
    TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.size(1) == k && k % 4 == 0 &&
                    parts[1].scalar_type() == torch::kFloat32 && parts[1].numel() == n,
                "int8 weights must be [out, ", k, "] with fp32 scales per output channel");
  const Int4Weights int4 = parts.size() == 5 ? int4_weights(w, parts[1], parts[2], parts[3], k) : Int4Weights{};
  return {&parts, n, k, int4};
}

// y [rows, n] (fp32) = rows @ W^T + bias. x32: the rows in fp32; x16: the same rows in bf16, or null (fp32 model).
void layer_product(const LayerLinear& l, const float* x32, const uint16_t* x16, int64_t rows, float* y, Isa use) {
  const auto& parts = *l.parts;
  const torch::Tensor& bias = parts.back();
  float* b = scratch<float>(15, l.n);
  if (bias.scalar_type() == torch::kBFloat16) {
    auto src = reinterpret_cast<const uint16_t*>(bias.data_ptr());
    for (int64_t i = 0; i < l.n; ++i) b[i] = bf16_to_float(src[i]);
  } else {
    TORCH_CHECK(bias.scalar_type() == torch::kFloat32, "the bias must be fp32 or bf16");
    std::memcpy(b, bias.data_ptr<float>(), l.n * 4);
  }
  Problem p{rows, l.k, l.n, y, b};
  const torch::Tensor& w = parts[0];
  if (parts.size() == 5) {
    int4_product(p, x32, l.int4, use);
  } else if (parts.size() == 3) {
    int8_product(p, x32, w.data_ptr<int8_t>(), parts[1].data_ptr<float>(), use);
  } else if (w.scalar_type() == torch::kFloat32) {
    f32_product(p, x32, w.data_ptr<float>(), use);
  } else {
    TORCH_CHECK(x16 || use != kAvx512Bf16, "bf16 weights multiply bf16 rows: the model must be bf16");
    bf16_product(p, use == kAvx512Bf16 ? static_cast<const void*>(x16) : x32,
                 reinterpret_cast<const uint16_t*>(w.data_ptr()), use);
  }
}

template <typename T>
inline float widen(T v) {
  return static_cast<float>(v);
}

inline __m256 widen8(__m128i bf16) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16), 16)); }

// n values of T rounded from fp32 (to nearest even for bf16, as torch's .to rounds), 8 at a time.
template <typename T>
void round_into(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>)
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), bf16x8_from_float(_mm256_loadu_ps(src + i)));
  for (; i < n; ++i) dst[i] = T(src[i]);
}

// out = (x + attention) + mlp, each sum rounded to T as torch's two adds round it, the mlp's fp32 output first
// rounded to T as its module rounds it.
template <typename T>
void residual_into(const T* x, const T* attention, const float* mlp, T* out, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    auto load = [](const T* v) { return widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v))); };
    for (; i + 8 <= n; i += 8) {
      const __m256 first = widen8(bf16x8_from_float(_mm256_add_ps(load(x + i), load(attention + i))));
      const __m256 m = widen8(bf16x8_from_float(_mm256_loadu_ps(mlp + i)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), bf16x8_from_float(_mm256_add_ps(first, m)));
    }
  }
  for (; i < n; ++i) out[i] = T(widen(T(widen(x[i]) + widen(attention[i]))) + widen(T(mlp[i])));
}

// The rows a product reads, from the model's T: fp32 always, and bf16 (the bits of T) where T is bf16.
template <typename T>
const uint16_t* as_rows(const T* x, int64_t count, float* x32) {
  for (int64_t i = 0; i < count; ++i) x32[i] = widen(x[i]);
  if constexpr (std::is_same_v<T, c10::BFloat16>) return reinterpret_cast<const uint16_t*>(x);
  else return nullptr;
}

// One row of LayerNorm: the mean and variance summed in double (4 lanes), the row normalized in fp32 and rounded
// to T.
template <typename T>
void layer_norm_row(const T* x, const T* gamma, const T* beta, float eps, int64_t d, T* out) {
  auto load = [](const T* v) {
    if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(v);
    else return widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  };
  auto sum8 = [](__m256d& acc, __m256 v) {  // the 8 values of v added to 4 double lanes
    acc = _mm256_add_pd(acc, _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                           _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
  };
  auto total = [](__m256d acc) {
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, acc);
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  };
  const int64_t whole = d / 8 * 8;
  __m256d acc = _mm256_setzero_pd();
  for (int64_t i = 0; i < whole; i += 8) sum8(acc, load(x + i));
  double sum = total(acc);
  for (int64_t i = whole; i < d; ++i) sum += widen(x[i]);
  const double mean = sum / d;
  const __m256d mean4 = _mm256_set1_pd(mean);
  acc = _mm256_setzero_pd();
  for (int64_t i = 0; i < whole; i += 8) {
    const __m256 v = load(x + i);
    const __m256d a = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), mean4);
    const __m256d b = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), mean4);
    acc = _mm256_add_pd(acc, _mm256_add_pd(_mm256_mul_pd(a, a), _mm256_mul_pd(b, b)));
  }
  double squares = total(acc);
  for (int64_t i = whole; i < d; ++i) squares += (widen(x[i]) - mean) * (widen(x[i]) - mean);
  const float m = float(mean), rstd = float(1.0 / std::sqrt(squares / d + eps));
  int64_t i = 0;
  for (; i < whole; i += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(load(x + i), _mm256_set1_ps(m)), _mm256_set1_ps(rstd)),
                                   load(gamma + i));
    const __m256 y = _mm256_add_ps(v, load(beta + i));
    if constexpr (std::is_same_v<T, float>) _mm256_storeu_ps(out + i, y);
    else _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), bf16x8_from_float(y));
  }
  for (; i < d; ++i) out[i] = T((widen(x[i]) - m) * rstd * widen(gamma[i]) + widen(beta[i]));
}

// A row of T into a cache row of fp32 or bf16 (rounded to nearest even).
template <typename T>
void to_cache(const T* src, char* dst, bool bf16, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (bf16) round_into(src, reinterpret_cast<c10::BFloat16*>(dst), n);
    else std::memcpy(dst, src, n * sizeof(float));
  } else {
    if (bf16) std::memcpy(dst, src, n * sizeof(T));
    else for (int64_t i = 0; i < n; ++i) reinterpret_cast<float*>(dst)[i] = widen(src[i]);
  }
}

template <typename T>
torch::Tensor layer_step_typed(const torch::Tensor& x, const torch::Tensor& ln_w, const torch::Tensor& ln_b,
                               double eps, const std::vector<LayerLinear>& attn_in, const LayerLinear& dense,
                               const LayerLinear& fc1, const LayerLinear& fc2, const torch::Tensor& keys,
                               const torch::Tensor& values, int64_t start, const torch::Tensor& cos,
                               const torch::Tensor& sin, const KeyMask& mask, Isa use) {
  const int64_t rows = x.size(0), d = x.size(2), heads = keys.size(1), dim = keys.size(3), ff = fc1.n;
  const int64_t rd = cos.size(2), capacity = keys.size(2);
  const T* xs = reinterpret_cast<const T*>(x.data_ptr());
  const T *gamma = reinterpret_cast<const T*>(ln_w.data_ptr()), *beta = reinterpret_cast<const T*>(ln_b.data_ptr());
  T* h = scratch<T>(1, rows * d);
  T* qkv = scratch<T>(2, rows * 3 * d);
  T* attended = scratch<T>(3, rows * d);
  T* mixed = scratch<T>(4, rows * d);  // attention's output projection
  T* hidden = scratch<T>(5, rows * ff);
  float* x32 = scratch<float>(6, rows * std::max(d, ff));
  float* y32 = scratch<float>(7, rows * std::max(3 * d, ff));

  // LayerNorm, the rows on the threads
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) layer_norm_row(xs + r * d, gamma, beta, float(eps), d, h + r * d);
  });
  const uint16_t* h16 = as_rows(h, rows * d, x32);

  // q, k and v: one fused product or three, rows of [q | k | v] in T
  int64_t column = 0;
  for (const auto& l : attn_in) {
    layer_product(l, x32, h16, rows, y32, use);
    for (int64_t r = 0; r < rows; ++r) round_into(y32 + r * l.n, qkv + r * 3 * d + column, l.n);
    column += l.n;
  }

  // per sequence and head, on the threads: rotary on q and k, k and v into the cache's column `start`, then
  // attention over the columns 0..start (the rows just written are read back from L1)
  const bool wide = use != kAvx2, cache_bf16 = keys.scalar_type() == torch::kBFloat16;
  const int64_t element = cache_bf16 ? 2 : 4;
  const CacheView kv{keys.data_ptr(), cache_bf16, heads * capacity * dim, capacity * dim, start + 1, dim};
  const CacheView vv{values.data_ptr(), cache_bf16, heads * capacity * dim, capacity * dim, start + 1, dim};
  const float *cos_at = cos.data_ptr<float>(), *sin_at = sin.data_ptr<float>();
  over_heads(rows, heads, 2 * (start + 1) * dim, [&](int64_t b, int64_t hd, int64_t) {
    T* q = qkv + b * 3 * d + hd * dim;
    const int64_t angle = (cos.size(0) == 1 ? 0 : b) * rd, at = ((b * heads + hd) * capacity + start) * dim * element;
    rotate_row(q, cos_at + angle, sin_at + angle, rd / 2);
    rotate_row(q + d, cos_at + angle, sin_at + angle, rd / 2);
    to_cache(q + d, static_cast<char*>(keys.data_ptr()) + at, cache_bf16, dim);
    to_cache(q + 2 * d, static_cast<char*>(values.data_ptr()) + at, cache_bf16, dim);
    thread_local std::vector<float> qf, of;
    qf.resize(dim);
    of.resize(dim);
    for (int64_t i = 0; i < dim; ++i) qf[i] = widen(q[i]);
    attend_head(kv, vv, b, hd, rows, heads, qf.data(), float(1.0 / std::sqrt(double(dim))), mask, wide, of.data());
    round_into(of.data(), attended + b * d + hd * dim, dim);
  });

  // the output projection, then the MLP on the same normalized rows
  const uint16_t* a16 = as_rows(attended, rows * d, x32);
  layer_product(dense, x32, a16, rows, y32, use);
  round_into(y32, mixed, rows * d);
  as_rows(h, rows * d, x32);
  layer_product(fc1, x32, h16, rows, y32, use);
  at::parallel_for(0, rows * ff, 1 << 14, [&](int64_t i0, int64_t i1) {  // as gelu_tanh: threads from 16 K values
    round_into(y32 + i0, hidden + i0, i1 - i0);
    if constexpr (std::is_same_v<T, float>) gelu_run(hidden + i0, hidden + i0, i1 - i0);
    else gelu_run(reinterpret_cast<uint16_t*>(hidden + i0), reinterpret_cast<uint16_t*>(hidden + i0), i1 - i0);
  });
  layer_product(fc2, x32, as_rows(hidden, rows * ff, x32), rows, y32, use);

  // x + attention + mlp, rounded after each add as torch's two adds round
  auto out = torch::empty_like(x);
  residual_into(xs, mixed, y32, reinterpret_cast<T*>(out.data_ptr()), rows * d);
  return out;
}

torch::Tensor layer_step(torch::Tensor x, torch::Tensor ln_w, torch::Tensor ln_b, double eps,
                         std::vector<std::vector<torch::Tensor>> linears, torch::Tensor keys, torch::Tensor values,
                         int64_t start, torch::Tensor cos, torch::Tensor sin, c10::optional<torch::Tensor> mask,
                         int64_t isa) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.is_contiguous() &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x must be a contiguous fp32 or bf16 [batch, 1, hidden] tensor (one new token per sequence)");
  const int64_t rows = x.size(0), d = x.size(2);
  for (const auto& t : {ln_w, ln_b})
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.is_contiguous(),
                "LayerNorm weights must be contiguous and of x's dtype");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type() && keys.is_contiguous() && values.is_contiguous() &&
                  (keys.scalar_type() == torch::kFloat32 || keys.scalar_type() == torch::kBFloat16),
              "the cache's keys and values must be contiguous, both fp32 or both bf16");
  TORCH_CHECK(ln_w.numel() == d && ln_b.numel() == d, "LayerNorm weights must have hidden_size values");
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && keys.size(0) == rows &&
                  keys.size(1) * keys.size(3) == d && 0 <= start && start < keys.size(2),
              "keys and values must be [batch, heads, capacity, head_dim] with room at column start");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.sizes() == sin.sizes() && cos.dim() == 3 && (cos.size(0) == 1 || cos.size(0) == rows) &&
                  cos.size(1) == 1 && cos.size(2) % 2 == 0 && cos.size(2) <= keys.size(3),
              "cos and sin must be fp32 [batch or 1, 1, rotary_dim]");
  TORCH_CHECK(linears.size() == 4 || linears.size() == 6, "pass q, k and v (or qkv), dense, fc1 and fc2");
  KeyMask keep{nullptr, 0, 0, 0};
  if (mask.has_value() && mask->defined()) {
    const torch::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == torch::kBool && m.dim() == 4 && (m.size(0) == 1 || m.size(0) == rows) &&
                    m.size(1) == 1 && m.size(2) == 1 && m.size(3) == start + 1,
                "mask must be bool [batch or 1, 1, 1, start + 1]");
    keep = {m.data_ptr<bool>(), m.size(0) == 1 ? 0 : m.stride(0), 0, m.stride(3)};
  }
  std::vector<LayerLinear> attn_in;
  for (size_t i = 0; i + 3 < linears.size(); ++i) attn_in.push_back(layer_linear(linears[i], d));
  const LayerLinear dense = layer_linear(linears[linears.size() - 3], d);
  const LayerLinear fc1 = layer_linear(linears[linears.size() - 2], d);
  const LayerLinear fc2 = layer_linear(linears.back(), fc1.n);
  TORCH_CHECK(dense.n == d && fc2.n == d, "dense and fc2 must give hidden_size outputs");
  int64_t qkv_outputs = 0;
  for (const auto& l : attn_in) qkv_outputs += l.n;
  TORCH_CHECK(qkv_outputs == 3 * d && (attn_in.size() == 1 || attn_in[0].n == d),
              "q, k and v must give hidden_size outputs each");
  const Isa use = pick(isa);
  if (x.scalar_type() == torch::kBFloat16)
    return layer_step_typed<c10::BFloat16>(x, ln_w, ln_b, eps, attn_in, dense, fc1, fc2, keys, values, start, cos,
                                           sin, keep, use);
  return layer_step_typed<float>(x, ln_w, ln_b, eps, attn_in, dense, fc1, fc2, keys, values, start, cos, sin, keep,
                                 use);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_f32", &linear_f32);
  m.def("linear_bf16", &linear_bf16);
  m.def("linear_int8", &linear_int8);
  m.def("linear_int4", &linear_int4);
  m.def("dequantize_int4", &dequantize_int4);
  m.def("attention_step", &attention_step);
  m.def("rotary_", &rotary_);
  m.def("gelu_tanh", &gelu_tanh);
  m.def("layer_step", &layer_step);
  m.def("set_few_rows_many_streams",
        [](bool many, int64_t weight_bytes) { few_rows_many_streams[weight_bytes == 2] = many; });
  m.def("has_avx512", &cpu_has_avx512);
  m.def("has_avx512_bf16", &cpu_has_avx512_bf16);
}
