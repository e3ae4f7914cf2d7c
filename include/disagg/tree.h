// Token-tree kernels for speculative decoding on the CPU (torch-free): build the traversal
// structures and the bit-packed attention mask of a batch of draft trees, and verify the trees
// against the target model greedily or by lossless speculative sampling.
//
// A tree is a parent array: parents[b, 0] == -1 (node 0 is the root, the last accepted token),
// 0 <= parents[b, i] < i for 0 < i < num_nodes[b]. Entries at i >= num_nodes[b] are padding and
// are never read. Index inputs arrive as int64 (the torch side widens int32 losslessly).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "disagg/common.h"
#include "disagg/philox.h"

namespace disagg {

// What was wrong, for the torch side to turn into a message naming the argument.
enum class TreeErrorKind : int32_t {
  kNone = 0,
  kNumNodes,     // num_nodes[b] outside [1, N]
  kRoot,         // parents[b, 0] != -1
  kParent,       // parents[b, i] outside [0, i): forward reference, cycle or out of range
  kDepth,        // a leaf deeper than max_depth (tree_build's leaf_paths)
  kToken,        // tokens[b, i] outside [0, V)
  kTemperature,  // temperature[b] < 0 or not finite
  kTopK,         // top_k[b] < 0
  kTopP,         // top_p[b] outside (0, 1]
};

struct TreeError {
  TreeErrorKind kind = TreeErrorKind::kNone;
  int64_t b = 0, i = 0;
  double value = 0;
};

// A batch of trees. All arrays are contiguous: parents/tokens [B, N], num_nodes [B].
struct TreeBatch {
  const int64_t* parents = nullptr;
  const int64_t* num_nodes = nullptr;
  const int64_t* tokens = nullptr;  // may be null for tree_build
  int64_t batch = 0;
  int64_t nodes = 0;  // N
};

// Sequential (first error wins, deterministic) and O(B*N): cheap next to any verification.
// vocab > 0 also checks tokens[b, i] in [0, vocab) for the non-root nodes.
inline Status tree_validate(const TreeBatch& t, int64_t vocab, TreeError* err) {
  for (int64_t b = 0; b < t.batch; ++b) {
    const int64_t n = t.num_nodes[b];
    if (n < 1 || n > t.nodes) {
      *err = {TreeErrorKind::kNumNodes, b, 0, static_cast<double>(n)};
      return Status::kInvalidArgument;
    }
    const int64_t* par = t.parents + b * t.nodes;
    if (par[0] != -1) {
      *err = {TreeErrorKind::kRoot, b, 0, static_cast<double>(par[0])};
      return Status::kInvalidArgument;
    }
    // parent < child rules out cycles and forward references in one comparison per node.
    for (int64_t i = 1; i < n; ++i) {
      if (par[i] < 0 || par[i] >= i) {
        *err = {TreeErrorKind::kParent, b, i, static_cast<double>(par[i])};
        return Status::kInvalidArgument;
      }
    }
    if (vocab > 0 && t.tokens) {
      const int64_t* tok = t.tokens + b * t.nodes;
      for (int64_t i = 1; i < n; ++i) {
        if (tok[i] < 0 || tok[i] >= vocab) {
          *err = {TreeErrorKind::kToken, b, i, static_cast<double>(tok[i])};
          return Status::kInvalidArgument;
        }
      }
    }
  }
  return Status::kOk;
}

namespace detail {

// Children lists in index order: first_child[i], next_sibling[i] (-1 = none). Requires a
// validated tree of n nodes; entries n..N-1 are set to -1.
inline void tree_children(const int64_t* par, int64_t n, int64_t N, int32_t* first_child,
                          int32_t* next_sibling) {
  for (int64_t i = 0; i < N; ++i) first_child[i] = next_sibling[i] = -1;
  // Walking backwards and pushing at the front leaves every list in ascending index order.
  for (int64_t i = n - 1; i >= 1; --i) {
    next_sibling[i] = first_child[par[i]];
    first_child[par[i]] = static_cast<int32_t>(i);
  }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// tree_build. Outputs (all int32, contiguous):
//   depth [B, N]          depth of each node (root 0), -1 for padding
//   mask [B, N, W]        W = ceil(N/32) words; bit (j % 32) of word j/32 in row i is set iff
//                         node j is node i or one of its ancestors. Padding rows are zero.
//   first_child, next_sibling [B, N]   children in index order, -1 = none / padding
//   leaf_paths [B, N, D]  row k: root-to-leaf node indices of the k-th leaf (leaves in index
//                         order), -1 padded; rows k >= num_leaves[b] are all -1
//   num_leaves [B]
// A leaf deeper than D-1 is an error (kDepth).
inline Status tree_build_cpu(const TreeBatch& t, int64_t D, int32_t* depth, int32_t* mask,
                             int32_t* first_child, int32_t* next_sibling, int32_t* leaf_paths,
                             int32_t* num_leaves, TreeError* err) {
  if (D < 1) return Status::kInvalidArgument;
  Status s = tree_validate(t, 0, err);
  if (s != Status::kOk) return s;
  const int64_t N = t.nodes, W = (N + 31) / 32;
  // Depth first (cheap, sequential) so that a too-deep tree fails before any parallel work.
  for (int64_t b = 0; b < t.batch; ++b) {
    const int64_t* par = t.parents + b * N;
    int32_t* d = depth + b * N;
    const int64_t n = t.num_nodes[b];
    d[0] = 0;
    for (int64_t i = 1; i < n; ++i) {
      d[i] = d[par[i]] + 1;
      if (d[i] > D - 1) {
        *err = {TreeErrorKind::kDepth, b, i, static_cast<double>(d[i])};
        return Status::kInvalidArgument;
      }
    }
    for (int64_t i = n; i < N; ++i) d[i] = -1;
  }
#pragma omp parallel for schedule(dynamic, 1) if (t.batch * N * W > 16384)
  for (int64_t b = 0; b < t.batch; ++b) {
    const int64_t* par = t.parents + b * N;
    const int64_t n = t.num_nodes[b];
    const int32_t* d = depth + b * N;
    int32_t* m = mask + b * N * W;
    int32_t* fc = first_child + b * N;
    int32_t* ns = next_sibling + b * N;
    // A node's row is its parent's row plus its own bit: parents come first.
    std::memset(m, 0, sizeof(int32_t) * N * W);
    for (int64_t i = 0; i < n; ++i) {
      int32_t* row = m + i * W;
      if (i > 0) std::memcpy(row, m + par[i] * W, sizeof(int32_t) * W);
      row[i / 32] = static_cast<int32_t>(static_cast<uint32_t>(row[i / 32]) | (1u << (i % 32)));
    }
    detail::tree_children(par, n, N, fc, ns);
    int32_t* lp = leaf_paths + b * N * D;
    std::fill(lp, lp + N * D, -1);
    int32_t leaves = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (fc[i] >= 0) continue;
      int32_t* row = lp + static_cast<int64_t>(leaves) * D;
      for (int64_t j = i; j >= 0; j = par[j]) row[d[j]] = static_cast<int32_t>(j);
      ++leaves;
    }
    num_leaves[b] = leaves;
  }
  return Status::kOk;
}

// ---------------------------------------------------------------------------------------------
// Row helpers. Everything works on float rows: bf16/fp16 rows are widened into a scratch row
// first (an L1/L2-resident copy), so one vectorisable float path serves every dtype.

namespace detail {

inline const float* row_as_float(const float* row, int64_t, float*) { return row; }

inline const float* row_as_float(const bf16_t* row, int64_t V, float* buf) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  for (int64_t v = 0; v < V; ++v) {
    const uint32_t u = static_cast<uint32_t>(bits[v]) << 16;
    std::memcpy(buf + v, &u, sizeof(float));
  }
  return buf;
}

// fp16 -> float through a 64 Ki-entry table: the bit-exact conversion is branchy, a lookup is not.
inline const float* f16_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) t[h] = to_float(f16_t{static_cast<uint16_t>(h)});
    return t;
  }();
  return table.data();
}

