// MXFP4 expert kernels for the CPU (workbench/model/mxfp4_kernel.py builds this with torch.utils.cpp_extension).
//
// Layout (openai/gpt-oss checkpoints): blocks uint8 [E, O, G, 16] (two FP4 E2M1 codes a byte, low nibble first,
// 32 values a block), scales uint8 [E, O, G] (E8M0). `lut` is float32 [256, 16]: the value of every code under
// every scale, built in Python with transformers' own ldexp, so a decoded weight is bit-equal to the dequantizer.
//
// grouped_matvec: few rows an expert (decode). Each output is a dot product straight from the packed bytes:
//   the codes are decoded in registers (AVX-512: one permute of the scale's 16-entry table; AVX2: a permute of its
//   8 magnitudes and the code's sign bit, bit-equal because the table is sign-symmetric, checked at load),
//   multiplied by float32 activations and summed in float32 over 32 lanes (lane j of block g adds weight j times
//   activation j), the lanes then reduced in one fixed tree. The same bits with AVX-512, AVX2 or neither, and for
//   any thread count (tests/test_mxfp4_kernel.py builds all three).
// dequantize_into: many rows (prefill). One expert's matrix [O, G*32] in float32 or bf16, into a given buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define WORKBENCH_AVX2 1  // AVX2 with FMA (every AVX2 CPU in use has both)
#endif

namespace {

constexpr int64_t kTile = 16;  // output rows per task: 16 x (K/2) packed bytes stay in L1/L2 across row chunks

// The fixed reduction of 32 lanes: pairs (j, j+16), then (j, j+8), (j, j+4), (j, j+2), (0, 1).
inline float reduce32(const float* a) {
  float t[16];
  for (int j = 0; j < 16; ++j) t[j] = a[j] + a[j + 16];
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) t[j] = t[j] + t[j + w];
  return t[0];
}

// Activations with each 32-block de-interleaved to the packed order: [even positions (low nibbles), odd ones].
std::vector<float> deinterleave(const float* x, int64_t n, int64_t K) {
  std::vector<float> xp(n * K);
  for (int64_t i = 0; i < n * K; i += 32)
    for (int j = 0; j < 16; ++j) {
      xp[i + j] = x[i + 2 * j];
      xp[i + 16 + j] = x[i + 2 * j + 1];
    }
  return xp;
}

#if defined(WORKBENCH_AVX2)
// 8 codes (int32 lanes: bits 0-2 pick the magnitude, bit 3 is the sign) against the scale's 8 magnitudes.
inline __m256 decode8(__m256 magnitudes, __m256i codes) {
  const __m256i sign = _mm256_and_si256(_mm256_slli_epi32(codes, 28), _mm256_set1_epi32(INT32_MIN));
  return _mm256_xor_ps(_mm256_permutevar8x32_ps(magnitudes, codes), _mm256_castsi256_ps(sign));
}
#endif

// Output rows decoded side by side (independent accumulators hide the FMA latency of a one-row decode step), by
// instruction set and rows of activations; each output's own sum is in the same order whatever the count.
#if defined(__AVX512F__)
constexpr int kSideBySide[3] = {1, 8, 2};  // measured: one row 1.1x, two rows 1.25x faster on an AVX-512 Xeon
#elif defined(WORKBENCH_AVX2)
constexpr int kSideBySide[3] = {1, 2, 1};  // 16 ymm registers: 4 accumulators an output row and row of x
#else
constexpr int kSideBySide[3] = {1, 1, 1};
#endif

// out[r, o..o+U-1] for rows r < R of xp (stride K): U output rows of one expert.
template <int R, int U>
inline void dot_rows(const uint8_t* blocks, const uint8_t* scales, const float* lut, const float* xp, int64_t K,
                     int64_t o, float* out, int64_t out_stride) {
  const int64_t G = K / 32;
  alignas(64) float acc[U][R][32];
#if defined(__AVX512F__)
  __m512 lo[U][R], hi[U][R];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) lo[u][r] = hi[u][r] = _mm512_setzero_ps();
  const __m512i m15 = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < G; ++g) {
    __m512 xl[R], xh[R];
    for (int r = 0; r < R; ++r) {
      xl[r] = _mm512_loadu_ps(xp + r * K + 32 * g);
      xh[r] = _mm512_loadu_ps(xp + r * K + 32 * g + 16);
    }
    for (int u = 0; u < U; ++u) {
      const __m512 table = _mm512_loadu_ps(lut + 16 * scales[(o + u) * G + g]);
      const __m512i bytes = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + ((o + u) * G + g) * 16)));
      const __m512 wl = _mm512_permutexvar_ps(_mm512_and_si512(bytes, m15), table);
      const __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
      for (int r = 0; r < R; ++r) {
        // the product of an MXFP4 weight and a bf16 activation is exact: fma rounds only the sum, as mul+add would
        lo[u][r] = _mm512_fmadd_ps(wl, xl[r], lo[u][r]);
        hi[u][r] = _mm512_fmadd_ps(wh, xh[r], hi[u][r]);
      }
    }
  }
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) {
      _mm512_store_ps(acc[u][r], lo[u][r]);
      _mm512_store_ps(acc[u][r] + 16, hi[u][r]);
    }
