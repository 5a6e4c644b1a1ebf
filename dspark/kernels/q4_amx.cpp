// 4-bit block weights times bf16 activations on Intel AMX (--weights q4: dspark/models/q4.py;
// built and loaded by dspark/kernels/native.py).
//
// The weights arrive packed by q4_amx_pack: for every block of 16 output rows and every group
// of 32 inputs, 256 bytes of codes laid out as AMX's B operand wants them (row r, column n holds
// inputs 2r and 2r + 1 of output n, low and high nibble), then the fp16 factors d and m of the
// 16 outputs: value = code * d + m.  A call expands each block of 16 rows once, for every row
// of x at once, into bf16 tiles (each value rounded once from its exact fp32 value, the same
// bf16 number the dense path holds), and multiplies with TDPBF16PS, which accumulates in fp32.
// The order of accumulation for one output does not depend on how many rows x has or which
// thread runs it: one row's result is the same bits whatever it is batched with.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <memory>

namespace {

constexpr int kGroup = 32;       // inputs per block of codes (one AMX tile's depth in bf16)
constexpr int kRows = 16;        // outputs per block (one AMX tile's width in fp32)
constexpr int kBlockBytes = 256 + 2 * kRows * 2;  // codes, then d[16] and m[16] in fp16
constexpr int kAhead = 8;        // groups of codes asked for ahead of the one being expanded
constexpr int kSlots = 8;        // expanded groups kept in a one-pass product (a ring in L1)

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool request_amx() {
  // Linux hands out the AMX register state only to a process that asks for it.
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// Tiles 0 and 1 hold two chunks of rows of x, 2 and 3 the expanded groups of two blocks of
// outputs, 4..7 the four accumulators (chunk 0 x block 0, 0 x 1, 1 x 0, 1 x 1).  Rows of x and
// of the accumulators: 16, or fewer when x has fewer, which the tile unit then skips.
void configure_tiles(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = t == 2 || t == 3 ? 16 : rows;
    cfg.colsb[t] = 64;
  }
  asm volatile("" ::: "memory");  // ldtilecfg reads all 64 bytes; the intrinsic declares fewer
  _tile_loadconfig(&cfg);
}

// One group's B tile: 16 rows (input pairs) x 16 outputs x 2 bf16, from the packed block.
inline void expand_group(const uint8_t* block, uint16_t* tile) {
  const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 256)));
  const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 288)));
  const __m512i low = _mm512_set1_epi32(15);
  // cvtne2ps puts the even inputs in the low half and the odd ones in the high half;
  // AMX wants them interleaved per output.
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                              23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int r = 0; r < 16; ++r) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16 * r)));
    const __m512 even = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(c, low)), d, m);
    const __m512 odd = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4)), d, m);
    const __m512i pair = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(odd, even));
    _mm512_store_si512(reinterpret_cast<__m512i*>(tile + 32 * r), _mm512_permutexvar_epi16(interleave, pair));
  }
}

// Multiplies one or two chunks of rows of x (tiles [group] at x and x + chunk_stride) by one
// or two blocks of outputs, whose expanded groups are panel[group][block], into
// out[chunk][block][row][16].  With `expanding` set it first expands (from `weights`, the two
// blocks' packed groups, `next` bytes apart; panel slot g % slots for group g), then it expands each group into the panel one group ahead of the tile unit, so that
// the vector units expand while the tile unit multiplies.
void multiply(uint16_t* panel, int slots, bool expanding, const uint8_t* weights, int64_t next, const uint16_t* x,
              int64_t tile, int64_t chunk_stride, int groups, bool two_chunks, bool two_blocks, float* out) {
  // Tile register numbers are immediates, hence the spelled-out cases.
  _tile_zero(4);
  if (two_blocks) _tile_zero(5);
  if (two_chunks) _tile_zero(6);
  if (two_chunks && two_blocks) _tile_zero(7);
  auto expand = [&](int g) {
    // The codes stream from memory once per product; asking for them a few groups ahead keeps
    // enough reads in flight (alone, the expansion streamed 1.4x faster with it than without).
    for (int line = 0; line < kBlockBytes; line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(weights + (g + kAhead) * kBlockBytes + line), _MM_HINT_T0);
      if (two_blocks) _mm_prefetch(reinterpret_cast<const char*>(weights + next + (g + kAhead) * kBlockBytes + line), _MM_HINT_T0);
    }
    expand_group(weights + g * kBlockBytes, panel + 1024 * (g % slots));
    if (two_blocks) expand_group(weights + next + g * kBlockBytes, panel + 1024 * (g % slots) + 512);
    // The tile loads below read the panel through asm the compiler does not see reading memory.
    asm volatile("" ::: "memory");
  };
  if (expanding) expand(0);
  for (int g = 0; g < groups; ++g) {
    const uint16_t* xg = x + tile * g;
    const uint16_t* wg = panel + 1024 * (g % slots);
    _tile_loadd(0, xg, 64);
    _tile_loadd(2, wg, 64);
    _tile_dpbf16ps(4, 0, 2);
    if (two_blocks) {
      _tile_loadd(3, wg + 512, 64);
      _tile_dpbf16ps(5, 0, 3);
    }
    if (two_chunks) {
      _tile_loadd(1, xg + chunk_stride, 64);
      _tile_dpbf16ps(6, 1, 2);
      if (two_blocks) _tile_dpbf16ps(7, 1, 3);
    }
    if (expanding && g + 1 < groups) expand(g + 1);
  }
  _tile_stored(4, out, 64);
  if (two_blocks) _tile_stored(5, out + 256, 64);
  if (two_chunks) _tile_stored(6, out + 512, 64);
  if (two_chunks && two_blocks) _tile_stored(7, out + 768, 64);
}

