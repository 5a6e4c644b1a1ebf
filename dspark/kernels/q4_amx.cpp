// 4-bit block weights times bf16 activations on Intel AMX (--weights q4: dspark/models/q4.py;
// built and loaded by dspark/kernels/native.py).
//
// The weights arrive packed by q4_amx_pack: for every block of 16 outputs and every group of 32
// inputs, 256 bytes of codes, two outputs to a run of 32 bytes (byte j holds input j of the
// even output in its low nibble and of the odd one in its high nibble), then the fp16 factors d
// and m of the 16 outputs: value = code * d + m.  A call expands each block of 16 outputs once,
// for every row of x at once, into a bf16 tile whose rows are the outputs: for a pair of
// outputs it computes their 32 possible values (each rounded once from its exact fp32 value,
// the same bf16 number the dense path holds) and looks every code up in that table with one
// permutation per output.  The tile unit multiplies those tiles by x, transposed, with
// TDPBF16PS, which accumulates in fp32.  The order of accumulation for one output does not
// depend on how many rows x has or which thread runs it: one row's result is the same bits
// whatever it is batched with.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

#include "amx_tiles.h"

namespace {

constexpr int kGroup = 32;       // inputs per block of codes (one AMX tile's depth in bf16)
constexpr int kRows = 16;        // outputs per block (one AMX tile's width in fp32)
constexpr int kAhead = 8;        // groups of codes asked for ahead of the one being expanded
constexpr int kSlots = 8;        // expanded groups kept in a one-pass product (a ring in L1)

using dspark_amx::request_amx;
using dspark_amx::TileConfig;

// Tiles 0 and 1 hold two chunks of rows of x, transposed (16 rows of input pairs, 4 bytes per
// row of x), 2 and 3 the expanded groups of two blocks of outputs (16 outputs x 32 inputs), 4..7
// the four accumulators (block 0 x chunk 0, 1 x 0, 0 x 1, 1 x 1), 16 outputs x the chunk's rows.
// A chunk has 16 rows of x, or fewer when x has fewer.
void configure_tiles(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = t == 2 || t == 3 ? 64 : 4 * rows;
  }
  asm volatile("" ::: "memory");  // ldtilecfg reads all 64 bytes; the intrinsic declares fewer
  _tile_loadconfig(&cfg);
}

// A block format: the bytes of one group of 16 outputs x 32 inputs, and how they expand into
// the group's weight tile, 16 rows (outputs) x 32 bf16 inputs.
struct Q4 {  // 4-bit codes, value = code * d + m (the GGUF file's Q4_0 / Q4_1 layers)
  static constexpr int kBlockBytes = 256 + 2 * kRows * 2;  // codes, then d[16] and m[16] in fp16
  static constexpr const char* kName = "q4_amx_mm";
  static void expand_group(const uint8_t* block, uint16_t* tile);
};

struct Q8 {  // 8-bit codes, value = code * d (the file's Q8_0 embedding, used as the LM head)
  static constexpr int kBlockBytes = 16 * kGroup + 2 * kRows;  // codes [output][input], then d[16]
  static constexpr const char* kName = "q8_amx_mm";
  static void expand_group(const uint8_t* block, uint16_t* tile) {
    alignas(64) float d[kRows];
    _mm512_store_ps(d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 16 * kGroup))));
    for (int n = 0; n < kRows; ++n) {
      // code * d is exact in fp32 (8 bits times 11), then rounded once to bf16.
      const __m512 s = _mm512_set1_ps(d[n]);
      const __m512i c = _mm512_loadu_si512(block + kGroup * n);  // this output's 32 codes, then 32 more bytes of the block
      const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(c))), s);
      const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(c, 1))), s);
      _mm512_store_si512(reinterpret_cast<__m512i*>(tile + kGroup * n), reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
  }
};