#elif defined(WORKBENCH_AVX2)
  __m256 a[U][R][4];  // lanes 0-7, 8-15 (low nibbles of bytes 0-7, 8-15), 16-23, 24-31 (their high nibbles)
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < 4; ++q) a[u][r][q] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g)
    for (int u = 0; u < U; ++u) {
      const __m256 magnitudes = _mm256_loadu_ps(lut + 16 * scales[(o + u) * G + g]);
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + ((o + u) * G + g) * 16));
      const __m256i b0 = _mm256_cvtepu8_epi32(raw), b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
      const __m256 w[4] = {decode8(magnitudes, b0), decode8(magnitudes, b1),
                           decode8(magnitudes, _mm256_srli_epi32(b0, 4)), decode8(magnitudes, _mm256_srli_epi32(b1, 4))};
      for (int r = 0; r < R; ++r)
        for (int q = 0; q < 4; ++q)
          a[u][r][q] = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(xp + r * K + 32 * g + 8 * q), a[u][r][q]);
    }
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < 4; ++q) _mm256_store_ps(acc[u][r] + 8 * q, a[u][r][q]);
#else
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 32; ++j) acc[u][r][j] = 0.f;
  float w[32];
  for (int64_t g = 0; g < G; ++g)
    for (int u = 0; u < U; ++u) {
      const float* table = lut + 16 * scales[(o + u) * G + g];
      const uint8_t* b = blocks + ((o + u) * G + g) * 16;
      for (int j = 0; j < 16; ++j) {
        w[j] = table[b[j] & 15];
        w[16 + j] = table[b[j] >> 4];
      }
      for (int r = 0; r < R; ++r) {
        const float* x = xp + r * K + 32 * g;
        for (int j = 0; j < 32; ++j) acc[u][r][j] += w[j] * x[j];
      }
    }
#endif
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) out[r * out_stride + o + u] = reduce32(acc[u][r]);
}

// out[r, o] for rows r < R of xp (stride K) and output rows o in [o0, o1) of one expert.
template <int R>
void dot_tile(const uint8_t* blocks, const uint8_t* scales, const float* lut, const float* xp, int64_t K,
              int64_t o0, int64_t o1, float* out, int64_t out_stride) {
  constexpr int U = R < 3 ? kSideBySide[R] : 1;
  int64_t o = o0;
  for (; o + U <= o1; o += U) dot_rows<R, U>(blocks, scales, lut, xp, K, o, out, out_stride);
  for (; o < o1; ++o) dot_rows<R, 1>(blocks, scales, lut, xp, K, o, out, out_stride);
}

using TileFn = void (*)(const uint8_t*, const uint8_t*, const float*, const float*, int64_t, int64_t, int64_t,
                        float*, int64_t);
const TileFn kTiles[8] = {dot_tile<1>, dot_tile<2>, dot_tile<3>, dot_tile<4>,
                          dot_tile<5>, dot_tile<6>, dot_tile<7>, dot_tile<8>};

void check_packed(const at::Tensor& blocks, const at::Tensor& scales, const at::Tensor& lut, int64_t dims) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kByte, "blocks and scales must be uint8");
  TORCH_CHECK(blocks.dim() == dims && blocks.size(-1) == 16 && scales.dim() == dims - 1, "blocks must be [..., O, G, 16], scales [..., O, G]");
  for (int64_t d = 0; d < dims - 1; ++d) TORCH_CHECK(blocks.size(d) == scales.size(d), "blocks and scales disagree in shape");
  TORCH_CHECK(blocks.is_contiguous() && scales.is_contiguous(), "blocks and scales must be contiguous");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 256 * 16 && lut.is_contiguous(), "lut must be float32 [256, 16]");
}