inline const float* row_as_float(const f16_t* row, int64_t V, float* buf) {
  const float* tab = f16_table();
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  for (int64_t v = 0; v < V; ++v) buf[v] = tab[bits[v]];
  return buf;
}

constexpr int kLanes = 8;

// Maximum ignoring NaN (a NaN never wins `x > m`); -inf for an all-NaN row. Written with
// independent lanes so the compiler vectorises it without -ffast-math.
inline float row_max(const float* x, int64_t V) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -std::numeric_limits<float>::infinity();
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = x[v + l] > acc[l] ? x[v + l] : acc[l];
  float m = -std::numeric_limits<float>::infinity();
  for (; v < V; ++v) m = x[v] > m ? x[v] : m;
  for (int l = 0; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
  return m;
}

// Greedy choice: the lowest token id holding the maximum, NaN counting as -inf (so a row with
// nothing above -inf chooses token 0). Vectorised maxima of 512-entry blocks first, then a scalar
// scan of the first block that holds the overall maximum: one pass plus at most 512 compares.
inline int64_t row_argmax(const float* x, int64_t V) {
  constexpr int64_t kBlock = 512;
  float m = -std::numeric_limits<float>::infinity();
  int64_t best = -1;
  for (int64_t b0 = 0; b0 < V; b0 += kBlock) {
    const float bm = row_max(x + b0, std::min(kBlock, V - b0));
    if (bm > m) { m = bm; best = b0; }
  }
  if (best < 0) return 0;
  const int64_t end = std::min(best + kBlock, V);
  for (int64_t v = best; v < end; ++v)
    if (x[v] == m) return v;
  return 0;
}

