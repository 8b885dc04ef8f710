// Attention over the paged KV cache, every query row of a step in one launch, keys and values
// read through each sequence's block table, with a running (online) softmax over tiles of
// positions, so that any context length fits in shared memory and no score matrix is written.
// `worker/src/engine/kv/paged.rs` launches these; its CPU twin there computes the same, and is
// what the tests check against the CPU's attention loops.
//
// - paged_attention_*: decodes, one row per sequence; a thread block per (head, sequence).
// - paged_prefill_*: prompt chunks, FlashAttention's scheme: a thread block per (head, tile of
//   consecutive rows of one sequence), the tile's queries in shared memory against tiles of keys,
//   then of values, each row with its own causal length.
//
// Layouts: q and out [rows][heads][dim]; k and v caches [blocks][block_size][kv_heads][dim];
// tables [seqs][max_blocks] (block ids); lens: positions each row attends to.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define TILE 1024

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

// The block's maximum (max) or sum of one value per thread; `red` holds a float per warp.
template <bool MAX> __device__ float block_reduce(float x, float* red) {
    for (int o = 16; o > 0; o >>= 1) {
        float y = __shfl_xor_sync(0xffffffff, x, o);
        x = MAX ? fmaxf(x, y) : x + y;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) red[warp] = x;
    __syncthreads();
    x = lane < warps ? red[lane] : (MAX ? -INFINITY : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        float y = __shfl_xor_sync(0xffffffff, x, o);
        x = MAX ? fmaxf(x, y) : x + y;
    }
    __syncthreads();
    return x;
}

// Launched with blockDim.x a multiple of 32 and at least dim / 2 threads, grid (heads, seqs),
// and (dim + TILE + 32) floats of dynamic shared memory.
template <typename T>
__device__ void paged_attention(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                                const uint32_t* __restrict__ tables, const uint32_t* __restrict__ lens,
                                T* __restrict__ out, int heads, int kv_heads, int dim, int block_size,
                                int max_blocks, float scale) {
    extern __shared__ float smem[];
    float* qs = smem;
    float* sc = smem + dim;
    float* red = sc + TILE;
    const int h = blockIdx.x, s = blockIdx.y, tid = threadIdx.x, nt = blockDim.x;
    const int kvh = h / (heads / kv_heads);
    const int len = (int)lens[s];
    const uint32_t* table = tables + (size_t)s * max_blocks;
    for (int d = tid; d < dim; d += nt) qs[d] = to_float(q[((size_t)s * heads + h) * dim + d]);
    __syncthreads();
    float m = -INFINITY, l = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
    for (int base = 0; base < len; base += TILE) {
        const int n = min(TILE, len - base);
        float local = -INFINITY;
        for (int i = tid; i < n; i += nt) {
            const int p = base + i;
            const T* k = kc + (((size_t)table[p / block_size] * block_size + p % block_size) * kv_heads + kvh) * dim;
            float dot = 0.0f;
            for (int d = 0; d < dim; d++) dot += qs[d] * to_float(k[d]);
            dot *= scale;
            sc[i] = dot;
            local = fmaxf(local, dot);
        }
        const float next = fmaxf(m, block_reduce<true>(local, red));
        const float keep = expf(m - next);
        float sum = 0.0f;
        for (int i = tid; i < n; i += nt) {
            const float e = expf(sc[i] - next);
            sc[i] = e;
            sum += e;
        }
        l = l * keep + block_reduce<false>(sum, red);
        acc0 *= keep;
        acc1 *= keep;
        m = next;
        for (int i = 0; i < n; i++) {
            const int p = base + i;
            const T* v = vc + (((size_t)table[p / block_size] * block_size + p % block_size) * kv_heads + kvh) * dim;
            const float w = sc[i];
            if (tid < dim) acc0 += w * to_float(v[tid]);
            if (tid + nt < dim) acc1 += w * to_float(v[tid + nt]);
        }
        __syncthreads();
    }
    T* o = out + ((size_t)s * heads + h) * dim;
    if (tid < dim) o[tid] = from_float<T>(acc0 / l);
    if (tid + nt < dim) o[tid + nt] = from_float<T>(acc1 / l);
}

#define KTILE 32

