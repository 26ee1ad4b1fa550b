// edgellm's CUDA kernels. Each has a numpy mirror of its arithmetic in mirror.py (same names),
// operation for operation: integer sums are exact, float32 sums run in the order written here
// (build with -fmad=false, so no multiply-add is contracted; launch.py passes it), and only
// expf / tanhf / cos / sin may differ from numpy's by their last bits.
//
// Weights are GGUF rows as the file holds them (the CPU kernels read the same bytes):
//   w # (n_rows, row_bytes) uint8, row_bytes = blocks per row * block bytes
// Activations for the dot products are rounded per 32-element block to 15-bit integers
// v = rint(x * 16256 / amax), carried as two int8 parts v = 128 hi + lo (two dp4a per 4 weights:
// the CPU family's precision, ~100x finer than llama.cpp's 8-bit activations).

#define FULL_MASK 0xffffffffu
#define QK 32          // elements per activation block (and per dot-product item)
#define XMAX 16256.0f  // 127 * 128: |v| <= 16256 (+1 by rounding)
#define NEG_INF __int_as_float(0xff800000)
#define MAX_T 8        // tokens a GEMV meets per launch (weights decoded once for all of them)

enum { Q4_K = 0, Q6_K = 1, Q8_0 = 2, Q5_0 = 3 };

__device__ __forceinline__ float warp_sum(float v) {  // butterfly: every lane ends with the same sum
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
  return v;
}

// 4 bytes from a 2-byte aligned address (Q6_K, Q5_0 and Q8_0 blocks are 210, 22 and 34 bytes)
__device__ __forceinline__ int load_int_b2(const unsigned char* p) {
  const unsigned short* h = (const unsigned short*)p;
  return (int)((unsigned)h[0] | ((unsigned)h[1] << 16));
}

// IEEE half -> float by the conversion instruction (no cuda_fp16.h: NVRTC needs no headers)
__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float load_half(const unsigned char* p) {
  return half_to_float(*(const unsigned short*)p);
}

// ---- activations --------------------------------------------------------------------------------

// x (T, K) f32 -> xh, xl (T, K) int8 (v = 128 xh + xl), xd (T, K/32) f32 (the step: x ~ v * xd),
// xs (T, K/32) int32 (the block's sum of v). One warp per block, lane = element.
extern "C" __global__ void quantize_x(const float* __restrict__ x, int n_blocks, signed char* __restrict__ xh,
                                      signed char* __restrict__ xl, float* __restrict__ xd, int* __restrict__ xs) {
  int b = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // block over all tokens (T * K/32)
  int lane = threadIdx.x % 32;
  if (b >= n_blocks) return;
  float v = x[b * QK + lane];
  float amax = warp_max(fabsf(v));
  float q = 0.0f;
  if (amax > 0.0f) q = rintf(v * (XMAX / amax));
  float hi = rintf(q / 128.0f);
  xh[b * QK + lane] = (signed char)(int)hi;
  xl[b * QK + lane] = (signed char)(int)(q - 128.0f * hi);
  int sum = warp_sum_int((int)q);
  if (lane == 0) {
    xd[b] = amax / XMAX;
    xs[b] = sum;
  }
}

// ---- GEMV: y (T, N) = x (T, K) W^T for T <= MAX_T, straight from GGUF blocks ---------------------

// The 32 weights of dot-product item j (elements 32 j .. 32 j + 31 of a row) as 8 ints of 4 int8,
// and the integer scales that go with them.
struct Item {
  int q[8];     // packed int8 weights (Q4_K: 0..15, Q6_K: -32..31, Q8_0: int8, Q5_0: -16..15)
  int sc0, sc1; // Q4_K: scale (sc0) and min (sc1) of 6 bits; Q6_K: int8 scales of elements 0-15, 16-31
  float d, dmin;
};

