// Attention of a step's short queries (decode tokens, verification blocks) read straight from
// the KV cache, one call per layer for the whole batch, the step's keys and values written in
// the same call (dspark/kernels/attention.py; built and loaded by dspark/kernels/native.py).
//
// The cache is either layout of dspark/models: slots [S, n_kv, positions, hd] (one page per
// slot) or a paged pool [n_kv, blocks, block, hd] read through each request's block table.
//
// Every query row (one query head of one token) is computed on its own, in a fixed order:
// scores over its visible keys (fp32 products of the cache's values, summed in one order),
// softmax in fp32, then the values weighted in ascending key order.  So a row's bits do not
// depend on how many tokens its request feeds, which requests share the step, or the thread
// count: a verification block gives bit for bit what the same tokens give one at a time, which
// is what lossless greedy verification needs from the attention.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// bf16 is the high half of an fp32: widening is a shift.
inline __m512 load16(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// Round to nearest even, as torch's float -> bf16 conversion does (NaN stays NaN).
inline void store16(uint16_t* p, __m512 x) {
  __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(b));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }

// e^x for x <= 0 (scores less their maximum): x = n ln2 + r with |r| <= ln2 / 2, e^r from its
// Taylor series to r^7 (truncation below 1e-8; a few ulp from fp32 evaluation), times 2^n.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // e^-104 is below the smallest float
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 in two parts, the first exact in a few bits, so that n * part is exact
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440054690583e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1); }

struct Cache {
  const void* k;
  const void* v;
  int64_t page_stride, head_stride, pos_stride, block;
};

struct Request {
  const int64_t* pages;  // its block table (one entry: its slot, for the slot layout)
  int64_t start, q_len, first;
  int64_t end;  // > 0: every row sees keys up to end (a draft block attends both ways); 0: causal
};

// Softmax of row s over [lo, hi) in place, zeros elsewhere in [0, n); returns 1 / sum.
inline float softmax_row(float* s, int64_t n, int64_t lo, int64_t hi) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t p = lo; p < hi; p += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(hi - p), s + p));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t p = lo; p < hi; p += 16) {
    const __mmask16 k = tail_mask(hi - p);
    const __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + p), m)));
    _mm512_mask_storeu_ps(s + p, k, e);
    sum = _mm512_add_ps(sum, e);
  }
  std::fill(s, s + lo, 0.0f);
  std::fill(s + hi, s + n, 0.0f);
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// The sums of 16 vectors' lanes, in one vector (lane j: vector j's sum).  Every vector's lanes
// are added in the same association, halves first ((l + l8) + (l4 + l12)...), so a score does
// not depend on where its key falls in a block of 16.
inline __m512 sum16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int m = 0; m < 8; ++m)
    b[m] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0x44), _mm512_shuffle_f32x4(a[2 * m], a[2 * m + 1], 0xEE));
  for (int m = 0; m < 4; ++m)
    c[m] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0x88), _mm512_shuffle_f32x4(b[2 * m], b[2 * m + 1], 0xDD));
  for (int m = 0; m < 2; ++m)
    d[m] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0x44), _mm512_shuffle_ps(c[2 * m], c[2 * m + 1], 0xEE));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  // r's lane 4q + t holds vector 4t + q's sum
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, r);
}

