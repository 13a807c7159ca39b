// y = x · Wᵀ straight from packed codes, for a few rows of x (decode, small batches): no fp32 weight is formed.
//
// Codes are `pack`'s layout (mixq/runtime/pack.py): code i of the flattened rows × cols matrix starts at bit
// BITS·i of a little-endian byte stream, so every run of 8 codes is BITS whole bytes. Each group of `group`
// columns of a row has a scale s and either an integer zero z, w = (q − z)·s, or a minimum m, w = q·s + m (s, z or
// m: float32, rows × groups, decoded once by QuantLinear from whatever grid and scale storage the format has).
// With c = m or −z·s,
//     y[n, r] = Σ_g s[r, g] · Σ_{j∈g} q[r, j] · x[n, j]  +  c[r, g] · Σ_{j∈g} x[n, j]
// with the per-group sums of x computed once per call. `dequant` writes the weights themselves, computed exactly
// as the reference does (no fused multiply-add: built with -ffp-contract=off), for longer inputs.
// Level grids (mixq.grids: NF, IQ4_NL) pass their table of 2^BITS levels as `lut`: q stands for lut[q] (looked up
// in registers), and their zero is 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t MAX_N = 8;  // rows of x handled in one pass over the weights

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

// Eight codes (BITS whole bytes) as eight floats. 8 bits: widen the bytes. Up to 4 bits the eight codes fit one
// 32-bit word: broadcast it and shift each lane by its code's offset. Wider: codes 0-3 from the low 32 bits, codes
// 4-7 from the 32 bits that start at code 4.
// WIDE: read whole words (the bytes past the run belong to later codes and are masked off), allowed everywhere
// but at the end of the buffer.
template <int BITS, bool WIDE>
inline __m256i decode8i(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else {
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    if constexpr (BITS * 8 <= 32) {
      uint32_t word = 0;
      std::memcpy(&word, p, WIDE ? 4 : BITS);
      const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
      return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), mask);
    } else {
      uint64_t word = 0;
      std::memcpy(&word, p, WIDE ? 8 : BITS);
      const __m256i lanes = _mm256_setr_epi32(static_cast<uint32_t>(word), static_cast<uint32_t>(word),
                                              static_cast<uint32_t>(word), static_cast<uint32_t>(word),
                                              static_cast<uint32_t>(word >> (4 * BITS)),
                                              static_cast<uint32_t>(word >> (4 * BITS)),
                                              static_cast<uint32_t>(word >> (4 * BITS)),
                                              static_cast<uint32_t>(word >> (4 * BITS)));
      const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 0, BITS, 2 * BITS, 3 * BITS);
      return _mm256_and_si256(_mm256_srlv_epi32(lanes, shifts), mask);
    }
  }
}