inline void Q4::expand_group(const uint8_t* block, uint16_t* tile) {
  alignas(64) float d[kRows], m[kRows];
  _mm512_store_ps(d, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 256))));
  _mm512_store_ps(m, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 288))));
  const __m512 codes = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i low = _mm512_set1_epi16(15), odd = _mm512_set1_epi16(16);
  for (int p = 0; p < kRows / 2; ++p) {
    // Words 0..15: the even output's value for codes 0..15; words 16..31: the odd output's.
    const __m512 even = _mm512_fmadd_ps(codes, _mm512_set1_ps(d[2 * p]), _mm512_set1_ps(m[2 * p]));
    const __m512 other = _mm512_fmadd_ps(codes, _mm512_set1_ps(d[2 * p + 1]), _mm512_set1_ps(m[2 * p + 1]));
    const __m512i table = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(other, even));
    const __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32 * p)));
    const __m512i first = _mm512_and_si512(c, low);
    const __m512i second = _mm512_or_si512(_mm512_srli_epi16(c, 4), odd);
    _mm512_store_si512(reinterpret_cast<__m512i*>(tile + 64 * p), _mm512_permutexvar_epi16(first, table));
    _mm512_store_si512(reinterpret_cast<__m512i*>(tile + 64 * p + 32), _mm512_permutexvar_epi16(second, table));
  }
}

// Multiplies one or two blocks of outputs, whose expanded groups are panel[group][block], by one
// or two chunks of rows of x (tiles [group] at x and x + chunk_stride, `stride` bytes per tile
// row), into out[chunk][block][output][row of the chunk].  With `expanding` set it first expands
// (from `weights`, the two blocks' packed groups, `next` bytes apart; panel slot g % slots for
// group g), then it expands each group into the panel one group ahead of the tile unit, so that
// the vector units expand while the tile unit multiplies.
template <class Format>
void multiply(uint16_t* panel, int slots, bool expanding, const uint8_t* weights, int64_t next, const uint16_t* x,
              int64_t tile, int64_t stride, int64_t chunk_stride, int64_t out_tile, int groups, bool two_chunks,
              bool two_blocks, float* out) {
  // Tile register numbers are immediates, hence the spelled-out cases.
  _tile_zero(4);
  if (two_blocks) _tile_zero(5);
  if (two_chunks) _tile_zero(6);
  if (two_chunks && two_blocks) _tile_zero(7);
  auto expand = [&](int g) {
    // The codes stream from memory once per product; asking for them a few groups ahead keeps
    // enough reads in flight (alone, the expansion streamed 1.4x faster with it than without).
    constexpr int bytes = Format::kBlockBytes;
    for (int line = 0; line < bytes; line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(weights + (g + kAhead) * bytes + line), _MM_HINT_T0);
      if (two_blocks) _mm_prefetch(reinterpret_cast<const char*>(weights + next + (g + kAhead) * bytes + line), _MM_HINT_T0);
    }
    Format::expand_group(weights + g * bytes, panel + 1024 * (g % slots));
    if (two_blocks) Format::expand_group(weights + next + g * bytes, panel + 1024 * (g % slots) + 512);
    // The tile loads below read the panel through asm the compiler does not see reading memory.
    asm volatile("" ::: "memory");
  };
  if (expanding) expand(0);
  for (int g = 0; g < groups; ++g) {
    const uint16_t* xg = x + tile * g;
    const uint16_t* wg = panel + 1024 * (g % slots);
    _tile_loadd(0, xg, stride);
    _tile_loadd(2, wg, 64);
    _tile_dpbf16ps(4, 2, 0);
    if (two_blocks) {
      _tile_loadd(3, wg + 512, 64);
      _tile_dpbf16ps(5, 3, 0);
    }
    if (two_chunks) {
      _tile_loadd(1, xg + chunk_stride, stride);
      _tile_dpbf16ps(6, 2, 1);
      if (two_blocks) _tile_dpbf16ps(7, 3, 1);
    }
    if (expanding && g + 1 < groups) expand(g + 1);
  }
  _tile_stored(4, out, stride);
  if (two_blocks) _tile_stored(5, out + out_tile, stride);
  if (two_chunks) _tile_stored(6, out + 2 * out_tile, stride);
  if (two_chunks && two_blocks) _tile_stored(7, out + 3 * out_tile, stride);
}