// Launched with grid (heads, tiles) and (2 * qrows * dim + KTILE * dim + qrows * KTILE + 3 * qrows)
// floats of dynamic shared memory; tile t covers rows tile_row[t] .. + tile_rows[t] (at most
// qrows), all of sequence row_seq[tile_row[t]], in position order.
template <typename T>
__device__ void paged_prefill(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                              const uint32_t* __restrict__ tables, const uint32_t* __restrict__ row_seq,
                              const uint32_t* __restrict__ row_len, const uint32_t* __restrict__ tile_row,
                              const uint32_t* __restrict__ tile_rows, T* __restrict__ out, int heads,
                              int kv_heads, int dim, int block_size, int max_blocks, int qrows, float scale) {
    extern __shared__ float smem[];
    float* qs = smem;
    float* o = qs + qrows * dim;
    float* kv = o + qrows * dim;
    float* s = kv + KTILE * dim;
    float* m = s + qrows * KTILE;
    float* l = m + qrows;
    float* corr = l + qrows;
    const int h = blockIdx.x, tile = blockIdx.y, tid = threadIdx.x, nt = blockDim.x;
    const int kvh = h / (heads / kv_heads);
    const int r0 = (int)tile_row[tile], nr = (int)tile_rows[tile];
    const uint32_t* table = tables + (size_t)row_seq[r0] * max_blocks;
    // Rows come in position order: the last sees the most.
    const int span = (int)row_len[r0 + nr - 1];
    for (int i = tid; i < qrows * dim; i += nt) {
        const int r = i / dim, d = i % dim;
        qs[i] = r < nr ? to_float(q[((size_t)(r0 + r) * heads + h) * dim + d]) : 0.0f;
        o[i] = 0.0f;
    }
    for (int r = tid; r < qrows; r += nt) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    __syncthreads();
    for (int base = 0; base < span; base += KTILE) {
        const int n = min(KTILE, span - base);
        for (int i = tid; i < n * dim; i += nt) {
            const int p = base + i / dim;
            kv[i] = to_float(kc[(((size_t)table[p / block_size] * block_size + p % block_size) * kv_heads + kvh) * dim + i % dim]);
        }
        __syncthreads();
        for (int i = tid; i < qrows * KTILE; i += nt) {
            const int r = i / KTILE, j = i % KTILE;
            float x = -INFINITY;
            if (r < nr && j < n && base + j < (int)row_len[r0 + r]) {
                float dot = 0.0f;
                for (int d = 0; d < dim; d++) dot += qs[r * dim + d] * kv[j * dim + d];
                x = dot * scale;
            }
            s[i] = x;
        }
        __syncthreads();
        for (int r = tid; r < qrows; r += nt) {
            float most = m[r];
            for (int j = 0; j < n; j++) most = fmaxf(most, s[r * KTILE + j]);
            // A row that has seen nothing yet (padding) keeps its zeros.
            const float c = most == -INFINITY ? 1.0f : expf(m[r] - most);
            float sum = 0.0f;
            for (int j = 0; j < n; j++) {
                const float x = s[r * KTILE + j];
                const float e = x == -INFINITY ? 0.0f : expf(x - most);
                s[r * KTILE + j] = e;
                sum += e;
            }
            m[r] = most;
            l[r] = l[r] * c + sum;
            corr[r] = c;
        }
        __syncthreads();
        for (int i = tid; i < n * dim; i += nt) {
            const int p = base + i / dim;
            kv[i] = to_float(vc[(((size_t)table[p / block_size] * block_size + p % block_size) * kv_heads + kvh) * dim + i % dim]);
        }
        __syncthreads();
        for (int i = tid; i < qrows * dim; i += nt) {
            const int r = i / dim, d = i % dim;
            float acc = o[i] * corr[r];
            for (int j = 0; j < n; j++) acc += s[r * KTILE + j] * kv[j * dim + d];
            o[i] = acc;
        }
        __syncthreads();
    }
    for (int i = tid; i < nr * dim; i += nt) {
        const int r = i / dim, d = i % dim;
        out[((size_t)(r0 + r) * heads + h) * dim + d] = from_float<T>(o[i] / l[r]);
    }
}

#define PAGED_PREFILL(NAME, T)                                                                           \
    extern "C" __global__ void NAME(const T* q, const T* kc, const T* vc, const uint32_t* tables,       \
                                    const uint32_t* row_seq, const uint32_t* row_len,                    \
                                    const uint32_t* tile_row, const uint32_t* tile_rows, T* out,         \
                                    int heads, int kv_heads, int dim, int block_size, int max_blocks,    \
                                    int qrows, float scale) {                                            \
        paged_prefill<T>(q, kc, vc, tables, row_seq, row_len, tile_row, tile_rows, out, heads, kv_heads, \
                         dim, block_size, max_blocks, qrows, scale);                                     \
    }

PAGED_PREFILL(paged_prefill_f32, float)
PAGED_PREFILL(paged_prefill_f16, __half)
PAGED_PREFILL(paged_prefill_bf16, __nv_bfloat16)

#define PAGED_ATTENTION(NAME, T)                                                                       \
    extern "C" __global__ void NAME(const T* q, const T* kc, const T* vc, const uint32_t* tables,     \
                                    const uint32_t* lens, T* out, int heads, int kv_heads, int dim,    \
                                    int block_size, int max_blocks, float scale) {                     \
        paged_attention<T>(q, kc, vc, tables, lens, out, heads, kv_heads, dim, block_size, max_blocks, \
                           scale);                                                                     \
    }

PAGED_ATTENTION(paged_attention_f32, float)
PAGED_ATTENTION(paged_attention_f16, __half)
PAGED_ATTENTION(paged_attention_bf16, __nv_bfloat16)