at::Tensor q4_amx_mm(const at::Tensor& x_in, const at::Tensor& packed, int64_t out_features) {
  static const bool amx = request_amx();
  TORCH_CHECK(amx, "q4_amx_mm: this process cannot use AMX tiles");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "q4_amx_mm: x must be [M, K] bf16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous(),
              "q4_amx_mm: packed must be a contiguous uint8 vector");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = out_features;
  TORCH_CHECK(K > 0 && K % kGroup == 0 && N > 0 && N % kRows == 0,
              "q4_amx_mm: K must be a positive multiple of 32 and N of 16");
  const int64_t groups = K / kGroup, blocks = N / kRows;
  TORCH_CHECK(packed.numel() == blocks * groups * kBlockBytes, "q4_amx_mm: packed size does not match");
  auto y = at::empty({M, N}, x_in.options());
  if (M == 0) return y;
  // x in tiles: [chunk of 16 rows][group][row][32 inputs], each tile's 1 KB contiguous.  Fewer
  // than 16 rows: the tiles hold just those; more: the last chunk is padded with zero rows.
  const int tile_rows = static_cast<int>(std::min<int64_t>(M, 16));
  const int64_t rows = M <= 16 ? M : (M + 15) / 16 * 16;
  at::Tensor x = x_in.contiguous();
  if (rows != M) x = at::cat({x, at::zeros({rows - M, K}, x.options())});
  x = x.view({rows / tile_rows, tile_rows, groups, kGroup}).permute({0, 2, 1, 3}).contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t tile = static_cast<int64_t>(tile_rows) * kGroup, chunk_stride = groups * tile;
  const int64_t pairs = (blocks + 1) / 2;
  // One pass over the rows (32 or fewer): the expanded groups are used once, so a ring of a few
  // of them stays in L1; more passes keep the whole panel of the two blocks for the next pass.
  const int slots = rows <= 32 ? std::min<int>(kSlots, static_cast<int>(groups)) : static_cast<int>(groups);
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
        multiply(panel, slots, m0 == 0, wb, groups * kBlockBytes, xp + (m0 / 16) * chunk_stride, tile,
                 chunk_stride, static_cast<int>(groups), two_chunks, two_blocks, acc);
        const int64_t valid = std::min<int64_t>(32, M - m0);
        for (int64_t i = 0; i < valid; ++i) {
          for (int64_t j = 0; j < (two_blocks ? 2 : 1); ++j) {
            const __m512 v = _mm512_load_ps(acc + 512 * (i / 16) + 256 * j + 16 * (i % 16));
            const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(yp + (m0 + i) * N + (b + j) * kRows), h);
          }
        }
      }
    }
    _tile_release();
  });
  return y;
}

// codes [N, K] uint8 (0..15), d and m [N, K / 32] fp16 -> the layout q4_amx_mm reads.
at::Tensor q4_amx_pack(const at::Tensor& codes, const at::Tensor& d, const at::Tensor& m) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, "q4_amx_pack: codes must be [N, K] uint8");
  const int64_t N = codes.size(0), K = codes.size(1);
  TORCH_CHECK(K > 0 && K % kGroup == 0 && N > 0 && N % kRows == 0,
              "q4_amx_pack: K must be a positive multiple of 32 and N of 16");
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
      for (int r = 0; r < 16; ++r) {
        for (int n = 0; n < kRows; ++n) {
          const uint8_t* row = cp + (b * kRows + n) * K + g * kGroup;
          TORCH_CHECK(row[2 * r] < 16 && row[2 * r + 1] < 16, "q4_amx_pack: codes must be 0..15");
          blk[16 * r + n] = static_cast<uint8_t>(row[2 * r] | (row[2 * r + 1] << 4));
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

}  // namespace

TORCH_LIBRARY(dspark_q4, lib) {
  lib.def("amx_mm(Tensor x, Tensor packed, int out_features) -> Tensor");
  lib.def("amx_pack(Tensor codes, Tensor d, Tensor m) -> Tensor");
}

TORCH_LIBRARY_IMPL(dspark_q4, CPU, lib) {
  lib.impl("amx_mm", &q4_amx_mm);
  lib.impl("amx_pack", &q4_amx_pack);
}