inline float row_sum(const float* x, int64_t V) {
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[v + l];
  float s = 0.0f;
  for (; v < V; ++v) s += x[v];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// exp(x) for x <= 0 (Cephes' single-precision polynomial, ~1 ulp), exactly 0 below -87 and
// for -inf: masked tokens must get probability exactly 0. The clamp and the final select compare
// the float's bits as integers (for x <= 0, a larger magnitude is a larger unsigned pattern):
// integer selects vectorise under default flags, float comparisons that might trap do not.
inline float exp_nonpos(float x) {
  constexpr uint32_t kLimit = 0xC2AE0000u;  // -87.0f
  uint32_t ux;
  std::memcpy(&ux, &x, sizeof(ux));
  const uint32_t under = ux > kLimit ? 0xFFFFFFFFu : 0u;
  const uint32_t uc = (ux & ~under) | (kLimit & under);
  float xc;
  std::memcpy(&xc, &uc, sizeof(xc));
  const float fn = static_cast<float>(static_cast<int32_t>(xc * 1.44269504088896341f - 0.5f));
  float r = xc - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  const float e = y * scale;
  uint32_t ue;
  std::memcpy(&ue, &e, sizeof(ue));
  ue &= ~under;
  float out;
  std::memcpy(&out, &ue, sizeof(out));
  return out;
}

inline bool prob_before(const float* p, int32_t a, int32_t b) { return ranks_before(p[a], a, p[b], b); }

// Keeps the smallest set of most probable tokens (ties to the lower id) whose mass reaches
// top_p * total and zeroes the rest, without sorting the vocabulary: for p >= 0 the float's bit
// pattern orders like its value, so a histogram of the mass over the top 12 bits (exponent and
// 3 mantissa bits) finds the bucket holding the cutoff in one pass; only that bucket is sorted.
inline void apply_top_p(float* p, int64_t V, double top_p, int32_t* idx) {
  constexpr int kShift = 20, kBuckets = 1 << (32 - kShift);
  std::vector<double> mass(kBuckets, 0.0);
  double total = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    if (p[v] > 0.0f) {
      uint32_t u;
      std::memcpy(&u, p + v, sizeof(u));
      mass[u >> kShift] += p[v];
      total += p[v];
    }
  }
  const double target = top_p * total;
  double above = 0.0;
  int64_t cut = -1;
  for (int64_t k = kBuckets - 1; k >= 0; --k) {
    if (above + mass[k] >= target && mass[k] > 0.0) { cut = k; break; }
    above += mass[k];
  }
  if (cut < 0) return;  // rounding: the whole support is needed
  int64_t n = 0;
  for (int64_t v = 0; v < V; ++v) {
    uint32_t u;
    std::memcpy(&u, p + v, sizeof(u));
    if (p[v] > 0.0f && static_cast<int64_t>(u >> kShift) == cut) idx[n++] = static_cast<int32_t>(v);
  }
  std::sort(idx, idx + n, [&](int32_t a, int32_t b) { return prob_before(p, a, b); });
  int32_t cutoff = idx[n - 1];
  double acc = above;
  for (int64_t j = 0; j < n; ++j) {
    acc += p[idx[j]];
    if (acc >= target) { cutoff = idx[j]; break; }
  }
  for (int64_t v = 0; v < V; ++v)
    if (p[v] > 0.0f && prob_before(p, cutoff, static_cast<int32_t>(v))) p[v] = 0.0f;
}