// Rows of one (request, KV head): n_rep query heads of each of its q_len tokens.
template <typename T, int NC>
void attend_group(const T* q, int64_t q_tok, const Cache& c, const Request& r, int64_t h, int64_t n_rep, float scale,
                  int64_t window, T* out, int64_t o_tok, std::vector<float>& buf, std::vector<int64_t>& where) {
  constexpr int64_t hd = 16 * NC;
  constexpr int RC = NC <= 4 ? 4 : NC <= 8 ? 2 : 1;  // rows accumulated at once (<= 16 registers)
  const T* kc = static_cast<const T*>(c.k);
  const T* vc = static_cast<const T*>(c.v);
  const int64_t rows = r.q_len * n_rep;
  // Row i (token i / n_rep) sees keys [lo, hi): causal, and the window's latest when set; or
  // every row up to the request's end.
  auto lo_of = [&](int64_t j) { return window > 0 ? std::max<int64_t>(0, r.start + j + 1 - window) : 0; };
  auto hi_of = [&](int64_t j) { return r.end > 0 ? r.end : r.start + j + 1; };
  const int64_t lo = lo_of(0), hi = hi_of(r.q_len - 1), n = hi - lo, blocks = (n + 15) / 16;
  const bool staged = (rows + RC - 1) / RC > 1;  // several passes over the values: widen them once
  buf.resize(rows * hd + rows * blocks * 16 + 16 * hd + (staged ? n * hd : 0) + rows);
  where.resize(n);
  float* qf = buf.data();
  float* s = qf + rows * hd;                   // [rows][blocks * 16] scores, then probabilities
  float* kf = s + rows * blocks * 16;          // one block of keys, widened
  float* vf = kf + 16 * hd;                    // the values, widened (several passes)
  float* inv = vf + (staged ? n * hd : 0);
  const int64_t stride = blocks * 16;
  for (int64_t i = 0; i < rows; ++i) {
    const T* qi = q + (r.first + i / n_rep) * q_tok + (h * n_rep + i % n_rep) * hd;
    for (int ch = 0; ch < NC; ++ch) _mm512_storeu_ps(qf + i * hd + 16 * ch, load16(qi + 16 * ch));
  }
  // Where each key sits (element offsets, the same in both caches), walked page by page.
  for (int64_t p = lo, page = lo / c.block, off = lo % c.block; p < hi; ++p) {
    where[p - lo] = r.pages[page] * c.page_stride + h * c.head_stride + off * c.pos_stride;
    if (++off == c.block) off = 0, ++page;
  }
  auto at = [&](const T* base, int64_t p) { return base + where[p - lo]; };
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t p0 = lo + 16 * b, m = std::min<int64_t>(16, hi - p0);
    for (int64_t j = 0; j < 16; ++j) {
      const T* kp = at(kc, p0 + std::min<int64_t>(j, m - 1));  // past the range: its last key again
      for (int ch = 0; ch < NC; ++ch) _mm512_storeu_ps(kf + j * hd + 16 * ch, load16(kp + 16 * ch));
    }
    for (int64_t i = 0; i < rows; ++i) {
      __m512 qv[NC];
      for (int ch = 0; ch < NC; ++ch) qv[ch] = _mm512_loadu_ps(qf + i * hd + 16 * ch);
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) {
        acc[j] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kf + j * hd));
        for (int ch = 1; ch < NC; ++ch) acc[j] = _mm512_fmadd_ps(qv[ch], _mm512_loadu_ps(kf + j * hd + 16 * ch), acc[j]);
      }
      _mm512_storeu_ps(s + i * stride + 16 * b, _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale)));
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t j = i / n_rep;
    inv[i] = softmax_row(s + i * stride, stride, lo_of(j) - lo, hi_of(j) - lo);
  }
  if (staged)
    for (int64_t p = lo; p < hi; ++p) {
      const T* vp = at(vc, p);
      for (int ch = 0; ch < NC; ++ch) _mm512_storeu_ps(vf + (p - lo) * hd + 16 * ch, load16(vp + 16 * ch));
    }
  // Probabilities past a row's keys are exact zeros: adding their products leaves its sums as
  // they are, so a row sums the same terms in the same order whichever rows share its pass.
  for (int64_t i0 = 0; i0 < rows; i0 += RC) {
    const int nr = static_cast<int>(std::min<int64_t>(RC, rows - i0));
    const int64_t p0 = lo_of(i0 / n_rep), p1 = hi_of((i0 + nr - 1) / n_rep);
    __m512 acc[RC][NC];
    for (int a = 0; a < RC; ++a)
      for (int ch = 0; ch < NC; ++ch) acc[a][ch] = _mm512_setzero_ps();
    const float* w0 = s + i0 * stride;  // probabilities of key p at w0[a * stride + p - lo]
    for (int64_t p = p0; p < p1; ++p) {
      __m512 val[NC];
      if (staged) {
        for (int ch = 0; ch < NC; ++ch) val[ch] = _mm512_loadu_ps(vf + (p - lo) * hd + 16 * ch);
      } else {
        const T* vp = at(vc, p);
        for (int ch = 0; ch < NC; ++ch) val[ch] = load16(vp + 16 * ch);
      }
      for (int a = 0; a < RC; ++a) {
        if (a >= nr) break;
        const __m512 w = _mm512_set1_ps(w0[a * stride + p - lo]);
        for (int ch = 0; ch < NC; ++ch) acc[a][ch] = _mm512_fmadd_ps(w, val[ch], acc[a][ch]);
      }
    }
    for (int a = 0; a < nr; ++a) {
      const int64_t i = i0 + a;
      T* oi = out + (r.first + i / n_rep) * o_tok + (h * n_rep + i % n_rep) * hd;
      const __m512 w = _mm512_set1_ps(inv[i]);
      for (int ch = 0; ch < NC; ++ch) store16(oi + 16 * ch, _mm512_mul_ps(acc[a][ch], w));
    }
  }
}