template <int TYPE>
__device__ __forceinline__ void load_item(const unsigned char* row, int j, Item& it) {
  if (TYPE == Q8_0) {  // d (2 B) | qs (32 B)
    const unsigned char* b = row + 34 * j;
    it.d = load_half(b);
    for (int i = 0; i < 8; i++) it.q[i] = load_int_b2(b + 2 + 4 * i);
  } else if (TYPE == Q5_0) {  // d (2 B) | qh (4 B) | qs (16 B): low nibbles 0-15, high 16-31
    const unsigned char* b = row + 22 * j;
    it.d = load_half(b);
    unsigned qh = (unsigned)load_int_b2(b + 2);
    for (int i = 0; i < 4; i++) {
      unsigned qs = (unsigned)load_int_b2(b + 6 + 4 * i);
      unsigned lo = qs & 0x0F0F0F0Fu, hi = (qs >> 4) & 0x0F0F0F0Fu;
      for (int k = 0; k < 4; k++) {
        lo |= ((qh >> (4 * i + k)) & 1u) << (8 * k + 4);
        hi |= ((qh >> (16 + 4 * i + k)) & 1u) << (8 * k + 4);
      }
      it.q[i] = (int)__vsub4(lo, 0x10101010u);
      it.q[4 + i] = (int)__vsub4(hi, 0x10101010u);
    }
  } else if (TYPE == Q4_K) {  // d | dmin | scales (12 B) | qs (128 B): 64 elements per 32 bytes
    const unsigned char* b = row + 144 * (j / 8);
    int s = j % 8;
    it.d = load_half(b);
    it.dmin = load_half(b + 2);
    const unsigned char* sc = b + 4;
    if (s < 4) {
      it.sc0 = sc[s] & 63;
      it.sc1 = sc[s + 4] & 63;
    } else {
      it.sc0 = (sc[s + 4] & 0xF) | ((sc[s - 4] >> 6) << 4);
      it.sc1 = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    }
    // 32 bytes in two 16-byte loads: rows are 144-byte blocks on a 256-byte aligned base
    const int4* qs = (const int4*)(b + 16 + 32 * (s / 2));
    int4 u = qs[0], v = qs[1];
    int w[8] = {u.x, u.y, u.z, u.w, v.x, v.y, v.z, v.w};
    int shift = 4 * (s % 2);
    for (int i = 0; i < 8; i++) it.q[i] = (w[i] >> shift) & 0x0F0F0F0F;
  } else {  // Q6_K: ql (128 B) | qh (64 B) | scales (16 B, int8 per 16 elements) | d (2 B)
    const unsigned char* b = row + 210 * (j / 8);
    int s = j % 8, h = s / 4, g = s % 4;  // half of 128 elements, group of 32 in it
    it.d = load_half(b + 208);
    const signed char* sc = (const signed char*)(b + 192);
    it.sc0 = sc[8 * h + 2 * g];
    it.sc1 = sc[8 * h + 2 * g + 1];
    const unsigned char* ql = b + 64 * h + 32 * (g % 2);
    const unsigned char* qh = b + 128 + 32 * h;
    int nshift = 4 * (g / 2), hshift = 2 * g;
    for (int i = 0; i < 8; i++) {
      unsigned lo = ((unsigned)load_int_b2(ql + 4 * i) >> nshift) & 0x0F0F0F0Fu;
      unsigned hi = (((unsigned)load_int_b2(qh + 4 * i) >> hshift) & 0x03030303u) << 4;
      it.q[i] = (int)__vsub4(lo | hi, 0x20202020u);
    }
  }
}

// item j's contribution to one token: x's block j as hi/lo int8 (8 ints each), its step and sum
template <int TYPE>
__device__ __forceinline__ float item_dot(const Item& it, const int* h, const int* l, float xd, int xs) {
  if (TYPE == Q6_K) {
    int ha = 0, la = 0, hb = 0, lb = 0;
    for (int i = 0; i < 4; i++) {
      ha = __dp4a(it.q[i], h[i], ha);
      la = __dp4a(it.q[i], l[i], la);
      hb = __dp4a(it.q[4 + i], h[4 + i], hb);
      lb = __dp4a(it.q[4 + i], l[4 + i], lb);
    }
    int s = it.sc0 * (128 * ha + la) + it.sc1 * (128 * hb + lb);
    return ((float)s * it.d) * xd;
  }
  int hs = 0, ls = 0;
  for (int i = 0; i < 8; i++) {
    hs = __dp4a(it.q[i], h[i], hs);
    ls = __dp4a(it.q[i], l[i], ls);
  }
  int s = 128 * hs + ls;
  if (TYPE == Q4_K) return ((float)(it.sc0 * s) * it.d - (float)(it.sc1 * xs) * it.dmin) * xd;
  return ((float)s * it.d) * xd;
}