// Eight codes as eight floats: the codes themselves, or (LUT) their levels lut[q]. Up to 16 levels stay in two
// registers (a permute each, the fourth bit of q picks between them); more are gathered from memory.
template <int BITS, bool WIDE, bool LUT>
inline __m256 decode8(const uint8_t* p, const float* lut) {
  const __m256i q = decode8i<BITS, WIDE>(p);
  if constexpr (!LUT) {
    return _mm256_cvtepi32_ps(q);
  } else if constexpr (BITS <= 3) {
    return _mm256_permutevar8x32_ps(_mm256_loadu_ps(lut), q);
  } else if constexpr (BITS == 4) {
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(lut), q);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(lut + 8), q);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
  } else {
    return _mm256_i32gather_ps(lut, q, 4);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// RB rows of W (from row r) against NB rows of x, compile-time counts so that every accumulator stays in a
// register: RB × NB independent FMA chains, each x load shared by the RB rows.
template <int BITS, int NB, int RB, bool WIDE, bool LUT>
inline void rows_dot(const uint8_t* packed, const float* a, const float* c, const float* x, const float* xsum,
                     float* y, int64_t rows, int64_t cols, int64_t group, int64_t r, bool minimum, const float* lut) {
  const int64_t groups = cols / group;
  const uint8_t* p[RB];
  for (int i = 0; i < RB; ++i) p[i] = packed + (r + i) * (cols / 8 * BITS);
  __m256 total[RB][NB];
  float offset[RB][NB];
  for (int i = 0; i < RB; ++i)
    for (int b = 0; b < NB; ++b) total[i][b] = _mm256_setzero_ps(), offset[i][b] = 0;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 d[RB][NB];
    for (int i = 0; i < RB; ++i)
      for (int b = 0; b < NB; ++b) d[i][b] = _mm256_setzero_ps();
    for (int64_t j = g * group, end = (g + 1) * group; j < end; j += 8) {
      __m256 xv[NB];
      for (int b = 0; b < NB; ++b) xv[b] = _mm256_loadu_ps(x + b * cols + j);
      for (int i = 0; i < RB; ++i) {
        const __m256 q = decode8<BITS, WIDE, LUT>(p[i], lut);
        p[i] += BITS;
        for (int b = 0; b < NB; ++b) d[i][b] = _mm256_fmadd_ps(q, xv[b], d[i][b]);
      }
    }
    for (int i = 0; i < RB; ++i) {
      const float sg = a[(r + i) * groups + g];
      const __m256 ag = _mm256_set1_ps(sg);
      const float cg = minimum ? c[(r + i) * groups + g] : -c[(r + i) * groups + g] * sg;
      for (int b = 0; b < NB; ++b) {
        total[i][b] = _mm256_fmadd_ps(d[i][b], ag, total[i][b]);
        offset[i][b] += cg * xsum[b * groups + g];
      }
    }
  }
  for (int i = 0; i < RB; ++i)
    for (int b = 0; b < NB; ++b) y[b * rows + r + i] = hsum(total[i][b]) + offset[i][b];
}

// rows r0..r1 in blocks of RB (then one at a time); the block that holds the last row reads no word past it
template <int BITS, int NB, int RB, bool LUT>
void rows_nb(const uint8_t* packed, const float* a, const float* c, const float* x, const float* xsum, float* y,
             int64_t rows, int64_t cols, int64_t group, int64_t r0, int64_t r1, bool minimum, const float* lut) {
  int64_t r = r0;
  for (; r + RB <= r1; r += RB) {
    if (r + RB == rows)
      rows_dot<BITS, NB, RB, false, LUT>(packed, a, c, x, xsum, y, rows, cols, group, r, minimum, lut);
    else
      rows_dot<BITS, NB, RB, true, LUT>(packed, a, c, x, xsum, y, rows, cols, group, r, minimum, lut);
  }
  for (; r < r1; ++r) {
    if (r + 1 == rows)
      rows_dot<BITS, NB, 1, false, LUT>(packed, a, c, x, xsum, y, rows, cols, group, r, minimum, lut);
    else
      rows_dot<BITS, NB, 1, true, LUT>(packed, a, c, x, xsum, y, rows, cols, group, r, minimum, lut);
  }
}

template <int BITS, bool LUT>
void gemv_rows(const uint8_t* packed, const float* a, const float* c, const float* x, const float* xsum,
               float* y, int64_t n, int64_t rows, int64_t cols, int64_t group, int64_t r0, int64_t r1,
               bool minimum, const float* lut) {
  // n ≤ MAX_N rows of x, taken 4, 2 and 1 at a time, with 1, 2 and 4 rows of W per pass
  const int64_t groups = cols / group;
  for (int64_t b = 0; b < n;) {
    const float *xb = x + b * cols, *sb = xsum + b * groups;
    float* yb = y + b * rows;
    if (n - b >= 4) {
      rows_nb<BITS, 4, 1, LUT>(packed, a, c, xb, sb, yb, rows, cols, group, r0, r1, minimum, lut);
      b += 4;
    } else if (n - b >= 2) {
      rows_nb<BITS, 2, 2, LUT>(packed, a, c, xb, sb, yb, rows, cols, group, r0, r1, minimum, lut);
      b += 2;
    } else {
      rows_nb<BITS, 1, 4, LUT>(packed, a, c, xb, sb, yb, rows, cols, group, r0, r1, minimum, lut);
      b += 1;
    }
  }
}
// The weights of rows r0..r1, as the reference computes them: (q − z)·s, or q·s + m (q: lut[q] with LUT).
template <int BITS, bool LUT>
void dequant_rows(const uint8_t* packed, const float* s, const float* zm, float* out, int64_t rows, int64_t cols,
                  int64_t group, int64_t r0, int64_t r1, bool minimum, const float* lut) {
  const int64_t groups = cols / group;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* p = packed + r * (cols / 8 * BITS);
    float* o = out + r * cols;
    const bool last = r + 1 == rows;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 sg = _mm256_set1_ps(s[r * groups + g]), zg = _mm256_set1_ps(zm[r * groups + g]);
      for (int64_t j = g * group; j < (g + 1) * group; j += 8, p += BITS) {
        const __m256 q = last ? decode8<BITS, false, LUT>(p, lut) : decode8<BITS, true, LUT>(p, lut);
        _mm256_storeu_ps(o + j, minimum ? _mm256_add_ps(_mm256_mul_ps(q, sg), zg)
                                        : _mm256_mul_ps(_mm256_sub_ps(q, zg), sg));
      }
    }
  }
}