// Draws a token from the non-negative weights p (not necessarily normalised) with u in [0,1).
// Block sums first so that only one block of 256 is scanned element by element.
inline int64_t sample_from(const float* p, int64_t V, double u) {
  constexpr int64_t kBlock = 256;
  const int64_t nb = (V + kBlock - 1) / kBlock;
  double total = 0.0;
  // Small enough stack buffer for V up to 256 Ki; beyond that fall back to two passes.
  double sums_buf[1024];
  const bool cache = nb <= 1024;
  for (int64_t k = 0; k < nb; ++k) {
    const int64_t b0 = k * kBlock, n = std::min(kBlock, V - b0);
    const double s = row_sum(p + b0, n);
    if (cache) sums_buf[k] = s;
    total += s;
  }
  if (!(total > 0.0)) return row_argmax(p, V);
  const double target = u * total;
  double acc = 0.0;
  int64_t last_pos = -1;
  for (int64_t k = 0; k < nb; ++k) {
    const int64_t b0 = k * kBlock, n = std::min(kBlock, V - b0);
    const double s = cache ? sums_buf[k] : static_cast<double>(row_sum(p + b0, n));
    if (acc + s <= target && k + 1 < nb) {
      acc += s;
      continue;
    }
    for (int64_t v = b0; v < b0 + n; ++v) {
      if (p[v] <= 0.0f) continue;
      acc += p[v];
      last_pos = v;
      if (acc > target) return v;
    }
    if (k + 1 >= nb) break;
  }
  if (last_pos >= 0) return last_pos;
  // Rounding put the target past every block: the last token with weight.
  for (int64_t v = V - 1; v >= 0; --v)
    if (p[v] > 0.0f) return v;
  return 0;
}