// One warp per row; lane l takes items l, l + 32, ... in order, then the warp sums (warp_sum).
// xh, xl (T, K) int8, xd, xs (T, K/32); y (T, n_rows) f32.
template <int TYPE>
__device__ void gemv(const unsigned char* __restrict__ w, int n_rows, int row_bytes, int n_items, int T,
                     const signed char* __restrict__ xh, const signed char* __restrict__ xl,
                     const float* __restrict__ xd, const int* __restrict__ xs, float* __restrict__ y) {
  int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= n_rows) return;
  const unsigned char* wr = w + (size_t)row * row_bytes;
  int K = n_items * QK;
  float acc[MAX_T];
  for (int t = 0; t < MAX_T; t++) acc[t] = 0.0f;
  for (int j = lane; j < n_items; j += 32) {
    Item it;
    load_item<TYPE>(wr, j, it);
#pragma unroll
    for (int t = 0; t < MAX_T; t++) {
      if (t < T) {
        const int4* h = (const int4*)(xh + (size_t)t * K + QK * j);  // 32-byte aligned blocks
        const int4* l = (const int4*)(xl + (size_t)t * K + QK * j);
        int4 h0 = h[0], h1 = h[1], l0 = l[0], l1 = l[1];
        int hv[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
        int lv[8] = {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w};
        acc[t] += item_dot<TYPE>(it, hv, lv, xd[t * n_items + j], xs[t * n_items + j]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MAX_T; t++) {
    if (t < T) {
      float s = warp_sum(acc[t]);
      if (lane == 0) y[(size_t)t * n_rows + row] = s;
    }
  }
}

#define GEMV(name, TYPE)                                                                                  \
  extern "C" __global__ void name(const unsigned char* w, int n_rows, int row_bytes, int n_items, int T,  \
                                  const signed char* xh, const signed char* xl, const float* xd,          \
                                  const int* xs, float* y) {                                               \
    gemv<TYPE>(w, n_rows, row_bytes, n_items, T, xh, xl, xd, xs, y);                                      \
  }
GEMV(gemv_q4_k, Q4_K)
GEMV(gemv_q6_k, Q6_K)
GEMV(gemv_q8_0, Q8_0)
GEMV(gemv_q5_0, Q5_0)

// ---- dequantization for prefill: W (n_rows, K) f32, then a float32 GEMM (cuBLAS) ----------------

// One thread per item of 32 weights; gguf-py's order: (d * sc) * q - (dmin * m), (d * sc) * q, d * q.
template <int TYPE>
__device__ void dequant(const unsigned char* __restrict__ w, int n_rows, int row_bytes, int n_items,
                        float* __restrict__ out) {
  long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long long)n_rows * n_items) return;
  int row = (int)(idx / n_items), j = (int)(idx % n_items);
  Item it;
  load_item<TYPE>(w + (size_t)row * row_bytes, j, it);
  float* o = out + (size_t)row * n_items * QK + QK * j;
  for (int i = 0; i < 8; i++) {
    for (int k = 0; k < 4; k++) {
      int q = (int)(signed char)((it.q[i] >> (8 * k)) & 0xFF);
      float v;
      if (TYPE == Q4_K) v = (it.d * (float)it.sc0) * (float)q - it.dmin * (float)it.sc1;
      else if (TYPE == Q6_K) v = (it.d * (float)(i < 4 ? it.sc0 : it.sc1)) * (float)q;
      else v = it.d * (float)q;
      o[4 * i + k] = v;
    }
  }
}

#define DEQUANT(name, TYPE)                                                                                  \
  extern "C" __global__ void name(const unsigned char* w, int n_rows, int row_bytes, int n_items, float* out) { \
    dequant<TYPE>(w, n_rows, row_bytes, n_items, out);                                                        \
  }
DEQUANT(dequant_q4_k, Q4_K)
DEQUANT(dequant_q6_k, Q6_K)
DEQUANT(dequant_q8_0, Q8_0)
DEQUANT(dequant_q5_0, Q5_0)

// ---- norms, RoPE, gates -------------------------------------------------------------------------

#define NORM_THREADS 128

// y = x / sqrt(mean(x^2) + eps) * weight per row of D: squares f32, summed in f64 (thread i sums
// elements i, i + 128, ... in order, then a halving tree), mean rounded to f32. One block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight, int D, float eps,
                                    float* __restrict__ y) {
  __shared__ double part[NORM_THREADS];
  const float* xr = x + (size_t)blockIdx.x * D;
  float* yr = y + (size_t)blockIdx.x * D;
  double s = 0.0;
  for (int i = threadIdx.x; i < D; i += NORM_THREADS) s += (double)(xr[i] * xr[i]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int h = NORM_THREADS / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) part[threadIdx.x] += part[threadIdx.x + h];
    __syncthreads();
  }
  float mean = (float)(part[0] / (double)D);
  float scale = 1.0f / sqrtf(mean + eps);
  for (int i = threadIdx.x; i < D; i += NORM_THREADS) yr[i] = (xr[i] * scale) * weight[i];
}