// fp16 weights (an embedding table kept as it is stored, used as the output head): RB rows of W against one or
// more rows of x, the halves widened to float32 in registers (F16C), accumulated in float32.
template <int RB>
inline void half_rows(const uint16_t* w, const float* x, float* y, int64_t n, int64_t rows, int64_t cols,
                      int64_t r) {
  for (int64_t b = 0; b < n; ++b) {
    __m256 acc[RB];
    for (int i = 0; i < RB; ++i) acc[i] = _mm256_setzero_ps();
    const float* xb = x + b * cols;
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      const __m256 xv = _mm256_loadu_ps(xb + j);
      for (int i = 0; i < RB; ++i) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (r + i) * cols + j));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtph_ps(h), xv, acc[i]);
      }
    }
    for (int i = 0; i < RB; ++i) {
      float tail = 0;
      for (int64_t k = j; k < cols; ++k) tail += _cvtsh_ss(w[(r + i) * cols + k]) * xb[k];
      y[b * rows + r + i] = hsum(acc[i]) + tail;
    }
  }
}

void half_gemv(const uint16_t* w, const float* x, float* y, int64_t n, int64_t rows, int64_t cols, int64_t r0,
               int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) half_rows<4>(w, x, y, n, rows, cols, r);
  for (; r < r1; ++r) half_rows<1>(w, x, y, n, rows, cols, r);
}
#else
template <int BITS, bool LUT>
void gemv_rows(const uint8_t* packed, const float* a, const float* c, const float* x, const float* xsum,
               float* y, int64_t n, int64_t rows, int64_t cols, int64_t group, int64_t r0, int64_t r1,
               bool minimum, const float* lut) {
  constexpr uint64_t MASK = (1u << BITS) - 1;
  const int64_t groups = cols / group;
  const int64_t row_bytes = cols / 8 * BITS;
  for (int64_t r = r0; r < r1; ++r) {
    float out[MAX_N] = {0};
    const uint8_t* p = packed + r * row_bytes;
    for (int64_t g = 0; g < groups; ++g) {
      float dot[MAX_N] = {0};
      for (int64_t j = g * group; j < (g + 1) * group; j += 8, p += BITS) {
        uint64_t word = 0;
        std::memcpy(&word, p, BITS);
        for (int64_t b = 0; b < n; ++b)
          for (int k = 0; k < 8; ++k) {
            const uint64_t q = (word >> (k * BITS)) & MASK;
            dot[b] += (LUT ? lut[q] : static_cast<float>(q)) * x[b * cols + j + k];
          }
      }
      const float sg = a[r * groups + g], cg = minimum ? c[r * groups + g] : -c[r * groups + g] * sg;
      for (int64_t b = 0; b < n; ++b) out[b] += sg * dot[b] + cg * xsum[b * groups + g];
    }
    for (int64_t b = 0; b < n; ++b) y[b * rows + r] = out[b];
  }
}
template <int BITS, bool LUT>
void dequant_rows(const uint8_t* packed, const float* s, const float* zm, float* out, int64_t rows, int64_t cols,
                  int64_t group, int64_t r0, int64_t r1, bool minimum, const float* lut) {
  constexpr uint64_t MASK = (1u << BITS) - 1;
  const int64_t groups = cols / group;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* p = packed + r * (cols / 8 * BITS);
    for (int64_t j = 0; j < cols; j += 8, p += BITS) {
      uint64_t word = 0;
      std::memcpy(&word, p, BITS);
      const float sg = s[r * groups + j / group], zg = zm[r * groups + j / group];
      for (int k = 0; k < 8; ++k) {
        const uint64_t code = (word >> (k * BITS)) & MASK;
        const float q = LUT ? lut[code] : static_cast<float>(code);
        out[r * cols + j + k] = minimum ? q * sg + zg : (q - zg) * sg;
      }
    }
  }
}