// The target's sampling distribution at one row, normalised, into p[V]:
// logits / temperature -> top-k (ties to the lower id) -> softmax -> top-p -> renormalise.
// NaN logits count as -inf. A row with +inf entries shares the mass equally among them; a row
// with no logit above -inf is one-hot on its greedy choice.
inline void target_probs(const float* x, int64_t V, float temperature, int64_t top_k, float top_p,
                         float* p, float* scratch, int32_t* idx) {
  for (int64_t v = 0; v < V; ++v) {
    const float y = x[v] / temperature;
    p[v] = std::isnan(y) ? -std::numeric_limits<float>::infinity() : y;
  }
  const float m = row_max(p, V);
  if (m == std::numeric_limits<float>::infinity()) {
    float n = 0.0f;
    for (int64_t v = 0; v < V; ++v) n += (p[v] == m) ? 1.0f : 0.0f;
    for (int64_t v = 0; v < V; ++v) p[v] = (p[v] == m) ? 1.0f / n : 0.0f;
    return;
  }
  if (m == -std::numeric_limits<float>::infinity()) {
    std::fill(p, p + V, 0.0f);
    p[row_argmax(x, V)] = 1.0f;
    return;
  }
  if (top_k > 0 && top_k < V) {
    float kth;
    if (top_k <= 1024) {
      // A min-heap of the k largest values seen: one pass, and for any realistic row almost
      // every entry is rejected by a single compare with the heap's top.
      std::memcpy(scratch, p, sizeof(float) * top_k);
      std::make_heap(scratch, scratch + top_k, std::greater<float>());
      for (int64_t v = top_k; v < V; ++v) {
        if (p[v] > scratch[0]) {
          std::pop_heap(scratch, scratch + top_k, std::greater<float>());
          scratch[top_k - 1] = p[v];
          std::push_heap(scratch, scratch + top_k, std::greater<float>());
        }
      }
      kth = scratch[0];
    } else {
      std::memcpy(scratch, p, sizeof(float) * V);
      std::nth_element(scratch, scratch + (top_k - 1), scratch + V, std::greater<float>());
      kth = scratch[top_k - 1];
    }
    int64_t greater = 0;
    for (int64_t v = 0; v < V; ++v) greater += p[v] > kth;
    int64_t equal_left = top_k - greater;
    for (int64_t v = 0; v < V; ++v) {
      if (p[v] > kth) continue;
      if (p[v] == kth && equal_left > 0) { --equal_left; continue; }
      p[v] = -std::numeric_limits<float>::infinity();
    }
  }
  for (int64_t v = 0; v < V; ++v) p[v] = exp_nonpos(p[v] - m);
  if (top_p < 1.0f) apply_top_p(p, V, top_p, idx);
  const float inv = 1.0f / row_sum(p, V);
  for (int64_t v = 0; v < V; ++v) p[v] *= inv;
}

// Checks the per-request sampling parameters (sequential, first error wins).
inline Status check_sampling(int64_t B, const float* temperature, const int64_t* top_k,
                             const float* top_p, TreeError* err) {
  for (int64_t b = 0; b < B; ++b) {
    if (!(temperature[b] >= 0.0f) || std::isinf(temperature[b])) {
      *err = {TreeErrorKind::kTemperature, b, 0, temperature[b]};
      return Status::kInvalidArgument;
    }
    if (top_k[b] < 0) {
      *err = {TreeErrorKind::kTopK, b, 0, static_cast<double>(top_k[b])};
      return Status::kInvalidArgument;
    }
    if (!(top_p[b] > 0.0f && top_p[b] <= 1.0f)) {
      *err = {TreeErrorKind::kTopP, b, 0, top_p[b]};
      return Status::kInvalidArgument;
    }
  }
  return Status::kOk;
}

}  // namespace detail

// Logits of a batch of trees: row (b, i) starts at data + b * stride_b + i * stride_n and is
// contiguous over the V entries. Row (b, i) is the target's next-token distribution after node i.
template <typename T>
struct RowsView {
  const T* data = nullptr;
  int64_t stride_b = 0, stride_n = 0, vocab = 0;
  const T* row(int64_t b, int64_t i) const { return data + b * stride_b + i * stride_n; }
};

// Outputs of verification: accepted [B, N] node indices along the accepted path from the root
// (-1 padded), accept_len [B] = entries of accepted (>= 1, the root included), bonus [B] = the
// target's token after the last accepted node.
struct VerifyOut {
  int32_t* accepted = nullptr;
  int32_t* accept_len = nullptr;
  int32_t* bonus = nullptr;
};