// x, y (T, H, D) f32; pair i of each head turns by freq_scale * pos * theta_scale^i (the power by
// repeated f32 multiplication, as ggml); cos and sin in f64, rounded. neox: pair (i, i + n_rot/2),
// else (2i, 2i + 1); dims from n_rot on are copied. One thread per (token, head, pair).
extern "C" __global__ void rope(const float* __restrict__ x, const int* __restrict__ pos, int T, int H, int D,
                                int n_rot, float theta_scale, float freq_scale, int neox, float* __restrict__ y) {
  int half = n_rot / 2, n_pair = D / 2;
  long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long long)T * H * n_pair) return;
  int i = (int)(idx % n_pair);
  long long th = idx / n_pair;  // token * H + head
  int t = (int)(th / H);
  const float* xr = x + th * D;
  float* yr = y + th * D;
  if (i >= half) {  // dims 2i, 2i + 1 >= n_rot are not rotated (in either pairing): copy
    yr[2 * i] = xr[2 * i];
    yr[2 * i + 1] = xr[2 * i + 1];
    return;
  }
  float theta = (float)pos[t];
  for (int k = 0; k < i; k++) theta = theta * theta_scale;
  float ang = freq_scale * theta;
  float c = (float)cos((double)ang), s = (float)sin((double)ang);
  int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
  float x0 = xr[i0], x1 = xr[i1];
  yr[i0] = x0 * c - x1 * s;
  yr[i1] = x0 * s + x1 * c;
}

// out = silu(gate) * up = gate / (1 + exp(-gate)) * up, elementwise over n
extern "C" __global__ void silu_gate(const float* __restrict__ gate, const float* __restrict__ up, long long n,
                                     float* __restrict__ out) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float g = gate[i];
  out[i] = g / (1.0f + expf(-g)) * up[i];
}

// out = 0.5 g (1 + tanh(sqrt(2/pi) g (1 + 0.044715 g^2))) up
extern "C" __global__ void gelu_tanh_gate(const float* __restrict__ gate, const float* __restrict__ up, long long n,
                                          float* __restrict__ out) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float g = gate[i];
  float inner = 0.79788456080286535587989211986876f * g * (1.0f + 0.044715f * g * g);
  out[i] = 0.5f * g * (1.0f + tanhf(inner)) * up[i];
}

// ---- attention over a float16 KV cache (flash-decoding: the keys split in chunks) ---------------

#define ATT_THREADS 128
#define ATT_WARPS (ATT_THREADS / 32)
#define ATT_CHUNK 256  // keys per split

#define ATT_GROUP 8  // query heads per block at most, all reading one kv head's K and V once