void half_gemv(const uint16_t* w, const float* x, float* y, int64_t n, int64_t rows, int64_t cols, int64_t r0,
               int64_t r1) {
  const c10::Half* h = reinterpret_cast<const c10::Half*>(w);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < n; ++b) {
      float acc = 0;
      for (int64_t j = 0; j < cols; ++j) acc += static_cast<float>(h[r * cols + j]) * x[b * cols + j];
      y[b * rows + r] = acc;
    }
}
#endif

using Kernel = void (*)(const uint8_t*, const float*, const float*, const float*, const float*, float*, int64_t,
                        int64_t, int64_t, int64_t, int64_t, int64_t, bool, const float*);
using Dequant = void (*)(const uint8_t*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                         int64_t, bool, const float*);

template <template <int, bool> class F, typename T, bool LUT>
T for_bits(int64_t bits) {
  switch (bits) {
    case 2: return F<2, LUT>::fn;
    case 3: return F<3, LUT>::fn;
    case 4: return F<4, LUT>::fn;
    case 5: return F<5, LUT>::fn;
    case 6: return F<6, LUT>::fn;
    case 7: return F<7, LUT>::fn;
    case 8: return F<8, LUT>::fn;
  }
  TORCH_CHECK(false, "codes of ", bits, " bits are not supported (2 to 8)");
}

template <template <int, bool> class F, typename T>
T for_bits(int64_t bits, bool lut) {
  return lut ? for_bits<F, T, true>(bits) : for_bits<F, T, false>(bits);
}

template <int B, bool L> struct GemvOf { static constexpr Kernel fn = gemv_rows<B, L>; };
template <int B, bool L> struct DequantOf { static constexpr Dequant fn = dequant_rows<B, L>; };

// The level table: empty (uniform grids, q itself), or 2^bits float32 levels.
const float* levels(const torch::Tensor& lut, int64_t bits) {
  if (lut.numel() == 0) return nullptr;
  TORCH_CHECK(lut.dtype() == torch::kFloat && lut.is_contiguous() && lut.numel() == (int64_t{1} << bits),
              "a level table is 2^bits contiguous float32 levels");
  return lut.data_ptr<float>();
}

void check(const torch::Tensor& packed, const torch::Tensor& s, const torch::Tensor& zm, int64_t cols,
           int64_t bits, int64_t group) {
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.is_contiguous(), "packed codes must be contiguous uint8");
  TORCH_CHECK(s.dtype() == torch::kFloat && zm.dtype() == torch::kFloat && s.sizes() == zm.sizes(),
              "scales and zeros (or minima) must be float32 rows × groups");
  TORCH_CHECK(group % 8 == 0 && cols == s.size(1) * group, "groups must be multiples of 8 that tile the row");
  TORCH_CHECK(packed.numel() >= s.size(0) * cols / 8 * bits, "too few packed bytes for ", s.size(0), " × ", cols);
}

// Binary coding (mixq.grids.bcq, runtime/bcq.py): planes[i, jb, r] holds plane i's signs of row r's columns
// 8·jb … 8·jb + 7 (bit t: column 8·jb + t, set: +1) and alpha[g, i, r] its α. For a row of x, lut[jb · 256 + p] =
// Σ_t ±x[8·jb + t] (+ where bit t of p is set) is formed once; then
//     y[r] = Σ_g Σ_i alpha[g, i, r] · Σ_{jb∈g} lut[jb · 256 + planes[i, jb, r]]
// (BiQGEMM, Jeon et al. 2020): a look-up per 8 weights of a plane, no weight decoded.
void bcq_lut(const float* x, float* lut, int64_t blocks) {
  for (int64_t jb = 0; jb < blocks; ++jb) {
    const float* xs = x + 8 * jb;
    float* t = lut + 256 * jb;
    t[0] = -(xs[0] + xs[1] + xs[2] + xs[3] + xs[4] + xs[5] + xs[6] + xs[7]);
    for (int p = 1; p < 256; ++p) t[p] = t[p & (p - 1)] + 2 * xs[__builtin_ctz(p)];  // one sign flipped to +
  }
}