template <typename T, int NC>
void run(const at::Tensor& q, const Cache& c, const std::vector<Request>& whole, int64_t n_kv, int64_t n_rep, float scale,
         int64_t window, at::Tensor& out) {
  const T* qp = reinterpret_cast<const T*>(q.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  int64_t work = 0;  // key reads times rows, to keep small steps on one thread
  for (const Request& r : whole) work += (r.start + r.q_len) * r.q_len * n_rep * n_kv;
  // Few requests (one verification block): their tokens in parts, so that every thread has
  // some.  Tokens j0.. of a request are a request of their own at start + j0: rows are
  // computed on their own, so the parts give the same bits.
  const int64_t want = 4 * at::get_num_threads();
  const int64_t have = static_cast<int64_t>(whole.size()) * n_kv;
  std::vector<Request> reqs;
  for (const Request& r : whole) {
    const int64_t parts = std::min<int64_t>(r.q_len, std::max<int64_t>(1, (want + have - 1) / have));
    for (int64_t i = 0; i < parts; ++i) {
      const int64_t j0 = r.q_len * i / parts, j1 = r.q_len * (i + 1) / parts;
      reqs.push_back({r.pages, r.start + j0, j1 - j0, r.first + j0, r.end});
    }
  }
  const int64_t items = static_cast<int64_t>(reqs.size()) * n_kv;
  const int64_t grain = work * 16 * NC < (1 << 17) ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf;
    std::vector<int64_t> where;
    for (int64_t it = begin; it < end; ++it)
      attend_group<T, NC>(qp, q.stride(0), c, reqs[it / n_kv], it % n_kv, n_rep, scale, window, op, out.stride(0), buf,
                          where);
  });
}

// The checks of one call's tensors; returns the head size.
int64_t check_tensors(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& out, bool paged, int64_t n_rep) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kFloat, "short_attention: bf16 or float32 only");
  for (const at::Tensor* t : {&q, &k, &v, &k_cache, &v_cache, &out})
    TORCH_CHECK(t->device().is_cpu(), "short_attention: CPU tensors only");
  for (const at::Tensor* t : {&k, &v, &k_cache, &v_cache, &out})
    TORCH_CHECK(t->scalar_type() == dt, "short_attention: every tensor in the dtype of q");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && out.sizes() == q.sizes(),
              "short_attention: q/out [T, heads, hd], k/v [T, kv heads, hd]");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous(),
              "short_attention: q, k, v and out must be contiguous");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && v_cache.strides() == k_cache.strides() &&
                  k_cache.stride(3) == 1,
              "short_attention: caches [., ., positions, hd] with unit stride in hd, both alike");
  const int64_t T = q.size(0), heads = q.size(1), hd = q.size(2), n_kv = k.size(1);
  TORCH_CHECK(k.size(0) == T && k.size(2) == hd && k_cache.size(3) == hd, "short_attention: shapes do not agree");
  TORCH_CHECK(n_rep >= 1 && heads == n_kv * n_rep, "short_attention: heads must be n_rep times the KV heads");
  TORCH_CHECK(hd == 64 || hd == 128 || hd == 256, "short_attention: head size 64, 128 or 256");
  TORCH_CHECK(k_cache.size(paged ? 0 : 1) == n_kv, "short_attention: the cache's KV heads differ from k's");
  return hd;
}