// Transposes 16 x 16 32-bit values: row i of `in` holds m[i][0..15], row j of `out` m[0..15][j].
inline void transpose16(const __m512i in[16], __m512i out[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane L: m[i..i+1][4L..4L+1], m[i..i+1][4L+2..4L+3]
    t[i] = _mm512_unpacklo_epi32(in[i], in[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(in[i], in[i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // u[4g + c], lane L: m[4g..4g+3][4L + c]
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // gather lane L of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), w0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const __m512i v1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    out[c] = _mm512_shuffle_i32x4(v0, v1, 0x88);
    out[8 + c] = _mm512_shuffle_i32x4(v0, v1, 0xdd);
    out[4 + c] = _mm512_shuffle_i32x4(w0, w1, 0x88);
    out[12 + c] = _mm512_shuffle_i32x4(w0, w1, 0xdd);
  }
}

// x [M, K] as 32-bit pairs of inputs -> [chunk of tile_rows rows][group][pair][row]: one B tile
// per chunk and group.  Rows from M to `rows` (the last chunk's padding) are zeros.
void transpose_rows(const uint32_t* src, uint32_t* dst, int64_t M, int64_t rows, int64_t groups, int tile_rows) {
  const int64_t half = groups * 16;
  const __mmask16 keep = static_cast<__mmask16>((1u << tile_rows) - 1);
  __m512i in[16], out[16];
  for (int64_t chunk = 0; chunk < rows / tile_rows; ++chunk) {
    for (int64_t g = 0; g < groups; ++g) {
      for (int t = 0; t < 16; ++t) {
        const int64_t r = chunk * tile_rows + t;
        in[t] = t < tile_rows && r < M ? _mm512_loadu_si512(src + r * half + 16 * g) : _mm512_setzero_si512();
      }
      transpose16(in, out);
      uint32_t* tile = dst + (chunk * groups + g) * 16 * tile_rows;
      for (int k = 0; k < 16; ++k) _mm512_mask_storeu_epi32(tile + k * tile_rows, keep, out[k]);
    }
  }
}

template <class Format>
at::Tensor amx_mm(const at::Tensor& x_in, const at::Tensor& packed, int64_t out_features) {
  constexpr int kBlockBytes = Format::kBlockBytes;
  const char* name = Format::kName;
  static const bool amx = request_amx();
  TORCH_CHECK(amx, name, ": this process cannot use AMX tiles");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, name, ": x must be [M, K] bf16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous(),
              name, ": packed must be a contiguous uint8 vector");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = out_features;
  TORCH_CHECK(K > 0 && K % kGroup == 0 && N > 0 && N % kRows == 0,
              name, ": K must be a positive multiple of 32 and N of 16");
  const int64_t groups = K / kGroup, blocks = N / kRows;
  TORCH_CHECK(packed.numel() == blocks * groups * kBlockBytes, name, ": packed size does not match");
  auto y = at::empty({M, N}, x_in.options());
  if (M == 0) return y;
  // x in tiles: [chunk of 16 rows][group][input pair][row][2 inputs], each tile's 1 KB (or less)
  // contiguous.  Fewer than 16 rows: the tiles hold just those; more: the last chunk is padded
  // with zero rows.
  const int tile_rows = static_cast<int>(std::min<int64_t>(M, 16));
  const int64_t rows = M <= 16 ? M : (M + 15) / 16 * 16;
  const at::Tensor xc = x_in.contiguous();
  at::Tensor x = at::empty({rows * K}, x_in.options());
  transpose_rows(reinterpret_cast<const uint32_t*>(xc.data_ptr<at::BFloat16>()),
                 reinterpret_cast<uint32_t*>(x.data_ptr<at::BFloat16>()), M, rows, groups, tile_rows);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t tile = static_cast<int64_t>(tile_rows) * kGroup, chunk_stride = groups * tile;
  const int64_t stride = 4 * tile_rows, out_tile = kRows * tile_rows;
  const int64_t pairs = (blocks + 1) / 2;
  // One pass over the rows (32 or fewer): the expanded groups are used once, so a ring of a few
  // of them stays in L1; more passes keep the whole panel of the two blocks for the next pass.
  const int slots = rows <= 32 ? std::min<int>(kSlots, static_cast<int>(groups)) : static_cast<int>(groups);
  // Reads an accumulator tile's column (one row of x, 16 outputs) from [output][row] storage.
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(tile_rows));
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    configure_tiles(tile_rows);
    std::unique_ptr<uint16_t[]> panel_store(new uint16_t[slots * 1024 + 32]);
    uint16_t* panel = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(panel_store.get()) + 63) & ~uintptr_t(63));
    alignas(64) float acc[4 * 256];
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = 2 * pair;
      const bool two_blocks = b + 1 < blocks;
      const uint8_t* wb = wp + b * groups * kBlockBytes;
      for (int64_t m0 = 0; m0 < rows; m0 += 32) {
        const bool two_chunks = rows - m0 > 16;
        // The first pass expands the blocks' groups as it goes; later passes reuse them.
        multiply<Format>(panel, slots, m0 == 0, wb, groups * kBlockBytes, xp + (m0 / 16) * chunk_stride, tile, stride,
                 chunk_stride, out_tile, static_cast<int>(groups), two_chunks, two_blocks, acc);
        const int64_t valid = std::min<int64_t>(32, M - m0);
        for (int64_t j = 0; j < (two_blocks ? 2 : 1); ++j) {
          for (int64_t c = 0; c * 16 < valid; ++c) {
            const float* t = acc + (2 * c + j) * out_tile;  // [output][row of the chunk]
            const int64_t count = std::min<int64_t>(16, valid - 16 * c);
            uint16_t* yc = yp + (m0 + 16 * c) * N + (b + j) * kRows;
            if (tile_rows == 16) {
              __m512i in[16], out[16];
              for (int n = 0; n < 16; ++n) in[n] = _mm512_load_si512(t + 16 * n);
              transpose16(in, out);
              for (int64_t i = 0; i < count; ++i) {
                const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(reinterpret_cast<__m512>(out[i])));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(yc + i * N), h);
              }
            } else {
              for (int64_t i = 0; i < count; ++i) {
                const __m512 v = tile_rows == 1 ? _mm512_load_ps(t) : _mm512_i32gather_ps(column, t + i, 4);
                const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(yc + i * N), h);
              }
            }
          }
        }
      }
    }
    _tile_release();
  });
  return y;
}