void bcq_rows(const uint8_t* planes, const float* alpha, const float* lut, float* y, int64_t rows, int64_t blocks,
              int64_t bits, int64_t group, int64_t r0, int64_t r1) {
  const int64_t per = group / 8, groups = blocks / per;
  int64_t r = r0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  for (; r + 8 <= r1; r += 8) {  // 8 rows at once: each plane's 8 bytes index 8 look-ups (a gather)
    __m256 total = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t i = 0; i < bits; ++i) {
        __m256 acc = _mm256_setzero_ps();
        const uint8_t* p = planes + (i * blocks + g * per) * rows + r;
        for (int64_t jb = g * per; jb < (g + 1) * per; ++jb, p += rows) {
          const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
          acc = _mm256_add_ps(acc, _mm256_i32gather_ps(lut + jb * 256, idx, 4));
        }
        total = _mm256_fmadd_ps(acc, _mm256_loadu_ps(alpha + (g * bits + i) * rows + r), total);
      }
    _mm256_storeu_ps(y + r, total);
  }
#endif
  for (; r < r1; ++r) {
    float total = 0;
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t i = 0; i < bits; ++i) {
        float acc = 0;
        for (int64_t jb = g * per; jb < (g + 1) * per; ++jb)
          acc += lut[jb * 256 + planes[(i * blocks + jb) * rows + r]];
        total += acc * alpha[(g * bits + i) * rows + r];
      }
    y[r] = total;
  }
}

// Lattice codebooks (runtime/lattice.py): each run of RUN (8 or 4) weights is point `idx` of a K × RUN float table,
// idx = qs[r, u] | the HIGH high bits of qh[r, u / PER] (PER = 8 / HIGH runs a byte), each weight's sign a bit of
// signs[r, j / 8]; w = scale[r, g] · (±point). Every 8 columns are decoded once (one or two points, their signs, times
// the group's scale) and multiplied into each of the n ≤ MAX_N rows of x. RUN and HIGH are template arguments so that
// the index arithmetic is shifts and masks, and the scale is looked up once a group.
template <int HIGH>
inline int64_t iq_index(const uint8_t* qs, const uint8_t* qh, int64_t u) {
  constexpr int PER = 8 / HIGH;
  return qs[u] | (((qh[u / PER] >> (HIGH * (u % PER))) & ((1 << HIGH) - 1)) << 8);
}

template <int RUN, int HIGH>
void iq_rows(const uint8_t* qs, const uint8_t* qh, const uint8_t* sg, const float* scales, const float* points,
             const float* x, float* y, int64_t n, int64_t rows, int64_t cols, int64_t group, int64_t r0, int64_t r1) {
  const int64_t runs = cols / RUN, groups = cols / group, per_group = group / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t *pq = qs + r * runs, *ph = qh + r * (cols / 32), *ps = sg + r * (cols / 8);
    const float* psc = scales + r * groups;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 acc[MAX_N];
    for (int64_t b = 0; b < n; ++b) acc[b] = _mm256_setzero_ps();
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i top = _mm256_set1_epi32(INT32_MIN);
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 s = _mm256_set1_ps(psc[g]);
      for (int64_t jb = g * per_group; jb < (g + 1) * per_group; ++jb) {
        __m256 v;
        if constexpr (RUN == 8) {
          v = _mm256_loadu_ps(points + 8 * iq_index<HIGH>(pq, ph, jb));
        } else {
          v = _mm256_set_m128(_mm_loadu_ps(points + 4 * iq_index<HIGH>(pq, ph, 2 * jb + 1)),
                              _mm_loadu_ps(points + 4 * iq_index<HIGH>(pq, ph, 2 * jb)));
        }
        const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(ps[jb]), bit), bit);
        v = _mm256_mul_ps(_mm256_xor_ps(v, _mm256_castsi256_ps(_mm256_and_si256(set, top))), s);  // − where set
        for (int64_t b = 0; b < n; ++b) acc[b] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + b * cols + 8 * jb), acc[b]);
      }
    }
    for (int64_t b = 0; b < n; ++b) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[b]), _mm256_extractf128_ps(acc[b], 1));
      h = _mm_hadd_ps(h, h);
      y[b * rows + r] = _mm_cvtss_f32(_mm_hadd_ps(h, h));
    }