namespace detail {

// Greedy walk of one request given a "target choice at node i" function. Only the rows of the
// nodes on the accepted path are ever asked for.
template <typename Choice>
inline void greedy_walk(const TreeBatch& t, int64_t b, const int32_t* fc, const int32_t* ns,
                        Choice&& choice, const VerifyOut& o) {
  const int64_t N = t.nodes;
  const int64_t* tok = t.tokens + b * N;
  int32_t* acc = o.accepted + b * N;
  int64_t cur = 0, len = 0;
  acc[len++] = 0;
  for (;;) {
    const int64_t want = choice(cur);
    int64_t next = -1;
    for (int32_t c = fc[cur]; c >= 0; c = ns[c])
      if (tok[c] == want) { next = c; break; }
    if (next < 0) {
      o.bonus[b] = static_cast<int32_t>(want);
      break;
    }
    acc[len++] = static_cast<int32_t>(next);
    cur = next;
  }
  o.accept_len[b] = static_cast<int32_t>(len);
  for (int64_t j = len; j < N; ++j) acc[j] = -1;
}

}  // namespace detail

// Greedy verification from logits. A child is accepted when its token is the target's argmax
// (ties to the lower id, NaN counts as -inf); among equal sibling tokens the lowest index wins.
template <typename T>
Status tree_verify_greedy_cpu(const RowsView<T>& logits, const TreeBatch& t, const VerifyOut& o,
                              TreeError* err) {
  Status s = tree_validate(t, logits.vocab, err);
  if (s != Status::kOk) return s;
  const int64_t N = t.nodes, V = logits.vocab;
#pragma omp parallel if (t.batch > 1)
  {
    std::vector<int32_t> fc(N), ns(N);
    std::vector<float> buf(std::is_same<T, float>::value ? 0 : V);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < t.batch; ++b) {
      detail::tree_children(t.parents + b * N, t.num_nodes[b], N, fc.data(), ns.data());
      detail::greedy_walk(t, b, fc.data(), ns.data(), [&](int64_t i) {
        return detail::row_argmax(detail::row_as_float(logits.row(b, i), V, buf.data()), V);
      }, o);
    }
  }
  return Status::kOk;
}

// Greedy verification from precomputed target choices ids [B, N] (stride_b between requests).
inline Status tree_verify_greedy_ids_cpu(const int64_t* ids, int64_t ids_stride_b,
                                         const TreeBatch& t, const VerifyOut& o, TreeError* err) {
  Status s = tree_validate(t, 0, err);
  if (s != Status::kOk) return s;
  const int64_t N = t.nodes;
  std::vector<int32_t> fc(N), ns(N);
  for (int64_t b = 0; b < t.batch; ++b) {
    detail::tree_children(t.parents + b * N, t.num_nodes[b], N, fc.data(), ns.data());
    detail::greedy_walk(t, b, fc.data(), ns.data(),
                        [&](int64_t i) { return ids[b * ids_stride_b + i]; }, o);
  }
  return Status::kOk;
}

struct SampleParams {
  const float* temperature = nullptr;  // [B], 0 = greedy
  const int64_t* top_k = nullptr;      // [B], 0 = off
  const float* top_p = nullptr;        // [B], 1 = off
  const int64_t* seed = nullptr;       // [B] Philox key
  const int64_t* offset = nullptr;     // [B] Philox counter base
};