// The checks of a step's writes and requests against a cache of n_pages pages of block
// positions; returns the requests.
std::vector<Request> check_step(int64_t T, int64_t n_pages, int64_t block, const at::Tensor& write_page,
                                const at::Tensor& write_pos, const at::Tensor& reqs, const at::Tensor& tables) {
  for (const at::Tensor* t : {&write_page, &write_pos, &reqs, &tables})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "short_attention: index tensors int64, contiguous");
  TORCH_CHECK(write_page.dim() == 1 && write_page.size(0) == T && write_pos.sizes() == write_page.sizes(),
              "short_attention: one write page and position per token");
  TORCH_CHECK(reqs.dim() == 2 && (reqs.size(1) == 3 || reqs.size(1) == 4) && tables.dim() == 2 &&
                  tables.size(0) == reqs.size(0),
              "short_attention: reqs [R, 3] (start, q_len, first token) or [R, 4] (and 1: every row sees the "
              "whole request), tables [R, pages]");
  const int64_t* wp = write_page.data_ptr<int64_t>();
  const int64_t* wq = write_pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(wp[t] >= 0 && wp[t] < n_pages && wq[t] >= 0 && wq[t] < block, "short_attention: write outside the cache");
  const int64_t* rq = reqs.data_ptr<int64_t>();
  const int64_t* tb = tables.data_ptr<int64_t>();
  const int64_t width = tables.size(1);
  std::vector<Request> list;
  const int64_t cols = reqs.size(1);
  for (int64_t i = 0; i < reqs.size(0); ++i) {
    const int64_t start = rq[cols * i], q_len = rq[cols * i + 1], first = rq[cols * i + 2];
    const bool whole = cols == 4 && rq[cols * i + 3] != 0;
    TORCH_CHECK(start >= 0 && q_len >= 1 && first >= 0 && first + q_len <= T && start <= width * block,
                "short_attention: a request outside the step or past its table");
    const int64_t used = (start + q_len + block - 1) / block;
    TORCH_CHECK(used <= width, "short_attention: a request past its table");
    for (int64_t j = 0; j < used; ++j)
      TORCH_CHECK(tb[i * width + j] >= 0 && tb[i * width + j] < n_pages, "short_attention: a table names no page");
    list.push_back({tb + i * width, start, q_len, first, whole ? start + q_len : 0});
  }
  return list;
}

// Write the step's keys and values (its queries read them), then attend.
void write_and_run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const int64_t* wp, const int64_t* wq, const std::vector<Request>& list,
                   bool paged, int64_t n_rep, double scale, int64_t window, at::Tensor& out) {
  const int64_t T = q.size(0), hd = q.size(2), n_kv = k.size(1), es = k.element_size();
  const int page_axis = paged ? 1 : 0, head_axis = paged ? 0 : 1;
  char* kb = static_cast<char*>(k_cache.data_ptr());
  char* vb = static_cast<char*>(v_cache.data_ptr());
  const int64_t ps = k_cache.stride(page_axis), hs = k_cache.stride(head_axis), ss = k_cache.stride(2);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < n_kv; ++h) {
      const int64_t at = (wp[t] * ps + h * hs + wq[t] * ss) * es, from = (t * n_kv + h) * hd * es;
      std::memcpy(kb + at, static_cast<const char*>(k.data_ptr()) + from, hd * es);
      std::memcpy(vb + at, static_cast<const char*>(v.data_ptr()) + from, hd * es);
    }
  if (list.empty()) return;
  const Cache c{k_cache.data_ptr(), v_cache.data_ptr(), ps, hs, ss, k_cache.size(2)};
  const float sc = static_cast<float>(scale);
  if (q.scalar_type() == at::kBFloat16) {
    if (hd == 64) run<uint16_t, 4>(q, c, list, n_kv, n_rep, sc, window, out);
    else if (hd == 128) run<uint16_t, 8>(q, c, list, n_kv, n_rep, sc, window, out);
    else run<uint16_t, 16>(q, c, list, n_kv, n_rep, sc, window, out);
  } else {
    if (hd == 64) run<float, 4>(q, c, list, n_kv, n_rep, sc, window, out);
    else if (hd == 128) run<float, 8>(q, c, list, n_kv, n_rep, sc, window, out);
    else run<float, 16>(q, c, list, n_kv, n_rep, sc, window, out);
  }
}

void short_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& write_page, const at::Tensor& write_pos,
                     const at::Tensor& reqs, const at::Tensor& tables, bool paged, int64_t n_rep, double scale,
                     int64_t window, const at::Tensor& out) {
  check_tensors(q, k, v, k_cache, v_cache, out, paged, n_rep);
  const auto list = check_step(q.size(0), k_cache.size(paged ? 1 : 0), k_cache.size(2), write_page, write_pos, reqs,
                               tables);
  at::Tensor o = out;
  write_and_run(q, k, v, k_cache, v_cache, write_page.data_ptr<int64_t>(), write_pos.data_ptr<int64_t>(), list, paged,
                n_rep, scale, window, o);
}