#else
    float acc[MAX_N] = {0};
    for (int64_t u = 0; u < runs; ++u) {
      const float* p = points + RUN * iq_index<HIGH>(pq, ph, u);
      for (int64_t t = 0; t < RUN; ++t) {
        const int64_t j = u * RUN + t;
        const float w = ((ps[j / 8] >> (j % 8)) & 1 ? -p[t] : p[t]) * psc[j / group];
        for (int64_t b = 0; b < n; ++b) acc[b] += w * x[b * cols + j];
      }
    }
    for (int64_t b = 0; b < n; ++b) y[b * rows + r] = acc[b];
#endif
  }
}

}  // namespace

torch::Tensor iq_gemv(torch::Tensor qs, torch::Tensor qh, torch::Tensor signs, torch::Tensor scales,
                      torch::Tensor points, torch::Tensor x, int64_t group, int64_t index_bits) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2, "x must be float32 n × cols");
  x = x.contiguous();
  const int64_t n = x.size(0), cols = x.size(1), rows = qs.size(0);
  TORCH_CHECK(points.dtype() == torch::kFloat && points.is_contiguous() && points.dim() == 2 &&
              (points.size(1) == 8 || points.size(1) == 4), "points must be contiguous float32 K × 8 or K × 4");
  const int64_t run = points.size(1);
  TORCH_CHECK((run == 8 && index_bits == 10) || (run == 4 && index_bits == 9),
              "runs of 8 take 10-bit indices (IQ2_S), runs of 4 9-bit ones (IQ3_S)");
  TORCH_CHECK(cols % 32 == 0 && group % 8 == 0 && cols % group == 0, "rows of a multiple of 32, groups of 8s");
  for (const auto& t : {qs, qh, signs})
    TORCH_CHECK(t.dtype() == torch::kUInt8 && t.is_contiguous() && t.dim() == 2 && t.size(0) == rows,
                "qs, qh and signs must be contiguous uint8 rows × …");
  TORCH_CHECK(qs.size(1) == cols / run && qh.size(1) == cols / 32 && signs.size(1) == cols / 8,
              "qs, qh and signs must hold cols / run, cols / 32 and cols / 8 bytes a row");
  TORCH_CHECK(scales.dtype() == torch::kFloat && scales.is_contiguous() && scales.size(0) == rows &&
              scales.size(1) == cols / group, "scales must be contiguous float32 rows × groups");
  auto y = torch::empty({n, rows}, x.options());
  for (int64_t b0 = 0; b0 < n; b0 += MAX_N) {
    const int64_t nb = std::min(MAX_N, n - b0);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      auto k = run == 8 ? iq_rows<8, 2> : iq_rows<4, 1>;
      k(qs.data_ptr<uint8_t>(), qh.data_ptr<uint8_t>(), signs.data_ptr<uint8_t>(), scales.data_ptr<float>(),
        points.data_ptr<float>(), x.data_ptr<float>() + b0 * cols, y.data_ptr<float>() + b0 * rows, nb, rows, cols,
        group, r0, r1);
    });
  }
  return y;
}

torch::Tensor bcq_gemv(torch::Tensor planes, torch::Tensor alpha, torch::Tensor x, int64_t group) {
  TORCH_CHECK(planes.dtype() == torch::kUInt8 && planes.is_contiguous() && planes.dim() == 3,
              "planes must be contiguous uint8 bits × cols/8 × rows");
  const int64_t bits = planes.size(0), blocks = planes.size(1), rows = planes.size(2);
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2 && x.size(1) == blocks * 8, "x must be float32 n × cols");
  TORCH_CHECK(group % 8 == 0 && (blocks * 8) % group == 0, "groups must be multiples of 8 that tile the row");
  TORCH_CHECK(alpha.dtype() == torch::kFloat && alpha.is_contiguous() && alpha.numel() == blocks * 8 / group * bits
              * rows, "alpha must be contiguous float32 groups × bits × rows");
  x = x.contiguous();
  const int64_t n = x.size(0);
  auto y = torch::empty({n, rows}, x.options());
  std::vector<float> lut(blocks * 256);
  for (int64_t b = 0; b < n; ++b) {
    bcq_lut(x.data_ptr<float>() + b * blocks * 8, lut.data(), blocks);
    float* py = y.data_ptr<float>() + b * rows;
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      bcq_rows(planes.data_ptr<uint8_t>(), alpha.data_ptr<float>(), lut.data(), py, rows, blocks, bits, group, r0,
               r1);
    });
  }
  return y;
}