// Refuses codes that are not [N, K] of `type` with K a multiple of 32 and N of 16.
void check_codes(const at::Tensor& codes, at::ScalarType type, const char* name, const char* type_name) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == type, name, ": codes must be [N, K] ", type_name);
  TORCH_CHECK(codes.size(1) > 0 && codes.size(1) % kGroup == 0 && codes.size(0) > 0 && codes.size(0) % kRows == 0,
              name, ": K must be a positive multiple of 32 and N of 16");
}

// codes [N, K] uint8 (0..15), d and m [N, K / 32] fp16 -> the layout q4_amx_mm reads.
at::Tensor q4_amx_pack(const at::Tensor& codes, const at::Tensor& d, const at::Tensor& m) {
  constexpr int kBlockBytes = Q4::kBlockBytes;
  check_codes(codes, at::kByte, "q4_amx_pack", "uint8");
  const int64_t N = codes.size(0), K = codes.size(1);
  const int64_t groups = K / kGroup, blocks = N / kRows;
  TORCH_CHECK(d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf && d.dim() == 2 &&
                  d.sizes() == m.sizes() && d.size(0) == N && d.size(1) == groups,
              "q4_amx_pack: d and m must be [N, K / 32] fp16");
  auto c = codes.contiguous();
  auto dc = d.contiguous(), mc = m.contiguous();
  auto out = at::empty({blocks * groups * kBlockBytes}, codes.options());
  const uint8_t* cp = c.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(dc.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(mc.data_ptr<at::Half>());
  uint8_t* op = out.data_ptr<uint8_t>();
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* blk = op + (b * groups + g) * kBlockBytes;
      for (int p = 0; p < kRows / 2; ++p) {
        const uint8_t* even = cp + (b * kRows + 2 * p) * K + g * kGroup;
        for (int j = 0; j < kGroup; ++j) {
          TORCH_CHECK(even[j] < 16 && even[K + j] < 16, "q4_amx_pack: codes must be 0..15");
          blk[32 * p + j] = static_cast<uint8_t>(even[j] | (even[K + j] << 4));
        }
      }
      uint16_t* dm = reinterpret_cast<uint16_t*>(blk + 256);
      for (int n = 0; n < kRows; ++n) {
        dm[n] = dp[(b * kRows + n) * groups + g];
        dm[kRows + n] = mp[(b * kRows + n) * groups + g];
      }
    }
  }
  return out;
}