// The compiled step's attention op, without Python in between: the step context
// (dspark/models/compiled.py) enters each step here, with every layer's cache (one tensor,
// layers first) and the step's plan when the kernel serves all of its queries; otherwise it
// enters the step as another's, and the op hands each call to the Python op
// dspark::cache_attention.  Steps nest (a stack per thread).
struct Step {
  bool ours = false;
  at::Tensor k, v, write_page, write_pos, reqs, tables;
  bool paged = false;
  int64_t n_rep = 1, window = -1, tokens = 0;
  double scale = 1.0;
  std::vector<Request> list;
};

thread_local std::vector<Step> steps;

void enter_step(const at::Tensor& k, const at::Tensor& v, const at::Tensor& write_page, const at::Tensor& write_pos,
                const at::Tensor& reqs, const at::Tensor& tables, bool paged, int64_t n_rep, double scale,
                int64_t window, int64_t tokens) {
  TORCH_CHECK(k.dim() == 5 && v.sizes() == k.sizes() && v.strides() == k.strides() && k.stride(4) == 1,
              "enter_step: caches [layers, ., ., positions, hd], both alike");
  TORCH_CHECK(tokens >= 1, "enter_step: a step of no tokens");
  TORCH_CHECK(k.device().is_cpu() && write_page.device().is_cpu() && reqs.device().is_cpu(),
              "enter_step: CPU tensors only");
  Step s;
  s.list = check_step(tokens, k.size(paged ? 2 : 1), k.size(3), write_page, write_pos, reqs, tables);
  s.ours = true;
  s.k = k, s.v = v, s.write_page = write_page, s.write_pos = write_pos, s.reqs = reqs, s.tables = tables;
  s.paged = paged, s.n_rep = n_rep, s.scale = scale, s.window = window, s.tokens = tokens;
  steps.push_back(std::move(s));
}

void enter_other_step() { steps.emplace_back(); }

void leave_step() {
  TORCH_CHECK(!steps.empty(), "leave_step: no step entered");
  steps.pop_back();
}

at::Tensor cache_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t layer) {
  if (steps.empty() || !steps.back().ours) {
    static auto python = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dspark::cache_attention", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
    return python.call(q, k, v, layer);
  }
  const Step& s = steps.back();
  TORCH_CHECK(layer >= 0 && layer < s.k.size(0), "cache_attention: no such layer");
  const int64_t n = s.tokens, T = q.size(0);
  TORCH_CHECK(T >= n && k.size(0) == T && v.size(0) == T, "cache_attention: fewer rows than the step's tokens");
  // Rows past the step's tokens repeat the last one (a one-token step padded to two).
  at::Tensor out = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor head = out.narrow(0, 0, n);
  const at::Tensor kc = s.k.select(0, layer), vc = s.v.select(0, layer);
  const at::Tensor qn = q.narrow(0, 0, n).contiguous(), kn = k.narrow(0, 0, n).contiguous(),
                   vn = v.narrow(0, 0, n).contiguous();
  check_tensors(qn, kn, vn, kc, vc, head, s.paged, s.n_rep);
  write_and_run(qn, kn, vn, kc, vc, s.write_page.data_ptr<int64_t>(), s.write_pos.data_ptr<int64_t>(), s.list, s.paged,
                s.n_rep, s.scale, s.window, head);
  if (T > n) out.narrow(0, n, T - n).copy_(out.narrow(0, n - 1, 1).expand({T - n, q.size(1), q.size(2)}));
  return out;
}

}  // namespace

TORCH_LIBRARY(dspark_attn, lib) {
  lib.def("short_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor write_page, "
          "Tensor write_pos, Tensor reqs, Tensor tables, bool paged, int n_rep, float scale, int window, "
          "Tensor(c!) out) -> ()");
  lib.def("enter_step(Tensor k, Tensor v, Tensor write_page, Tensor write_pos, Tensor reqs, Tensor tables, "
          "bool paged, int n_rep, float scale, int window, int tokens) -> ()");
  lib.def("enter_other_step() -> ()");
  lib.def("leave_step() -> ()");
  lib.def("cache_attention(Tensor q, Tensor k, Tensor v, int layer) -> Tensor");
}

TORCH_LIBRARY_IMPL(dspark_attn, CPU, lib) {
  lib.impl("short_attention", &short_attention);
  lib.impl("cache_attention", &cache_attention);
}

TORCH_LIBRARY_IMPL(dspark_attn, CatchAll, lib) {
  lib.impl("enter_step", &enter_step);
  lib.impl("enter_other_step", &enter_other_step);
  lib.impl("leave_step", &leave_step);
}
