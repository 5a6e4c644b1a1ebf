// The greedy left-to-right loop of a DSpark block's vanilla Markov head in one call
// (dspark/kernels/markov.py; built and loaded by dspark/kernels/native.py).
//
// For each request b and block position k:  emb = W1[x_{k-1}],  logits = U[b, k] + emb W2,
// x_k = the lowest column of the largest logit (mapped to a vocabulary id through the draft
// vocabulary).  In torch that is four or five small operations a position, sequential across
// the block, and at batch 1 their calls cost more than their arithmetic.
//
// W1 and W2 hold bf16 values, so every product emb_j * W2[j, n] is exact in fp32; the kernel sums
// them in pairs with AVX-512 BF16 dot products (W2 packed as [r / 2, N, 2]: the pair (j, j+1) of
// each column side by side), in a fixed order for every column: its logit does not depend on
// the batch, the thread count or how the columns are split between threads.  Torch's float32
// product sums the same exact products in another order, so a logit may differ from it in its
// last bits, and a near tie may pick the other column: a draft, not the verified output.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "amx_tiles.h"

namespace {

// The largest of v[0..n) and its lowest index, as (value, index); NaN never wins.
inline void best_of(const float* v, int64_t n, int64_t base, float& best, int64_t& at) {
  int64_t i = 0;
  if (n >= 16) {  // the maximum 16 lanes at a time, then the first lane that holds it
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(_mm512_loadu_ps(v + i), mx);  // a NaN in v never replaces mx
    const float m = _mm512_reduce_max_ps(mx);
    if (m > best) {
      for (int64_t j = 0; j < i; j += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + j), _mm512_set1_ps(m), _CMP_EQ_OQ);
        if (hit) {
          best = m, at = base + j + __builtin_ctz(hit);
          break;
        }
      }
    }
  }
  for (; i < n; ++i)
    if (v[i] > best) best = v[i], at = base + i;
}

// R requests' logits over 16 * C columns from n: R * C accumulators, each W2 load shared by
// the R requests (a dot product's latency is hidden by the independent accumulators).
template <int R, int C>
inline void tile(const float* const* u, const uint32_t* const* pairs, int64_t half_r, const uint32_t* w2p,
                 int64_t N, int64_t n, float* const* out) {
  __m512 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < half_r; ++j) {
    const uint32_t* row = w2p + j * N + n;  // column n's pair j: two bf16 in 32 bits
    __m512bh w[C];
    for (int c = 0; c < C; ++c) w[c] = (__m512bh)_mm512_loadu_si512(row + 16 * c);
    for (int i = 0; i < R; ++i) {
      const __m512bh e = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[i][j]));
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], w[c], e);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c)
      _mm512_storeu_ps(out[i] + 16 * c, _mm512_add_ps(_mm512_loadu_ps(u[i] + n + 16 * c), acc[i][c]));
}

// Logits of columns [n0, n1) for every request: U + emb W2, request b's into out[b * stride ..].
// Every column's products are summed in the same order (pair j = 0, 1, ...) whatever the tiling,
// so a logit does not depend on the batch or on where a thread's columns start.
void logits_range(const float* const* u, const uint32_t* const* pairs, int64_t B, int64_t half_r,
                  const uint32_t* w2p, int64_t N, int64_t n0, int64_t n1, float* out, int64_t stride) {
  int64_t n = n0;
  const int64_t step = B == 1 ? 128 : 64;
  for (; n + step <= n1; n += step) {
    int64_t b = 0;
    if (B == 1) {
      float* o[1] = {out + (n - n0)};
      tile<1, 8>(u, pairs, half_r, w2p, N, n, o);
      continue;
    }
    for (; b + 2 <= B; b += 2) {
      float* o[2] = {out + b * stride + (n - n0), out + (b + 1) * stride + (n - n0)};
      tile<2, 4>(u + b, pairs + b, half_r, w2p, N, n, o);
    }
    if (b < B) {
      float* o[1] = {out + b * stride + (n - n0)};
      tile<1, 4>(u + b, pairs + b, half_r, w2p, N, n, o);
    }
  }
  for (; n < n1; n += 16) {  // the last columns, 16 (or fewer, masked) at a time
    const __mmask16 m = n + 16 <= n1 ? 0xffff : static_cast<__mmask16>((1u << (n1 - n)) - 1);
    for (int64_t b = 0; b < B; ++b) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t j = 0; j < half_r; ++j) {
        const __m512bh e = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[b][j]));
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi32(m, w2p + j * N + n), e);
      }
      _mm512_mask_storeu_ps(out + b * stride + (n - n0), m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, u[b] + n), a));
    }
  }
}