// codes [N, K] int8, d [N, K / 32] fp16 -> the layout q8_amx_mm reads.
at::Tensor q8_amx_pack(const at::Tensor& codes, const at::Tensor& d) {
  constexpr int kBlockBytes = Q8::kBlockBytes;
  check_codes(codes, at::kChar, "q8_amx_pack", "int8");
  const int64_t N = codes.size(0), K = codes.size(1);
  const int64_t groups = K / kGroup, blocks = N / kRows;
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.dim() == 2 && d.size(0) == N && d.size(1) == groups,
              "q8_amx_pack: d must be [N, K / 32] fp16");
  auto c = codes.contiguous();
  auto dc = d.contiguous();
  auto out = at::empty({blocks * groups * kBlockBytes}, codes.options().dtype(at::kByte));
  const int8_t* cp = c.data_ptr<int8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(dc.data_ptr<at::Half>());
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* blk = op + (b * groups + g) * kBlockBytes;
        uint16_t* dm = reinterpret_cast<uint16_t*>(blk + 16 * kGroup);
        for (int n = 0; n < kRows; ++n) {
          std::memcpy(blk + kGroup * n, cp + (b * kRows + n) * K + g * kGroup, kGroup);
          dm[n] = dp[(b * kRows + n) * groups + g];
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// 8-bit weights times 8-bit activations (a drafter's layers: dspark/models/int8_weights.py).
//
// The weights are int8 with one scale per output, packed by i8_amx_pack as the tile unit's B
// operand: for every block of 16 outputs and group of 64 inputs a 1 KB tile, row q holding
// inputs 4q..4q+3 of each of the 16 outputs.  Each row of x is quantised on its own to unsigned
// 8-bit codes over its own range: c = round((x - lo) / s), s = (hi - lo) / 255, so x ~ lo + s c
// (the asymmetric 8 bits fbgemm gives a whole batch, here per row).  TDPBUSD sums the products
// c w exactly in int32, and each result is (s float(sum) + lo wsum) times the output's scale,
// wsum the output's sum of codes.  Nothing of that depends on the rows beside a row or on the
// thread: one row's result is the same bits whatever it is batched with.

constexpr int kGroup8 = 64;  // inputs per int8 tile row

// Tiles: 0 up to 16 rows of x (64 codes each), 1..2 two blocks of weights, 4..5 their sums.
void configure_i8_tiles(int rows) {
  TileConfig cfg;
  cfg.rows[0] = rows, cfg.colsb[0] = 64;
  cfg.rows[1] = cfg.rows[2] = 16, cfg.colsb[1] = cfg.colsb[2] = 64;
  cfg.rows[4] = cfg.rows[5] = rows, cfg.colsb[4] = cfg.colsb[5] = 64;
  asm volatile("" ::: "memory");
  _tile_loadconfig(&cfg);
}

inline __m512 load_f(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_f(const at::BFloat16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// Row x (K values) -> codes q, step s and offset lo.  A row with an inf or NaN gets NaN.
template <class T>
inline void quantize_row(const T* x, int64_t K, uint8_t* q, float& s, float& lo) {
  __m512 mn = _mm512_set1_ps(std::numeric_limits<float>::infinity()), mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;  // min / max pass a NaN by, so it is looked for on its own
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = load_f(x + k);
    mn = _mm512_min_ps(mn, v);
    mx = _mm512_max_ps(mx, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  lo = _mm512_reduce_min_ps(mn);
  const float hi = _mm512_reduce_max_ps(mx);
  if (nan || !std::isfinite(lo) || !std::isfinite(hi)) {
    std::memset(q, 0, K);
    s = lo = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  s = (hi - lo) / 255.0f;
  if (!(s > 0.0f)) {  // a constant row: lo exactly
    std::memset(q, 0, K);
    s = 0.0f;
    return;
  }
  const __m512 inv = _mm512_set1_ps(1.0f / s), off = _mm512_set1_ps(lo);
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_sub_ps(load_f(x + k), off), inv);  // nearest, ties to even
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_cvtps_epi32(v), _mm512_setzero_si512())));
  }
}