// x: float32 [N, K], rows sorted by expert, counts[e] rows each. Experts with 0 or more than max_rows rows are
// skipped (their rows of the result are left undefined: the caller computes them another way).
at::Tensor grouped_matvec(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& scales,
                          const at::Tensor& lut, at::IntArrayRef counts, int64_t max_rows) {
  check_packed(blocks, scales, lut, 4);
  const int64_t E = blocks.size(0), O = blocks.size(1), G = blocks.size(2), K = 32 * G;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K, "x must be float32 [N, ", K, "]");
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == E, "counts must have one entry per expert");
  const at::Tensor xc = x.contiguous();
  const int64_t N = xc.size(0);
  at::Tensor out = at::empty({N, O}, x.options());
  std::vector<int64_t> starts(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) starts[e + 1] = starts[e] + counts[e];
  TORCH_CHECK(starts[E] == N, "counts sum to ", starts[E], " but x has ", N, " rows");
  const std::vector<float> xp = deinterleave(xc.data_ptr<float>(), N, K);
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (expert, first output row of its tile)
  for (int64_t e = 0; e < E; ++e)
    if (counts[e] > 0 && counts[e] <= max_rows)
      for (int64_t o = 0; o < O; o += kTile) tasks.emplace_back(e, o);
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  const float* lp = lut.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = tasks[t].first, o0 = tasks[t].second, o1 = std::min(O, o0 + kTile);
      const uint8_t* be = bp + e * O * G * 16;
      const uint8_t* se = sp + e * O * G;
      for (int64_t r = starts[e]; r < starts[e + 1]; r += 8) {
        const int64_t rows = std::min<int64_t>(8, starts[e + 1] - r);
        kTiles[rows - 1](be, se, lp, xp.data() + r * K, K, o0, o1, op + r * O, O);
      }
    }
  });
  return out;
}

// One expert's matrix: blocks [O, G, 16], scales [O, G] -> out [O, G*32] (float32 or bfloat16, contiguous).
void dequantize_into(const at::Tensor& blocks, const at::Tensor& scales, const at::Tensor& lut, at::Tensor out) {
  check_packed(blocks, scales, lut, 3);
  const int64_t O = blocks.size(0), G = blocks.size(1), K = 32 * G;
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == O && out.size(1) == K, "out must be contiguous [", O, ", ", K, "]");
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || out.scalar_type() == at::kFloat, "out must be float32 or bfloat16");
  const uint8_t* bp = blocks.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  const float* lp = lut.data_ptr<float>();
  void* base = out.data_ptr();
  at::parallel_for(0, O, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t g = 0; g < G; ++g) {
        const float* table = lp + 16 * sp[o * G + g];
        const uint8_t* b = bp + (o * G + g) * 16;
        const int64_t pos = o * K + 32 * g;
#if defined(__AVX512F__)
        const __m512 tv = _mm512_loadu_ps(table);
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
        const __m512 wl = _mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), tv);
        const __m512 wh = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), tv);
        const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        const __m512 v0 = _mm512_permutex2var_ps(wl, first, wh), v1 = _mm512_permutex2var_ps(wl, second, wh);
        if (bf16) {  // every MXFP4 value is exact in bf16: its float32 bits' upper half
          uint16_t* d = static_cast<uint16_t*>(base) + pos;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(d), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v0), 16)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 16), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v1), 16)));
        } else {
          float* d = static_cast<float*>(base) + pos;
          _mm512_storeu_ps(d, v0);
          _mm512_storeu_ps(d + 16, v1);
        }
#else
        alignas(32) float v[32];
#if defined(WORKBENCH_AVX2)
        const __m256 magnitudes = _mm256_loadu_ps(table);
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
        const __m256i b0 = _mm256_cvtepu8_epi32(raw), b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8));
        for (int h = 0; h < 2; ++h) {  // bytes 0-7, then 8-15: positions 16h .. 16h+15, low nibble first
          const __m256i bytes = h ? b1 : b0;
          const __m256 low = decode8(magnitudes, bytes), high = decode8(magnitudes, _mm256_srli_epi32(bytes, 4));
          const __m256 a = _mm256_unpacklo_ps(low, high), c = _mm256_unpackhi_ps(low, high);  // within 128-bit lanes
          _mm256_store_ps(v + 16 * h, _mm256_permute2f128_ps(a, c, 0x20));
          _mm256_store_ps(v + 16 * h + 8, _mm256_permute2f128_ps(a, c, 0x31));
        }
#else
        for (int j = 0; j < 16; ++j) {
          v[2 * j] = table[b[j] & 15];
          v[2 * j + 1] = table[b[j] >> 4];
        }
#endif
        if (bf16) {
          uint16_t* d = static_cast<uint16_t*>(base) + pos;
          for (int j = 0; j < 32; ++j) {
            uint32_t bits;
            std::memcpy(&bits, &v[j], 4);
            d[j] = static_cast<uint16_t>(bits >> 16);
          }
        } else {
          std::memcpy(static_cast<float*>(base) + pos, v, sizeof v);
        }
#endif
      }
  });
}

std::string variant() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(WORKBENCH_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace

TORCH_LIBRARY(workbench_mxfp4, m) {
  m.def("grouped_matvec(Tensor x, Tensor blocks, Tensor scales, Tensor lut, int[] counts, int max_rows) -> Tensor");
  m.def("dequantize_into(Tensor blocks, Tensor scales, Tensor lut, Tensor(a!) out) -> ()");
  m.def("variant() -> str", variant);
}

TORCH_LIBRARY_IMPL(workbench_mxfp4, CPU, m) {
  m.impl("grouped_matvec", grouped_matvec);
  m.impl("dequantize_into", dequantize_into);
}