// On a CPU with AMX tiles the products go through the tile unit instead (TDPBF16PS): the rows
// of up to 16 requests' W1 rows are the A operand and W2's packed pairs, 16 columns by 32 rows of
// W2, are B tiles as they lie in memory.  Each logit sums its r / 32 tile products in order, so
// it does not depend on the rows beside it either; it may differ in its last bits from the
// vector path's (another order of the same exact products), which a CPU without tiles takes.
using dspark_amx::request_amx;  // a CPU without tiles refuses, and the vector path serves
using dspark_amx::TileConfig;

// Tile 0: the rows' W1 values for 32 of the r inputs; 1..3: B tiles of W2; 4..7: four blocks of
// 16 columns' sums for the rows.
void configure_tiles(int rows) {
  TileConfig cfg;
  cfg.rows[0] = rows, cfg.colsb[0] = 64;
  for (int t = 1; t < 4; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  for (int t = 4; t < 8; ++t) cfg.rows[t] = rows, cfg.colsb[t] = 64;
  asm volatile("" ::: "memory");  // ldtilecfg reads all 64 bytes
  _tile_loadconfig(&cfg);
}

// logits_range on the tile unit for the columns [n0, n0 + 64 * groups); `e` the first row's W1
// values (r bf16), `e_stride` bytes between rows; rows b0 .. b0 + rows of the batch.
void logits_range_amx(const uint16_t* e, int64_t e_stride, int rows, int64_t r, const uint16_t* w2p, int64_t N,
                      int64_t n0, int64_t groups, const float* const* u, float* out, int64_t stride) {
  alignas(64) float acc[4][16 * 16];
  for (int64_t gcol = 0; gcol < groups; ++gcol) {
    const int64_t n = n0 + 64 * gcol;
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t j = 0; j < r; j += 32) {
      _tile_loadd(0, e + j, e_stride);
      const uint16_t* w = w2p + (j / 2 * N + n) * 2;  // pair j / 2, column n
      _tile_loadd(1, w, N * 4);
      _tile_dpbf16ps(4, 0, 1);
      _tile_loadd(2, w + 32, N * 4);
      _tile_dpbf16ps(5, 0, 2);
      _tile_loadd(3, w + 64, N * 4);
      _tile_dpbf16ps(6, 0, 3);
      _tile_loadd(1, w + 96, N * 4);
      _tile_dpbf16ps(7, 0, 1);
    }
    _tile_stored(4, acc[0], 64);
    _tile_stored(5, acc[1], 64);
    _tile_stored(6, acc[2], 64);
    _tile_stored(7, acc[3], 64);
    for (int i = 0; i < rows; ++i)
      for (int c = 0; c < 4; ++c)
        _mm512_storeu_ps(out + i * stride + (n - n0) + 16 * c,
                         _mm512_add_ps(_mm512_loadu_ps(u[i] + n + 16 * c), _mm512_load_ps(acc[c] + 16 * i)));
  }
}