inline void store_out(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
inline void store_out(at::BFloat16* y, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

template <class T>
at::Tensor i8_mm(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& wsum) {
  static const bool amx = request_amx();
  TORCH_CHECK(amx, "i8_amx_mm: this process cannot use AMX tiles");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = scale.size(0);
  const int64_t groups = K / kGroup8, blocks = N / kRows;
  TORCH_CHECK(packed.numel() == blocks * groups * 1024, "i8_amx_mm: packed size does not match");
  auto y = at::empty({M, N}, x_in.options());
  if (M == 0) return y;
  const at::Tensor xc = x_in.contiguous();
  const int64_t rows = M <= 16 ? M : (M + 15) / 16 * 16;  // more than 16: zero rows pad the last chunk
  std::unique_ptr<uint8_t[]> q(new uint8_t[rows * K]);
  std::unique_ptr<float[]> sx(new float[2 * rows]);  // per row: step, offset
  const T* xp = xc.data_ptr<T>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_row(xp + m * K, K, q.get() + m * K, sx[2 * m], sx[2 * m + 1]);
  });
  if (rows > M) std::memset(q.get() + M * K, 0, (rows - M) * K);
  for (int64_t m = M; m < rows; ++m) sx[2 * m] = sx[2 * m + 1] = 0.0f;
  const int tile_rows = static_cast<int>(std::min<int64_t>(M, 16));
  const int8_t* w = reinterpret_cast<const int8_t*>(packed.data_ptr<uint8_t>());
  const float* sw = scale.data_ptr<float>();
  const float* ws = wsum.data_ptr<float>();
  T* yp = y.data_ptr<T>();
  const int64_t pairs = (blocks + 1) / 2;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    configure_i8_tiles(tile_rows);
    alignas(64) int32_t acc[2][16 * 16];
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = 2 * pair;
      const bool two = b + 1 < blocks;
      const int8_t* w0 = w + b * groups * 1024;
      const int8_t* w1 = w0 + groups * 1024;
      for (int64_t m0 = 0; m0 < rows; m0 += 16) {
        _tile_zero(4);
        _tile_zero(5);
        for (int64_t g = 0; g < groups; ++g) {
          _tile_loadd(0, q.get() + m0 * K + g * kGroup8, K);
          _tile_loadd(1, w0 + g * 1024, 64);
          _tile_dpbusd(4, 0, 1);
          if (two) {
            _tile_loadd(2, w1 + g * 1024, 64);
            _tile_dpbusd(5, 0, 2);
          }
        }
        _tile_stored(4, acc[0], 64);
        if (two) _tile_stored(5, acc[1], 64);
        const int64_t valid = std::min<int64_t>(tile_rows, M - m0);
        for (int j = 0; j < (two ? 2 : 1); ++j) {
          const __m512 s_out = _mm512_loadu_ps(sw + (b + j) * kRows), sums = _mm512_loadu_ps(ws + (b + j) * kRows);
          for (int64_t i = 0; i < valid; ++i) {
            const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(acc[j] + 16 * i));
            const __m512 r = _mm512_fmadd_ps(v, _mm512_set1_ps(sx[2 * (m0 + i)]),
                                             _mm512_mul_ps(sums, _mm512_set1_ps(sx[2 * (m0 + i) + 1])));
            store_out(yp + (m0 + i) * N + (b + j) * kRows, _mm512_mul_ps(r, s_out));
          }
        }
      }
    }
    _tile_release();
  });
  return y;
}