torch::Tensor qgemv(torch::Tensor packed, torch::Tensor a, torch::Tensor c, torch::Tensor x, int64_t bits,
                    int64_t group, bool minimum, torch::Tensor lut) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2, "x must be float32 n × cols");
  a = a.contiguous();
  c = c.contiguous();
  x = x.contiguous();
  const int64_t rows = a.size(0), groups = a.size(1), n = x.size(0), cols = x.size(1);
  check(packed, a, c, cols, bits, group);
  auto y = torch::empty({n, rows}, x.options());
  const float* pl = levels(lut, bits);
  Kernel k = for_bits<GemvOf, Kernel>(bits, pl != nullptr);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float *pa = a.data_ptr<float>(), *pc = c.data_ptr<float>(), *px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  std::vector<float> xsum(n * groups, 0.f);  // Σ_{j∈g} x[b, j], for the offsets c
  for (int64_t b = 0; b < n; ++b)
    for (int64_t j = 0; j < cols; ++j) xsum[b * groups + j / group] += px[b * cols + j];
  for (int64_t b0 = 0; b0 < n; b0 += MAX_N) {  // the weights are read once per block of MAX_N rows of x
    const int64_t nb = std::min(MAX_N, n - b0);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      k(pp, pa, pc, px + b0 * cols, xsum.data() + b0 * groups, py + b0 * rows, nb, rows, cols, group, r0, r1,
        minimum, pl);
    });
  }
  return y;
}

torch::Tensor dequant(torch::Tensor packed, torch::Tensor s, torch::Tensor zm, int64_t cols, int64_t bits,
                      int64_t group, bool minimum, torch::Tensor lut) {
  s = s.contiguous();
  zm = zm.contiguous();
  check(packed, s, zm, cols, bits, group);
  const int64_t rows = s.size(0);
  auto out = torch::empty({rows, cols}, s.options());
  const float* pl = levels(lut, bits);
  Dequant k = for_bits<DequantOf, Dequant>(bits, pl != nullptr);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float *ps = s.data_ptr<float>(), *pz = zm.data_ptr<float>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    k(pp, ps, pz, po, rows, cols, group, r0, r1, minimum, pl);
  });
  return out;
}

torch::Tensor hgemv(torch::Tensor w, torch::Tensor x) {
  TORCH_CHECK(w.dtype() == torch::kHalf && w.is_contiguous() && w.dim() == 2, "w must be contiguous fp16 rows");
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2 && x.size(1) == w.size(1), "x must be float32 n × cols");
  x = x.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1), n = x.size(0);
  auto y = torch::empty({n, rows}, x.options());
  const uint16_t* pw = reinterpret_cast<const uint16_t*>(w.data_ptr<at::Half>());
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) { half_gemv(pw, px, py, n, rows, cols, r0, r1); });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemv", &qgemv, "x · Wᵀ from packed codes and per-group (s, z or m): w = (q − z)·s or q·s + m; with a "
        "level table lut, q stands for lut[q]");
  m.def("dequant", &dequant, "the rows × cols weights from packed codes, per-group (s, z or m) and a level table "
        "(or none), exactly");
  m.def("hgemv", &hgemv, "x · Wᵀ for fp16 W, float32 x and result");
  m.def("iq_gemv", &iq_gemv, "x · Wᵀ for lattice-coded W (point indices, their high bits, signs, float32 scales "
        "rows × groups, the codebook's points)");
  m.def("bcq_gemv", &bcq_gemv, "x · Wᵀ for binary-coded W (bit planes, α groups × bits × rows) by look-up tables of "
        "the signed sums of every 8 inputs");
}