// Grid (n_split, n_head / group, T), group (<= ATT_GROUP) dividing n_head / n_kv: block y runs query
// heads y * group .. y * group + group - 1, which share kv head (y * group) / (n_head / n_kv), so
// each K and V element is loaded once for all of them. Query t (position pos[t]) sees keys j with
// lo <= j <= pos[t], lo = max(0, pos[t] - window + 1) when window > 0; key j lives in cache row
// j % n_rows (a ring for sliding-window layers, the identity otherwise).
// Split s takes the visible keys in [s * ATT_CHUNK, (s + 1) * ATT_CHUNK) and writes, per head, its
// max score m, its sum of exp(score - m) and its exp-weighted sum of values; attention_combine
// merges the splits.
//   q     # (T, n_head, D) f32           kc # (n_rows, n_kv, D) f16     vc # (n_rows, n_kv, Dv) f16
//   acc   # (T, n_head, n_split, Dv) f32  ml # (T, n_head, n_split, 2) f32 (m, l)
// Per head, in this order: a score: warp w takes keys a + w, a + w + 4, ...; lane l sums q[d] k[d]
// for d = l, l + 32, ... in order, warp_sum, times scale. l: one warp's lanes sum p_j for j = a +
// lane, a + lane + 32, ..., then warp_sum. acc[d]: thread d (and d + 128, ...) sums p_j v_j[d] over
// the split's keys in order.
extern "C" __global__ void attention_split(const float* __restrict__ q, const unsigned short* __restrict__ kc,
                                           const unsigned short* __restrict__ vc, const int* __restrict__ pos, int n_head,
                                           int n_kv, int D, int Dv, int n_rows, int window, float scale, int group,
                                           float* __restrict__ acc, float* __restrict__ ml) {
  __shared__ float p[ATT_GROUP][ATT_CHUNK];
  __shared__ float m_g[ATT_GROUP];
  int s = blockIdx.x, h0 = blockIdx.y * group, t = blockIdx.z, n_split = gridDim.x;
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int kvh = h0 / (n_head / n_kv);
  int last = pos[t], first = window > 0 ? max(0, last - window + 1) : 0;
  int a = max(first, s * ATT_CHUNK), b = min(last + 1, (s + 1) * ATT_CHUNK);  // keys [a, b)
  int n = b - a;
  if (n <= 0) {  // nothing visible in this split
    for (int g = 0; g < group; g++) {
      size_t o = ((size_t)t * n_head + h0 + g) * n_split + s;
      for (int d = threadIdx.x; d < Dv; d += ATT_THREADS) acc[o * Dv + d] = 0.0f;
      if (threadIdx.x == 0) { ml[2 * o] = NEG_INF; ml[2 * o + 1] = 0.0f; }
    }
    return;
  }
  const float* qr = q + ((size_t)t * n_head + h0) * D;  // head h0 + g at qr + g * D
  for (int j = a + warp; j < b; j += ATT_WARPS) {
    const unsigned short* kr = kc + ((size_t)(j % n_rows) * n_kv + kvh) * D;
    float sum[ATT_GROUP];
    for (int g = 0; g < ATT_GROUP; g++) sum[g] = 0.0f;
    for (int d = lane; d < D; d += 32) {
      float k = half_to_float(kr[d]);
#pragma unroll
      for (int g = 0; g < ATT_GROUP; g++)
        if (g < group) sum[g] += qr[g * D + d] * k;
    }
#pragma unroll
    for (int g = 0; g < ATT_GROUP; g++) {
      if (g < group) {
        float v = warp_sum(sum[g]);
        if (lane == 0) p[g][j - a] = v * scale;
      }
    }
  }
  __syncthreads();
  for (int g = warp; g < group; g += ATT_WARPS) {  // the max: any order gives the same value
    float m = NEG_INF;
    for (int j = lane; j < n; j += 32) m = fmaxf(m, p[g][j]);
    m = warp_max(m);
    if (lane == 0) m_g[g] = m;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < group * n; i += ATT_THREADS) p[i / n][i % n] = expf(p[i / n][i % n] - m_g[i / n]);
  __syncthreads();
  for (int g = warp; g < group; g += ATT_WARPS) {
    float l = 0.0f;
    for (int j = lane; j < n; j += 32) l += p[g][j];
    l = warp_sum(l);
    if (lane == 0) {
      size_t o = ((size_t)t * n_head + h0 + g) * n_split + s;
      ml[2 * o] = m_g[g];
      ml[2 * o + 1] = l;
    }
  }
  for (int d = threadIdx.x; d < Dv; d += ATT_THREADS) {
    float v[ATT_GROUP];
    for (int g = 0; g < ATT_GROUP; g++) v[g] = 0.0f;
    for (int j = a; j < b; j++) {
      float x = half_to_float(vc[((size_t)(j % n_rows) * n_kv + kvh) * Dv + d]);
#pragma unroll
      for (int g = 0; g < ATT_GROUP; g++)
        if (g < group) v[g] += p[g][j - a] * x;
    }
    for (int g = 0; g < group; g++) acc[(((size_t)t * n_head + h0 + g) * n_split + s) * Dv + d] = v[g];
  }
}

// out (T, n_head, Dv) f32: M = max of the splits' m; L = sum_s l_s exp(m_s - M), out[d] =
// (sum_s acc_s[d] exp(m_s - M)) / L, both over s in order. Grid (n_head, T), thread per d.
extern "C" __global__ void attention_combine(const float* __restrict__ acc, const float* __restrict__ ml,
                                             int n_split, int Dv, float* __restrict__ out) {
  int h = blockIdx.x, t = blockIdx.y, n_head = gridDim.x;
  size_t o = ((size_t)t * n_head + h) * n_split;
  float M = NEG_INF;
  for (int s = 0; s < n_split; s++) M = fmaxf(M, ml[2 * (o + s)]);
  float L = 0.0f;
  for (int s = 0; s < n_split; s++) L += ml[2 * (o + s) + 1] * expf(ml[2 * (o + s)] - M);
  for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < n_split; s++) v += acc[(o + s) * Dv + d] * expf(ml[2 * (o + s)] - M);
    out[((size_t)t * n_head + h) * Dv + d] = v / L;
  }
}