// Lossless verification by speculative sampling. At each visited node the target distribution p
// is the filtered softmax of the row (see target_probs); the node's children are tried in index
// order, each with one uniform number u = philox_uniform(seed[b], offset[b], draw++):
//  * deterministic drafts (draft == nullptr): a child with token x is accepted iff
//    u * R < p(x), R the mass not yet rejected; on rejection p(x) := 0, R -= p(x). This is
//    sampling from p without replacement over the candidates, so the accepted token (or the
//    residual sample) is distributed exactly as p, whatever the candidates and their repeats.
//  * stochastic drafts (draft rows q, children drawn i.i.d. from q at their parent): accept x
//    iff u * q(x) < p(x) (probability min(1, p/q); q(x) == 0 accepts iff p(x) > 0); on
//    rejection p := normalise(max(p - q, 0)) (SpecInfer's multi-step speculative sampling).
// When every child is rejected (or the node is a leaf) the bonus is drawn from the current p
// with one more uniform. temperature == 0 runs the greedy rule of tree_verify_greedy (no draws).
template <typename T, typename Q>
Status tree_verify_sample_cpu(const RowsView<T>& logits, const RowsView<Q>* draft,
                              const TreeBatch& t, const SampleParams& sp, const VerifyOut& o,
                              TreeError* err) {
  Status s = tree_validate(t, logits.vocab, err);
  if (s != Status::kOk) return s;
  s = detail::check_sampling(t.batch, sp.temperature, sp.top_k, sp.top_p, err);
  if (s != Status::kOk) return s;
  const int64_t N = t.nodes, V = logits.vocab;
#pragma omp parallel if (t.batch > 1)
  {
    std::vector<int32_t> fc(N), ns(N), idx(V);
    std::vector<float> p(V), scratch(V), xbuf(V), qbuf(draft ? V : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < t.batch; ++b) {
      detail::tree_children(t.parents + b * N, t.num_nodes[b], N, fc.data(), ns.data());
      const int64_t* tok = t.tokens + b * N;
      const float temp = sp.temperature[b];
      if (temp == 0.0f) {
        detail::greedy_walk(t, b, fc.data(), ns.data(), [&](int64_t i) {
          return detail::row_argmax(detail::row_as_float(logits.row(b, i), V, xbuf.data()), V);
        }, o);
        continue;
      }
      const uint64_t seed = static_cast<uint64_t>(sp.seed[b]);
      const uint64_t offset = static_cast<uint64_t>(sp.offset[b]);
      uint32_t draw = 0;
      int32_t* acc = o.accepted + b * N;
      int64_t cur = 0, len = 0;
      acc[len++] = 0;
      for (;;) {
        const float* x = detail::row_as_float(logits.row(b, cur), V, xbuf.data());
        detail::target_probs(x, V, temp, sp.top_k[b], sp.top_p[b], p.data(), scratch.data(),
                             idx.data());
        int64_t next = -1;
        if (draft == nullptr) {
          double remaining = 1.0;
          for (int32_t c = fc[cur]; c >= 0 && next < 0; c = ns[c]) {
            const double u = philox_uniform(seed, offset, draw++);
            const float px = p[tok[c]];
            if (px > 0.0f && u * remaining < px) {
              next = c;
            } else {
              remaining = std::max(0.0, remaining - px);
              p[tok[c]] = 0.0f;
            }
          }
        } else {
          const float* q = detail::row_as_float(draft->row(b, cur), V, qbuf.data());
          for (int32_t c = fc[cur]; c >= 0 && next < 0; c = ns[c]) {
            const double u = philox_uniform(seed, offset, draw++);
            const float px = p[tok[c]], qx = q[tok[c]];
            const bool ok = qx > 0.0f ? (u * qx < px) : (px > 0.0f);
            if (ok) {
              next = c;
              break;
            }
            float* pp = p.data();
            for (int64_t v = 0; v < V; ++v) {
              const float r = pp[v] - q[v];
              scratch[v] = r > 0.0f ? r : 0.0f;
            }
            const float rs = detail::row_sum(scratch.data(), V);
            // rs == 0 means p <= q everywhere, i.e. p == q up to rounding: a rejection was then
            // a rounding artefact, and p itself is the right distribution to continue with.
            if (rs > 0.0f) {
              const float inv = 1.0f / rs;
              for (int64_t v = 0; v < V; ++v) pp[v] = scratch[v] * inv;
            }
          }
        }
        if (next < 0) {
          o.bonus[b] = static_cast<int32_t>(
              detail::sample_from(p.data(), V, philox_uniform(seed, offset, draw++)));
          break;
        }
        acc[len++] = static_cast<int32_t>(next);
        cur = next;
      }
      o.accept_len[b] = static_cast<int32_t>(len);
      for (int64_t j = len; j < N; ++j) acc[j] = -1;
    }
  }
  return Status::kOk;
}

}  // namespace disagg