at::Tensor i8_amx_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& wsum) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "i8_amx_mm: x must be [M, K] bf16 or float32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous(),
              "i8_amx_mm: packed must be a contiguous uint8 vector");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.is_contiguous() &&
                  wsum.scalar_type() == at::kFloat && wsum.dim() == 1 && wsum.is_contiguous() &&
                  wsum.size(0) == scale.size(0),
              "i8_amx_mm: scale and wsum must be contiguous float32 vectors [N]");
  TORCH_CHECK(x.size(1) > 0 && x.size(1) % kGroup8 == 0 && scale.size(0) > 0 && scale.size(0) % kRows == 0,
              "i8_amx_mm: K must be a positive multiple of 64 and N of 16");
  return x.scalar_type() == at::kFloat ? i8_mm<float>(x, packed, scale, wsum)
                                       : i8_mm<at::BFloat16>(x, packed, scale, wsum);
}

// codes [N, K] int8 -> the layout i8_amx_mm reads: [N / 16][K / 64][16 quads][16 outputs][4].
at::Tensor i8_amx_pack(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar, "i8_amx_pack: codes must be [N, K] int8");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(K > 0 && K % kGroup8 == 0 && N > 0 && N % kRows == 0,
              "i8_amx_pack: K must be a positive multiple of 64 and N of 16");
  return codes.contiguous().view({N / kRows, kRows, K / kGroup8, 16, 4}).permute({0, 2, 3, 1, 4}).contiguous()
      .view(at::kByte).reshape({-1});
}

}  // namespace

TORCH_LIBRARY(dspark_q4, lib) {
  lib.def("amx_mm(Tensor x, Tensor packed, int out_features) -> Tensor");
  lib.def("amx_pack(Tensor codes, Tensor d, Tensor m) -> Tensor");
  lib.def("amx_mm8(Tensor x, Tensor packed, int out_features) -> Tensor");
  lib.def("amx_pack8(Tensor codes, Tensor d) -> Tensor");
  lib.def("i8_amx_mm(Tensor x, Tensor packed, Tensor scale, Tensor wsum) -> Tensor");
  lib.def("i8_amx_pack(Tensor codes) -> Tensor");
}

TORCH_LIBRARY_IMPL(dspark_q4, CPU, lib) {
  lib.impl("amx_mm", &amx_mm<Q4>);
  lib.impl("amx_pack", &q4_amx_pack);
  lib.impl("amx_mm8", &amx_mm<Q8>);
  lib.impl("amx_pack8", &q8_amx_pack);
  lib.impl("i8_amx_mm", &i8_amx_mm);
  lib.impl("i8_amx_pack", &i8_amx_pack);
}