// tokens [B, G] (vocabulary ids) and the W1 rows each position read, [B, G, r].
std::tuple<at::Tensor, at::Tensor> greedy_chain(const at::Tensor& base, const at::Tensor& anchors,
                                                const at::Tensor& w1, const at::Tensor& w2p,
                                                const at::Tensor& vocab_ids) {
  TORCH_CHECK(base.dim() == 3 && base.scalar_type() == at::kFloat && base.is_contiguous(),
              "base logits: contiguous float32 [B, G, N]");
  TORCH_CHECK(w1.dim() == 2 && w1.scalar_type() == at::kBFloat16 && w1.is_contiguous(), "W1: contiguous bf16 [V, r]");
  TORCH_CHECK(w1.size(1) % 2 == 0 && w1.size(1) > 0, "W1: an even rank");
  const int64_t B = base.size(0), G = base.size(1), N = base.size(2), V = w1.size(0), r = w1.size(1);
  TORCH_CHECK(w2p.dim() == 3 && w2p.scalar_type() == at::kBFloat16 && w2p.is_contiguous() && w2p.size(0) == r / 2 &&
                  w2p.size(1) == N && w2p.size(2) == 2,
              "W2: contiguous bf16 [r / 2, N, 2] packed by markov.pack_w2");
  TORCH_CHECK(anchors.dim() == 1 && anchors.size(0) == B && anchors.scalar_type() == at::kLong, "anchors: int64 [B]");
  const bool mapped = vocab_ids.numel() > 0;
  TORCH_CHECK(!mapped || (vocab_ids.dim() == 1 && vocab_ids.size(0) == N && vocab_ids.scalar_type() == at::kLong &&
                          vocab_ids.is_contiguous()),
              "vocab ids: contiguous int64 [N], or empty");
  TORCH_CHECK(mapped || N <= V, "without vocab ids the columns are vocabulary ids: N <= V");
  const at::Tensor anc = anchors.contiguous();
  at::Tensor tokens = at::empty({B, G}, anchors.options());
  at::Tensor embs = at::empty({B, G, r}, w1.options());
  const float* U = base.data_ptr<float>();
  const uint16_t* W1 = reinterpret_cast<const uint16_t*>(w1.data_ptr<at::BFloat16>());
  const uint32_t* W2 = reinterpret_cast<const uint32_t*>(w2p.data_ptr<at::BFloat16>());
  const int64_t* ids = mapped ? vocab_ids.data_ptr<int64_t>() : nullptr;
  int64_t* tok = tokens.data_ptr<int64_t>();
  uint16_t* E = reinterpret_cast<uint16_t*>(embs.data_ptr<at::BFloat16>());
  const int64_t half_r = r / 2;
  static const bool amx = request_amx();
  const bool tiles = amx && r % 32 == 0;
  std::vector<int64_t> prev(anc.data_ptr<int64_t>(), anc.data_ptr<int64_t>() + B);
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(prev[b] >= 0 && prev[b] < V, "anchor id out of W1's rows");
  // Columns split into chunks, each thread's best reduced in chunk order (the lowest column wins ties).
  const int64_t chunk = 1024, n_chunks = (N + chunk - 1) / chunk;
  std::vector<float> best(B * n_chunks);
  std::vector<int64_t> at_(B * n_chunks);
  for (int64_t k = 0; k < G; ++k) {
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(E + (b * G + k) * r, W1 + prev[b] * r, r * sizeof(uint16_t));
    std::vector<const float*> u(B);
    std::vector<const uint32_t*> pairs(B);
    for (int64_t b = 0; b < B; ++b) {
      u[b] = U + (b * G + k) * N;
      pairs[b] = reinterpret_cast<const uint32_t*>(E + (b * G + k) * r);
    }
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> logits(B * chunk);
      int configured = 0;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
        int64_t done = n0;
        if (tiles) {  // the columns in whole groups of 64 on the tile unit, 16 rows at a time
          const int64_t groups = (n1 - n0) / 64;
          for (int64_t b0 = 0; b0 < B && groups; b0 += 16) {
            const int rows = static_cast<int>(std::min<int64_t>(16, B - b0));
            if (rows != configured) configure_tiles(rows), configured = rows;
            logits_range_amx(E + (b0 * G + k) * r, G * r * 2, rows, r, reinterpret_cast<const uint16_t*>(W2), N, n0,
                             groups, u.data() + b0, logits.data() + b0 * chunk, chunk);
          }
          done = n0 + 64 * groups;
        }
        if (done < n1) {
          std::vector<float> rest(B * chunk);
          logits_range(u.data(), pairs.data(), B, half_r, W2, N, done, n1, rest.data(), chunk);
          for (int64_t b = 0; b < B; ++b)
            std::memcpy(logits.data() + b * chunk + (done - n0), rest.data() + b * chunk, (n1 - done) * sizeof(float));
        }
        for (int64_t b = 0; b < B; ++b) {
          float v = -std::numeric_limits<float>::infinity();
          int64_t i = n0;
          best_of(logits.data() + b * chunk, n1 - n0, n0, v, i);
          best[b * n_chunks + c] = v, at_[b * n_chunks + c] = i;
        }
      }
      if (configured) _tile_release();
    });
    for (int64_t b = 0; b < B; ++b) {
      float v = best[b * n_chunks];
      int64_t i = at_[b * n_chunks];
      for (int64_t c = 1; c < n_chunks; ++c)
        if (best[b * n_chunks + c] > v) v = best[b * n_chunks + c], i = at_[b * n_chunks + c];
      const int64_t id = mapped ? ids[i] : i;
      TORCH_CHECK(id >= 0 && id < V, "a drafted id out of W1's rows");
      tok[b * G + k] = id;
      prev[b] = id;
    }
  }
  return {tokens, embs};
}

}  // namespace

TORCH_LIBRARY(dspark_markov, lib) {
  lib.def("greedy_chain(Tensor base, Tensor anchors, Tensor w1, Tensor w2p, Tensor vocab_ids) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dspark_markov, CPU, lib) { lib.impl("greedy_chain", &greedy_chain); }
